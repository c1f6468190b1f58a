"""Training several reward models as an ensemble (the judges that score with them live in
``preftune.judges.reward_ensemble``: :class:`RewardEnsemble`, :class:`MultiAxisReward`)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

from preftune.judges.reward_ensemble import MANIFEST


def train_ensemble(config, k: int, *, vary: str = "seed", overwrite: bool = False, log=print) -> dict[str, Any]:
    """Train ``k`` reward models that differ in seed or in held-out split; returns (and writes) the manifest.

    ``vary="seed"``: member i trains with ``training.seed + i`` (head initialisation, data order) on the same
    rows, the held-out split fixed by ``data.split_seed`` (default ``training.seed``). ``vary="split"``: member i
    holds out different rows, ``data.split_seed + i`` (so it needs ``data.eval_fraction`` and no ``data.eval``),
    with the same training seed. Member i writes to ``output_dir/member-i``; its model is the best checkpoint
    by the early-stopping metric when one was kept (``output_dir/member-i/best``), else the final one.

    ``overwrite``: replace the members of a previous ensemble in the same ``output_dir`` (each member directory
    is a run directory, refused when used; see ``preftune.train``).

    ``output_dir/ensemble.json`` lists every member's path, seeds, final held-out accuracy, best checkpoint
    (step, metric, value) and early stop; pass the
    directory to :class:`RewardEnsemble` (or ``type: reward_ensemble, members: DIR``) to score with them.
    """
    from torch import nn

    from preftune.config import to_config
    from preftune.errors import ConfigError
    from preftune.trainer.loop import train

    cfg = to_config(config)
    if cfg.task != "reward":
        raise ConfigError("train_ensemble trains reward models: set `task: reward`")
    if vary not in ("seed", "split"):
        raise ConfigError(f"vary must be 'seed' or 'split', got {vary!r}")
    if k < 1:
        raise ConfigError(f"an ensemble needs k >= 1 members, got {k}")
    if vary == "split" and (cfg.data.eval is not None or not cfg.data.eval_fraction > 0):
        raise ConfigError("vary='split' draws each member's held-out rows with data.eval_fraction; set it and "
                          "leave data.eval out")
    if not cfg.training.save_model:
        raise ConfigError("train_ensemble needs training.save_model: the members are read back from disk")
    root = Path(cfg.training.output_dir)
    seed = cfg.training.seed
    split = seed if cfg.data.split_seed is None else cfg.data.split_seed
    members = []
    for i in range(k):
        member = dataclasses.replace(
            cfg,
            # a loaded model would otherwise be trained in place by every member in turn
            model=copy.deepcopy(cfg.model) if isinstance(cfg.model, nn.Module) else cfg.model,
            data=dataclasses.replace(cfg.data, split_seed=split + i if vary == "split" else split),
            training=dataclasses.replace(cfg.training, output_dir=str(root / f"member-{i}"),
                                         seed=seed + i if vary == "seed" else seed),
        )
        log(f"ensemble: member {i + 1}/{k} ({vary}: seed {member.training.seed}, split {member.data.split_seed})")
        summary = train(member, overwrite=overwrite, log=log)
        best = summary.get("best") or {}
        path = best.get("path") or summary["model_dir"]
        accuracy = (summary.get("final_eval_metrics") or {}).get("rewards/accuracies")
        members.append({"path": path, "seed": member.training.seed, "split_seed": member.data.split_seed,
                        "final_eval_accuracy": accuracy, "best": best or None, "stopped": summary.get("stopped"),
                        "steps": summary.get("steps")})
    manifest = {"k": k, "vary": vary, "members": members}
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest
