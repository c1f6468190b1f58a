"""On-policy experience sources, registered by the loss's data kind: a paired loss trains online (best vs
worst of N samples, ``online.py``); policy-gradient losses train on groups (``groups.py``). The trainer asks
:func:`on_policy_source` and never learns which method it runs."""

from __future__ import annotations

from collections.abc import Callable

from preftune.errors import ConfigError
from preftune.rollout.groups import build_group_source
from preftune.rollout.online import build_online_source

# data kind -> builder(cfg, train prompts, eval prompts, *, policy, tokenizer, functions, ..., geometry) -> source
ON_POLICY: dict[str, Callable] = {"paired": build_online_source, "policy": build_group_source}


def on_policy_source(kind: str, cfg, train_prompts, eval_prompts, *, policy, tokenizer, run_dir, accelerator,
                     **geometry):
    """The source for an on-policy run of a loss of data kind ``kind`` (``rollout:`` present in the config)."""
    from preftune.rollout.scoring import build_reward_functions

    if kind not in ON_POLICY:
        raise ConfigError(f"loss {cfg.loss.name!r} ({kind} data) cannot train on-policy; with `rollout:` use a "
                          f"paired loss (online DPO: dpo, ipo, simpo, ...) or a policy-gradient loss (grpo)")
    if cfg.rollout.num_generations < 2:
        raise ConfigError(f"rollout.num_generations is {cfg.rollout.num_generations}: on-policy training compares "
                          "samples of one prompt, so it needs at least 2")
    functions = build_reward_functions(cfg.reward, cfg.rollout.num_generations)
    return ON_POLICY[kind](cfg, train_prompts, eval_prompts, policy=policy, tokenizer=tokenizer, functions=functions,
                           run_dir=run_dir, accelerator=accelerator, **geometry)
