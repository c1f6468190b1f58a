"""Checks across the fields of a built config, each registered with the keys it reads.

:func:`run_checks` runs every check whose keys have no problem yet (a type or range problem in them would make
its verdict noise) and adds what it finds to the same :class:`~preftune.config_reader.Problems`, so a config's
parse, range and cross-field problems are reported together. The loss check asks the loss spec: a key no loss
of the mix takes is unknown here (with a suggestion); each loss checks its own keys (``LossSpec.check_params``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from preftune.config_reader import Problems, Reader

DEFAULT_LOSS = {"policy": "dpo", "reward": "bradley_terry"}
"""``loss.name`` when the config leaves it out, by ``task``."""

Check = Callable[[Any, Reader], Iterator[tuple[str, str]]]
CHECKS: list[tuple[tuple[str, ...], Check]] = []


def check(*reads: str) -> Callable[[Check], Check]:
    """Register a check: ``fn(config, reader)`` yields (dotted key, message) per problem; ``reads`` are its inputs."""
    def register(fn: Check) -> Check:
        CHECKS.append((reads, fn))
        return fn

    return register


def run_checks(config, problems: Problems, reader: Reader) -> None:
    """Fill ``loss.name`` from the task when None, then run every check whose inputs are sound."""
    if config.loss.name is None and not problems.touches("task"):
        config.loss.name = DEFAULT_LOSS[config.task]
    for reads, fn in CHECKS:
        if not problems.touches(*reads):
            for key, message in fn(config, reader):
                problems.add(key, message)


def loss_names(name: Any) -> list[str]:
    return name if isinstance(name, list) else [name]


def loss_takers() -> dict[str, list[str]]:
    """Each hyperparameter name of any registered loss -> the losses that take it."""
    from preftune.losses import registered_losses

    takers: dict[str, list[str]] = {}
    for name, spec in sorted(registered_losses().items()):
        for hp in spec.hyperparameters:
            takers.setdefault(hp, []).append(name)
    return takers


def taken_by(name: Any) -> set[str] | None:
    """Hyperparameters the loss (or every loss of a mix) takes; None when a name is not a registered loss."""
    from preftune.losses import registered_losses

    registry = registered_losses()
    names = loss_names(name)
    if not all(isinstance(n, str) and n in registry for n in names):
        return None
    return {hp for n in names for hp in registry[n].hyperparameters}


@check("task", "loss.name", "loss.weights", "data.reward_margin")
def _check_loss(config, reader: Reader) -> Iterator[tuple[str, str]]:
    """Registered names, the task and data kind they train on, weights, and the hyperparameters each takes."""
    from preftune.losses import get_loss, registered_losses

    names = loss_names(config.loss.name)
    specs = []
    for n in names:
        try:
            specs.append(get_loss(n))
        except KeyError as e:
            yield "loss.name", f"loss.name: {e.args[0]}"
    if len(specs) < len(names):
        return
    mix = "/".join(names)
    reward = [s.data == "reward" for s in specs]
    if config.task == "reward" and not all(reward):
        kinds = ", ".join(sorted(n for n, s in registered_losses().items() if s.data == "reward"))
        yield "loss.name", (f"task: reward trains a reward model, which has scores, not log-probs; loss.name {mix} "
                            f"is a policy loss (reward-model losses: {kinds})")
    if config.task == "policy" and any(reward):
        yield "loss.name", f"loss {mix} trains a reward model: set `task: reward`"
    if config.task == "policy" and config.data.reward_margin in ("margin", "ratings"):
        yield "data.reward_margin", f"data.reward_margin: {config.data.reward_margin} is for reward models (`task: reward`)"
    kinds = sorted({s.data for s in specs if s.data != "sft"})
    if len(kinds) > 1:
        yield "loss.name", f"loss.name: {mix} mix data kinds ({', '.join(kinds)}): combine losses of one kind"
    elif kinds and kinds[0] != "paired" and len(specs) > 1 and any(s.data == "sft" for s in specs):
        yield "loss.name", (f"loss.name: {mix}: the sft term combines with paired losses only (it trains the chosen "
                            "side of a pair with the policy's log-probs)")
    if config.loss.weights is not None and len(config.loss.weights) != len(names):
        yield "loss.weights", f"loss.weights has {len(config.loss.weights)} values for {len(names)} losses"
    yield from _check_hyperparameters(config.loss.params, specs, mix, reader)


def _check_hyperparameters(params: dict, specs: list, mix: str, reader: Reader) -> Iterator[tuple[str, str]]:
    """The config reports a key no loss of the mix takes (with a suggestion across sections and losses); each loss
    checks the keys it takes (``LossSpec.check_params``: required, type, legal range) and refuses its trainer
    state. A suggested key stands in for the unknown one, so a misspelt required key is one problem, not two."""
    taken = list(dict.fromkeys(hp for s in specs for hp in s.hyperparameters))
    takers = loss_takers()
    meant = {}
    for key in params:
        owner = next((s for s in specs if key in s.state), None)
        if key in taken or owner is not None:
            continue
        if key in takers:  # another loss's hyperparameter
            who = takers[key]
            who = (who[0] + " takes" if len(who) == 1 else
                   f"{', '.join(who[:-1])} and {who[-1]} take" if len(who) <= 3 else f"{', '.join(who[:3])} and "
                   f"{len(who) - 3} more take")
            yield f"loss.{key}", (f"unknown key 'loss.{key}': {mix} does not take it ({who} it); {mix} takes: "
                                  f"{', '.join(taken) or 'none'}")
            continue
        message, suggested = reader.unknown("loss", key, taken or ["none"], listing=f"{mix} takes")
        yield f"loss.{key}", message
        meant.update({s[len("loss."):]: params[key] for s in suggested if s.startswith("loss.")})
    for spec in specs:
        own = {k: v for k, v in {**meant, **params}.items() if k in spec.hyperparameters or k in spec.state}
        for message in spec.check_params(own):
            yield "loss", message


@check("data.max_prompt_length", "training.max_length")
def _check_lengths(config, reader: Reader) -> Iterator[tuple[str, str]]:
    prompt, total = config.data.max_prompt_length, config.training.max_length
    if prompt is not None and prompt >= total:
        yield "data.max_prompt_length", (f"data.max_prompt_length: {prompt} leaves no room for a response within "
                                         f"training.max_length {total} (prompt + response)")


@check("data.eval", "data.eval_fraction")
def _check_eval_split(config, reader: Reader) -> Iterator[tuple[str, str]]:
    if config.data.eval is not None and config.data.eval_fraction > 0:
        yield "data.eval_fraction", (f"data.eval_fraction: {config.data.eval_fraction:g} would be ignored because "
                                     "data.eval is given; set one of them")


@check("training.adam_betas")
def _check_betas(config, reader: Reader) -> Iterator[tuple[str, str]]:
    if len(config.training.adam_betas) != 2:
        yield "training.adam_betas", f"training.adam_betas: expected 2 values (beta1, beta2), got {len(config.training.adam_betas)}"


@check("monitor.early_stopping_metric")
def _check_metric(config, reader: Reader) -> Iterator[tuple[str, str]]:
    if config.monitor.early_stopping_metric is None:  # the run's natural metric (the monitor picks it)
        return
    split, _, key = config.monitor.early_stopping_metric.partition("/")
    if split not in ("eval", "monitor") or not key:
        yield "monitor.early_stopping_metric", (
            f"monitor.early_stopping_metric: expected 'eval/<key>' or 'monitor/<key>' (a metrics.jsonl split and "
            f"key, e.g. eval/loss), got {config.monitor.early_stopping_metric!r}")


@check("rollout", "reward")
def _check_rollout(config, reader: Reader) -> Iterator[tuple[str, str]]:
    if config.rollout is not None and (config.reward is None or not (config.reward.functions or config.reward.judge)):
        yield "reward", ("reward: an on-policy run (a `rollout:` section) needs `reward.functions` (e.g. "
                         "['my_rewards.py:score']) or `reward.judge`")
    if config.reward is not None and config.rollout is None:  # a scorer without sampling would go unused
        yield "reward", ("reward: scores on-policy samples, but there is no `rollout:` section (add e.g. "
                         "`rollout: {num_generations: 4}` to train on-policy, or remove `reward:`)")


# Rollout options only PPO's source reads (with their defaults), and the group source's options PPO never reads.
PPO_ONLY = {"ppo_epochs": 4, "minibatches": 1, "gamma": 1.0, "gae_lambda": 0.95, "whiten_advantages": True,
            "early_stop_kl": None, "critic": "head", "critic_learning_rate": None}
NOT_PPO = {"num_iterations": 1, "dynamic_sampling": False, "mask_truncated_completions": False,
           "advantage_estimator": "grpo", "scale_rewards": "group"}


def _data_kinds(config) -> set[str] | None:
    """The data kinds of the config's loss (one per mixed-in loss); None without a loss or with an unknown one
    (that is _check_loss's to report)."""
    from preftune.losses import get_loss

    if config.loss.name is None:
        return None
    try:
        return {get_loss(n).data for n in loss_names(config.loss.name)}
    except KeyError:
        return None


@check("rollout", "loss.name", "loss", "task")
def _check_ppo(config, reader: Reader) -> Iterator[tuple[str, str]]:
    """PPO trains on its own samples (a `rollout:` section); the options of one on-policy source are refused
    with another's loss (they would be ignored); the adaptive KL coefficient needs a non-zero start."""
    kinds = _data_kinds(config)
    if kinds is None:
        return
    rollout, mix = config.rollout, "/".join(loss_names(config.loss.name))
    if "ppo" in kinds and rollout is None:
        yield "rollout", (f"loss {mix} learns from the policy's own samples: add a `rollout:` section (e.g. "
                          "{num_generations: 1, max_new_tokens: 256, ppo_epochs: 4}) and `reward:`")
    if rollout is None:
        return
    wrong = NOT_PPO if "ppo" in kinds else PPO_ONLY
    for key, default in wrong.items():
        if getattr(rollout, key) != default:
            owner = "GRPO" if "ppo" in kinds else "PPO"
            yield f"rollout.{key}", f"rollout.{key}: {getattr(rollout, key)} is a {owner} option; {mix} ignores it"
    params = config.loss.params
    if "ppo" in kinds and params.get("target_kl") is not None and params.get("kl_coef", 0.05) == 0:
        yield "loss.target_kl", ("loss.target_kl: the adaptive KL coefficient multiplies loss.kl_coef, which is 0; "
                                 "give it a starting value (e.g. 0.05)")


@check("data.train", "data.eval", "engine.group_by_length", "rollout")
def _check_sources(config, reader: Reader) -> Iterator[tuple[str, str]]:
    """Lists of sources: their keys and weights (all or none); weights only where an epoch order is drawn."""
    from preftune.data.sources import as_sources, source_problems, weights_of

    for key in ("train", "eval"):
        for message in source_problems(getattr(config.data, key), f"data.{key}"):
            yield f"data.{key}", message
    if weights_of(as_sources(config.data.eval)) is not None:
        yield "data.eval", "data.eval: mixing weights apply to training data; evaluation reads every held-out row"
    if weights_of(as_sources(config.data.train)) is None:
        return
    if config.engine.group_by_length:
        yield "engine.group_by_length", ("engine.group_by_length: a weighted mixture draws each epoch's order by "
                                         "its weights; grouping by length would override them")
    if config.rollout is not None:
        yield "data.train", "data.train: mixing weights apply to preference data, not to on-policy prompts"


@check("data.streaming", "training.max_steps", "data.eval", "data.eval_fraction", "rollout", "task",
       "engine.group_by_length")
def _check_streaming(config, reader: Reader) -> Iterator[tuple[str, str]]:
    if not config.data.streaming:
        return
    if config.training.max_steps is None:
        yield "training.max_steps", ("data.streaming: a stream has no known length, so epochs cannot size the "
                                     "run; set training.max_steps")
    if config.data.eval_fraction > 0:
        yield "data.eval_fraction", "data.streaming: nothing is held out of a stream; give data.eval instead"
    if config.rollout is not None:
        yield "data.streaming", "data.streaming: on-policy runs read their prompts whole; drop data.streaming"
    if config.task != "policy":
        yield "data.streaming", "data.streaming trains a policy; a reward model (task: reward) reads its pairs whole"
    if config.engine.group_by_length:
        yield "engine.group_by_length", "engine.group_by_length needs the whole set; it cannot group a stream"


@check("model_dtype", "lora")
def _check_model_dtype(config, reader: Reader) -> Iterator[tuple[str, str]]:
    if config.model_dtype == "fp16" and config.lora is None:
        yield "model_dtype", ("model_dtype: fp16 full fine-tuning needs loss scaling, which preftune does not do "
                              "(gradients under- and overflow in fp16); use model_dtype: bf16, or LoRA (a `lora:` "
                              "section) on an fp16 base")


@check("attn_implementation", "engine.layout", "task")
def _check_attention(config, reader: Reader) -> Iterator[tuple[str, str]]:
    attn = config.attn_implementation or ""
    if attn.startswith("flash_attention") and config.task == "policy" and config.engine.layout != "padded":
        yield "engine.layout", (f"attn_implementation: {attn} takes no 4-D attention mask, which the "
                                f"{config.engine.layout} layout needs; set engine.layout: padded")


# Rollout options that only the group source (GRPO's family) reads; online DPO would ignore them.
GROUP_ONLY = {"num_iterations": 1, "dynamic_sampling": False, "mask_truncated_completions": False}


@check("rollout", "loss.name", "task")
def _check_groups(config, reader: Reader) -> Iterator[tuple[str, str]]:
    """On-policy groups: a policy-gradient loss needs a `rollout:` section, a group holds at least 2 samples (PPO
    excepted: its critic is the baseline), and options only GRPO reads are not set for online DPO."""
    kinds = _data_kinds(config)
    if kinds is None:
        return
    rollout, mix = config.rollout, "/".join(loss_names(config.loss.name))
    if "policy" in kinds and rollout is None:
        yield "rollout", (f"loss {mix} learns from the policy's own samples: add a `rollout:` section (e.g. "
                          "{num_generations: 8, max_new_tokens: 256}) and `reward:`")
    if rollout is None or "ppo" in kinds:
        return
    if rollout.num_generations < 2:
        yield "rollout.num_generations", (
            f"rollout.num_generations: {rollout.num_generations} makes groups of one completion: its reward is "
            "its own group mean, so every advantage is 0 (GRPO) and no pair can be formed (online DPO); use at "
            "least 2 (TRL's default is 8; training.per_device_batch_size counts prompts, each with its whole group)")
    if "paired" in kinds:
        for key, default in GROUP_ONLY.items():
            if getattr(rollout, key) != default:
                yield f"rollout.{key}", (f"rollout.{key}: {getattr(rollout, key)} is a GRPO option (policy-gradient "
                                         f"losses); online DPO ({mix}) ignores it")


@check("reward.overlong_buffer", "rollout.max_new_tokens")
def _check_overlong(config, reader: Reader) -> Iterator[tuple[str, str]]:
    reward, rollout = config.reward, config.rollout
    if rollout is None or reward is None or reward.overlong_buffer is None:
        return
    if reward.overlong_buffer > rollout.max_new_tokens:
        yield "reward.overlong_buffer", (
            f"reward.overlong_buffer: {reward.overlong_buffer} exceeds rollout.max_new_tokens "
            f"{rollout.max_new_tokens}: the punishment would start before a completion has any length")
