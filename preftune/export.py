"""``preftune export RUN --out DIR [--merge]``: a run's model as a standalone Hugging Face directory.

    preftune export runs/x --merge --out merged/     LoRA adapter folded into its base: one model for
                                                     AutoModelForCausalLM.from_pretrained (vLLM, TGI, the hub)
    preftune export runs/x --out copy/               the model or adapter as saved (final/ or best/)

RUN is a run directory (its ``final/``, or ``best/`` with ``--which best``) or a saved model / adapter
directory itself. Merging loads the base named in the adapter's config (``--base`` overrides it) unquantized in
fp32, so a QLoRA adapter merges into the full-precision base, adds each adapted layer's B·A·α/r
(``merge_and_unload``), and saves the result in ``--dtype`` (``auto``: the dtype the base checkpoint records,
as ``from_pretrained(dtype="auto")`` reads it). The tokenizer (with its chat template) comes from the run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from preftune.errors import PreftuneError
from preftune.models import DTYPES, cast_weights

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json")


def saved_model_dir(run: str | Path, which: str = "final") -> Path:
    """The saved model or adapter of ``run``: ``run/<which>`` for a run directory, else ``run`` itself."""
    path = Path(run).expanduser()
    for candidate in (path / which, path):
        if (candidate / "adapter_config.json").exists() or (candidate / "config.json").exists():
            return candidate
    raise PreftuneError(f"{run}: neither a run directory with {which}/ nor a saved model or adapter "
                        "(no adapter_config.json or config.json)")


def export_model(run: str | Path, out: str | Path, *, merge: bool = False, which: str = "final",
                 base: str | None = None, dtype: str = "auto", trust_remote_code: bool = False,
                 revision: str | None = None, log=print) -> Path:
    """Write the run's model to ``out`` (merged into its base with ``merge``); returns ``out``."""
    src, out = saved_model_dir(run, which), Path(out).expanduser()
    if out.resolve() == src.resolve():
        raise PreftuneError(f"--out {out} is the model being exported; choose another directory")
    adapter = (src / "adapter_config.json").exists()
    if not merge or not adapter:
        if merge:
            log(f"note: {src} is a full model (nothing to merge); copied as it is")
        shutil.copytree(src, out, dirs_exist_ok=True)
        log(f"exported {src} -> {out}")
        return out
    merged, base_name = merged_model(src, base=base, dtype=dtype, trust_remote_code=trust_remote_code,
                                     revision=revision)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    _copy_tokenizer(src, base_name, out, trust_remote_code, revision)
    log(f"merged {src} into {base_name} -> {out} ({str(next(merged.parameters()).dtype).removeprefix('torch.')})")
    return out


def merged_model(adapter_dir: Path, *, base: str | None = None, dtype: str = "auto", trust_remote_code: bool = False,
                 revision: str | None = None):
    """(the base with the adapter folded in, cast to ``dtype``; the base's name)."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    peft_cfg = PeftConfig.from_pretrained(str(adapter_dir))
    if peft_cfg.task_type not in (None, "CAUSAL_LM"):
        raise PreftuneError(f"{adapter_dir}: a {peft_cfg.task_type} adapter; --merge merges causal-LM adapters "
                            "(a LoRA reward model is saved merged already)")
    base_name = base or peft_cfg.base_model_name_or_path
    if not base_name:
        raise PreftuneError(f"{adapter_dir}: the adapter does not name its base model; pass --base")
    options = {"trust_remote_code": trust_remote_code, **({"revision": revision} if revision else {})}
    try:
        target = DTYPES[dtype] if dtype != "auto" else _recorded_dtype(AutoConfig.from_pretrained(base_name, **options))
        model = AutoModelForCausalLM.from_pretrained(base_name, dtype=torch.float32, **options)
    except OSError as e:
        raise PreftuneError(f"could not load the base model {base_name!r} of {adapter_dir}: "
                            f"{str(e).splitlines()[0]} (pass --base PATH)") from None
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()  # W + B·A·alpha/r, in fp32
    return cast_weights(merged, target), base_name


def _recorded_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _copy_tokenizer(src: Path, base_name: str, out: Path, trust_remote_code: bool, revision: str | None) -> None:
    """The run's tokenizer files (what training used, chat template included), else the base's tokenizer."""
    files = [src / f for f in TOKENIZER_FILES if (src / f).exists()]
    if files:
        for f in files:
            shutil.copy2(f, out / f.name)
        return
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(base_name, trust_remote_code=trust_remote_code,
                                  **({"revision": revision} if revision else {})).save_pretrained(str(out))


def _cmd_export(args) -> int:
    export_model(args.run, args.out, merge=args.merge, which=args.which, base=args.base, dtype=args.dtype,
                 trust_remote_code=args.trust_remote_code, revision=args.revision)
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="a run's model as a standalone Hugging Face directory (--merge: LoRA folded in)")
    p.add_argument("run", help="run directory (its final/ or best/), or a saved model / adapter directory")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--merge", action="store_true",
                   help="fold the LoRA adapter into its base: one model for AutoModelForCausalLM.from_pretrained")
    p.add_argument("--which", choices=("final", "best"), default="final", help="which model of the run (default final)")
    p.add_argument("--base", help="base model to merge into (default: the one the adapter names)")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="dtype of the merged weights (auto: the base checkpoint's)")
    p.add_argument("--trust-remote-code", action="store_true", help="let from_pretrained run the base's own code")
    p.add_argument("--revision", help="hub revision of the base model")
    p.set_defaults(func=_cmd_export)
