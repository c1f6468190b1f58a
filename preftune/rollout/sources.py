"""On-policy experience sources, registered by the loss's data kind: a paired loss trains online (best vs
worst of N samples, ``online.py``); policy-gradient losses train on groups (``groups.py``); PPO on rollout
buffers with a critic (``ppo.py``). The trainer asks :func:`on_policy_source` and never learns which method it
runs."""

from __future__ import annotations

from collections.abc import Callable

from preftune.errors import ConfigError
from preftune.rollout.groups import build_group_source
from preftune.rollout.online import build_online_source
from preftune.rollout.ppo import build_ppo_source

# data kind -> builder(cfg, train prompts, eval prompts, *, policy, tokenizer, functions, run_dir, accelerator,
#                      autocast, reference_fn, geometry) -> source
ON_POLICY: dict[str, Callable] = {"paired": build_online_source, "policy": build_group_source,
                                  "ppo": build_ppo_source}
# Sources that compare the samples of one prompt need two of them at least; PPO's critic is its baseline.
MIN_GENERATIONS: dict[str, int] = {"paired": 2, "policy": 2, "ppo": 1}


def on_policy_source(kind: str, cfg, train_prompts, eval_prompts, *, policy, tokenizer, run_dir, accelerator,
                     autocast, reference_fn=None, **geometry):
    """The source for an on-policy run of a loss of data kind ``kind`` (``rollout:`` present in the config).

    ``reference_fn``: the live reference scorer (None when the loss needs no reference); a source that shapes
    its rewards with it (PPO) calls it at sampling time. ``autocast``: the run's compute-precision context
    factory (the trainer's one); sampling, π_old, the reference and the training pass all run under it.
    """
    from preftune.rollout.scoring import build_reward_functions

    if kind not in ON_POLICY:
        raise ConfigError(f"loss {cfg.loss.name!r} ({kind} data) cannot train on-policy; with `rollout:` use a "
                          f"paired loss (online DPO: dpo, ipo, simpo, ...) or a policy-gradient loss (grpo, ppo)")
    if cfg.rollout.num_generations < MIN_GENERATIONS[kind]:
        raise ConfigError(f"rollout.num_generations is {cfg.rollout.num_generations}: on-policy training compares "
                          "samples of one prompt, so it needs at least 2")
    functions = build_reward_functions(cfg.reward, cfg.rollout.num_generations)
    return ON_POLICY[kind](cfg, train_prompts, eval_prompts, policy=policy, tokenizer=tokenizer, functions=functions,
                           run_dir=run_dir, accelerator=accelerator, autocast=autocast, reference_fn=reference_fn,
                           **geometry)
