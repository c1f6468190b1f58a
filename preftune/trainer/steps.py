"""One step function per data kind: log-probs (or, for a reward model, scores) for a batch -> per-example losses
and detached metrics.

The loop asks the :class:`Objective` what to compute; it never matches loss names. A step returns the
per-example losses (B,) (the loop reduces) and a dict of per-example detached tensors for logging.

Training and evaluation call the same steps; evaluation runs under ``torch.no_grad()`` (``loop.evaluate``), and
that is how a step tells them apart: trainer state (BCO's δ) is updated, and KTO's KL reference point averaged
across processes, only while gradients are enabled. Training runs the same number of micro-batches on every
process; evaluation shards need not, so a collective there could hang.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from preftune.data.batch import padded
from preftune.errors import ConfigError
from preftune.eval.preference_accuracy import preference_accuracy
from preftune.losses import LossOutput, LossSpec, combine, get_loss
from preftune.losses.kto import balanced_weights

LogpFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # batch -> (logps (S,), lengths (S,))


def _mean_across_processes(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over processes (identity in a single process)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


class RewardMean:
    """BCO's reward shift δ: the running mean, over past training micro-batches, of each micro-batch's mean
    reward mean(cat(β·ρ_w, β·ρ_l)), itself averaged across processes.

    Cumulative (every batch weighs the same), as older TRL's ``RunningMoments``; Jung et al. (arXiv:2404.04656,
    Sec. 4) describe a moving average of rewards. δ starts at 0 and a batch's rewards enter only after its own
    loss, so δ is always a constant from past batches (``bco_pair`` detaches it again).
    """

    def __init__(self):
        self.mean: torch.Tensor | float = 0.0
        self.count = 0

    @property
    def value(self) -> torch.Tensor | float:
        return self.mean

    def update(self, out: LossOutput) -> None:
        batch = torch.cat([out.chosen_rewards, out.rejected_rewards]).float().mean()  # ()
        batch = _mean_across_processes(batch)
        self.count += 1
        self.mean = self.mean + (batch - self.mean) / self.count  # stays on the device: no sync per step

    def state_dict(self) -> dict:
        return {"mean": float(self.mean), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])


# Loss inputs the trainer maintains itself, by keyword name, and their keepers. Found in the loss function's
# signature (whether or not the spec also lists them as hyperparameters); the config may never set them.
TRAINER_STATE: dict[str, type] = {"delta": RewardMean}
# Unpaired class weights that accept "auto" (chosen from the class counts by :func:`balanced_weights`).
CLASS_WEIGHTS = ("desirable_weight", "undesirable_weight")


@dataclass
class Objective:
    """The configured loss: one registered spec or a weighted combination sharing one data kind.

    ``params`` are the config's hyperparameters (``auto`` class weights resolved by :meth:`setup`);
    ``state`` holds trainer-maintained inputs, keyed ``"{loss}/{input}"`` (e.g. ``bco_pair/delta``).
    """

    specs: list[LossSpec]
    weights: list[float]
    params: dict
    state: dict[str, RewardMean] = field(default_factory=dict)

    @classmethod
    def from_config(cls, loss_cfg) -> Objective:
        names = loss_cfg.name if isinstance(loss_cfg.name, list) else [loss_cfg.name]
        specs = [get_loss(n) for n in names]
        kinds = {s.data for s in specs if s.data != "sft"} or {"sft"}
        if len(kinds) > 1:
            raise ConfigError(f"losses {names} mix data kinds {sorted(kinds)}; combine losses of one kind")
        if kinds & {"unpaired", "reward"} and len(specs) > 1 and any(s.data == "sft" for s in specs):
            raise ConfigError(f"losses {names}: the sft term combines with paired losses only (it trains the "
                              "chosen side of a pair with the policy's log-probs)")
        params, state = dict(loss_cfg.params), {}
        for spec in specs:
            for name in inspect.signature(spec.fn).parameters:
                if name in TRAINER_STATE:
                    if name in params:
                        raise ConfigError(f"loss.{name} is maintained by the trainer ({spec.name}: "
                                          f"{TRAINER_STATE[name].__doc__.split(':')[0]}); remove it from the config")
                    state[f"{spec.name}/{name}"] = TRAINER_STATE[name]()
        return cls(specs, list(loss_cfg.weights or [1.0] * len(specs)), params, state)

    @property
    def data(self) -> str:
        kinds = {s.data for s in self.specs if s.data != "sft"}
        return kinds.pop() if kinds else "sft"

    @property
    def needs_reference(self) -> bool:
        return any(s.uses_reference(self.params) for s in self.specs)

    @property
    def needs_kl(self) -> bool:
        return any(s.needs_kl for s in self.specs)

    def setup(self, examples: list) -> list[str]:
        """Settings that depend on the training examples; returns the lines to print.

        Unpaired losses: the class balance of desirable and undesirable examples, ``auto`` class weights
        resolved by :func:`balanced_weights` (a weight given as a number is kept).
        """
        if self.data != "unpaired" or not any(w in s.hyperparameters for s in self.specs for w in CLASS_WEIGHTS):
            return []
        n_d = sum(bool(e.label) for e in examples)
        n_u = len(examples) - n_d
        given = [self.params.get(w, 1.0) for w in CLASS_WEIGHTS]
        auto = [g == "auto" for g in given]
        d, u = (1.0 if a else float(g) for g, a in zip(given, auto))
        lines = [f"class balance: {n_d} desirable, {n_u} undesirable"]
        if n_d == 0 or n_u == 0:
            lines[0] += "; only one class, so the weights cannot balance them (kept at 1.0 where auto)"
        else:
            ratio = d * n_d / (u * n_u)
            if any(auto):
                d, u = balanced_weights(n_d, n_u, *given)
                lines.append(f"{'auto ' if all(auto) else ''}class weights: desirable_weight={d:g}, "
                             f"undesirable_weight={u:g} (λ_D·n_D/(λ_U·n_U) = {d * n_d / (u * n_u):.3f}, "
                             "in [1, 4/3] as the KTO paper advises)")
            elif not 1.0 <= ratio <= 4.0 / 3.0:
                bd, bu = balanced_weights(n_d, n_u, "auto", "auto")
                lines.append(f"λ_D·n_D/(λ_U·n_U) = {ratio:.3f} is outside [1, 4/3] (the KTO paper's guidance); "
                             f"desirable_weight={bd:g}, undesirable_weight={bu:g} bring it to "
                             f"{bd * n_d / (bu * n_u):.3f} (set them, or `auto`, to use them)")
        for name, value in zip(CLASS_WEIGHTS, (d, u)):
            if self.params.get(name) == "auto":
                self.params[name] = value
        return lines

    def __call__(self, **inputs) -> LossOutput:
        outputs = []
        for spec in self.specs:
            args = {k: inputs[k] for k in _input_names(spec, spec.uses_reference(self.params))}
            hp = {k: v for k, v in self.params.items() if k in spec.hyperparameters}
            keepers = {n: self.state[f"{spec.name}/{n}"] for n in TRAINER_STATE if f"{spec.name}/{n}" in self.state}
            out = spec.fn(**args, **hp, **{n: k.value for n, k in keepers.items()})
            if torch.is_grad_enabled():  # training: fold this batch in after its own loss
                for keeper in keepers.values():
                    keeper.update(out)
            outputs.append(out)
        if len(outputs) == 1:
            return outputs[0]
        return combine(outputs, self.weights, [s.name for s in self.specs])

    def state_dict(self) -> dict:
        return {k: v.state_dict() for k, v in self.state.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.state[k].load_state_dict(v)


POLICY_INPUTS = ("logps", "old_logps", "advantages", "mask", "num_sequences_in_step", "num_tokens_in_step",
                 "max_completion_length", "world_size")


# PPO's inputs: the reference enters through the KL-shaped rewards (the source's), never the loss itself.
PPO_INPUTS = ("logps", "old_logps", "advantages", "mask", "values", "old_values", "returns", "entropy",
              "num_tokens_in_step", "world_size")


def _input_names(spec: LossSpec, reference: bool) -> tuple[str, ...]:
    if spec.data == "policy":
        return POLICY_INPUTS + (("ref_logps",) if reference else ())
    if spec.data == "ppo":
        return PPO_INPUTS
    if spec.data == "reward":
        return ("chosen_scores", "rejected_scores", "margin")
    if spec.data == "sft":
        return ("policy_chosen_logps", "chosen_lengths")
    if spec.data == "unpaired":
        return (("policy_logps",) + (("reference_logps",) if reference else ()) + ("labels",)
                + (("kl",) if spec.needs_kl else ()))
    names = ("policy_chosen_logps", "policy_rejected_logps")
    if reference:
        names += ("reference_chosen_logps", "reference_rejected_logps")
    if spec.needs_lengths:
        names += ("chosen_lengths", "rejected_lengths")
    return names


def _pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reward metrics of B pairs, each (B,): rewards, margins and preference accuracy."""
    margins = chosen_rewards - rejected_rewards
    return {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/margins": margins, "rewards/accuracies": preference_accuracy(margins)}


def _reference(batch, reference_fn: LogpFn | None) -> torch.Tensor:
    """Reference log-probs of the batch's sequences (S,): cached in the batch, else computed now."""
    return batch.ref_logps if batch.ref_logps is not None else reference_fn(batch)[0]


def paired_step(objective: Objective, logp_fn: LogpFn, batch, reference_fn: LogpFn | None):
    """Pairs: sequences 0..B-1 chosen, B..2B-1 rejected (the batch contract)."""
    logps, lengths = logp_fn(batch)  # (2B,), (2B,)
    n = batch.num_examples
    inputs = {
        "policy_chosen_logps": logps[:n], "policy_rejected_logps": logps[n:],
        "chosen_lengths": lengths[:n], "rejected_lengths": lengths[n:],
    }
    if objective.needs_reference:
        ref = _reference(batch, reference_fn)  # (2B,)
        inputs["reference_chosen_logps"], inputs["reference_rejected_logps"] = ref[:n], ref[n:]
    out = objective(**inputs)
    metrics = {"logps/chosen": logps[:n].detach(), "logps/rejected": logps[n:].detach()}
    if out.chosen_rewards is not None:
        metrics.update(_pair_metrics(out.chosen_rewards, out.rejected_rewards))
    metrics.update({k: v.detach() for k, v in out.metrics.items()})
    return out.losses, metrics


def sft_step(objective: Objective, logp_fn: LogpFn, batch, reference_fn: LogpFn | None):
    """Single completions trained by likelihood (SFT); a paired batch trains on its chosen side.

    A paired batch (held-out pairs) is also ranked by the SFT term's own implicit reward, the mean-token
    log-prob π/|y| (its loss with the sign flipped): ``rewards/accuracies`` compares chosen with rejected.
    """
    logps, lengths = logp_fn(batch)  # (S,), (S,)
    n = batch.num_examples
    out = objective(policy_chosen_logps=logps[:n], chosen_lengths=lengths[:n])
    metrics = {"logps/chosen": logps[:n].detach()}
    if batch.paired:
        per_token = (logps / lengths.clamp(min=1)).detach()  # (2B,)
        metrics.update(_pair_metrics(per_token[:n], per_token[n:]))
    metrics.update({k: v.detach() for k, v in out.metrics.items()})
    return out.losses, metrics


def kl_reference_point(logp_fn: LogpFn, kl_batch, reference_fn: LogpFn | None, across_processes: bool):
    """KTO's reference point z0, a detached 0-dim estimate of KL(π_θ ‖ π_ref) from mismatched sequences:

        z0 = max(0, mean_i [log π_θ(y_σ(i)|x_i) − log π_ref(y_σ(i)|x_i)])

    σ: the fixed derangement of ``data.mismatched``; log-probs summed over completion tokens. The mean is taken
    over the micro-batch, then over processes (``across_processes``, training only), then clamped: Ethayarajh
    et al., arXiv:2402.01306v4, Sec. 4.1 (z0 from mismatched pairs in the batch, not back-propagated), as TRL
    gathers it. Departure: σ pairs across the whole dataset rather than within the micro-batch, which works for
    B = 1 and lets the reference side be precomputed. The policy pass runs without gradients.
    """
    with torch.no_grad():
        policy, _ = logp_fn(kl_batch)  # (B,)
        z0 = (policy.float() - _reference(kl_batch, reference_fn).float()).mean()  # ()
    if across_processes:
        z0 = _mean_across_processes(z0)
    return z0.clamp(min=0).detach()


def unpaired_step(objective: Objective, logp_fn: LogpFn, batch, reference_fn: LogpFn | None):
    """Completions with desirable / undesirable labels (KTO); z0 from the batch's mismatched ``kl_batch``.

    A paired batch (held-out pairs) is scored as its 2B completions, chosen desirable and rejected undesirable,
    and ranked as pairs: ``rewards/accuracies`` compares each chosen reward β·ρ with its rejected one.
    """
    training = torch.is_grad_enabled()
    logps, lengths = logp_fn(batch)  # (S,), (S,)
    n = batch.num_examples
    paired = batch.paired
    if paired:
        labels = torch.arange(2 * n, device=logps.device) < n  # (2B,) chosen desirable
    else:
        labels = batch.labels  # (B,)
    s = labels.shape[0]
    inputs = {"policy_logps": logps[:s], "lengths": lengths[:s], "labels": labels}
    metrics = {}
    if objective.needs_reference:
        inputs["reference_logps"] = _reference(batch, reference_fn)[:s]
    if objective.needs_kl:
        inputs["kl"] = kl_reference_point(logp_fn, batch.kl, reference_fn, training)
        metrics["kl"] = inputs["kl"].reshape(1)
    out = objective(**inputs)
    detached = logps[:s].detach()
    if paired:
        metrics.update({"logps/chosen": detached[:n], "logps/rejected": detached[n:]})
        if out.rewards is not None:
            metrics.update(_pair_metrics(out.rewards[:n], out.rewards[n:]))
    else:  # every key on every batch, possibly empty, so that processes reduce the same keys
        metrics.update({"logps/desirable": detached[labels], "logps/undesirable": detached[~labels]})
        if out.rewards is not None:
            metrics.update({"rewards/desirable": out.rewards[labels], "rewards/undesirable": out.rewards[~labels]})
    metrics.update({k: v.detach() for k, v in out.metrics.items()})
    return out.losses, metrics


def reward_step(objective: Objective, score_fn: LogpFn, batch, reference_fn: LogpFn | None):
    """Pairs scored by a reward model (``models.ScoreModel``): sequences 0..B-1 chosen, B..2B-1 rejected.

    ``score_fn`` returns one score per sequence in place of a log-prob; the batch's ``margin`` (B,), when
    the data gives margins, goes to the loss. Metrics are the pair metrics of the raw scores, so
    ``rewards/accuracies`` is the reward model's preference accuracy (eval: held-out accuracy, the usual
    early-stopping metric). There is never a reference.
    """
    scores, _ = score_fn(batch)  # (2B,)
    n = batch.num_examples
    out = objective(chosen_scores=scores[:n], rejected_scores=scores[n:], margin=batch.margin)
    metrics = _pair_metrics(out.chosen_rewards, out.rejected_rewards)
    metrics.update({k: v.detach() for k, v in out.metrics.items()})
    return out.losses, metrics


def policy_step(objective: Objective, logp_fn: LogpFn, batch, reference_fn: LogpFn | None):
    """On-policy groups (``data.batch.GroupBatch``) trained by a policy-gradient loss (GRPO family).

    The engine returns per-token log-probs (N,) at the sampling temperature, and their entropies (a metric:
    ``entropy``, each sequence's token mean); they, π_old and the reference are laid out (S, T) per sequence
    for the loss, whose per-sequence contributions are globally normalized (the batch's ``reduce`` sums them).
    """
    seqs = batch.seqs
    S, ts = seqs.num_sequences, seqs.target_seq
    tok, counts, entropy = logp_fn(dataclasses.replace(batch, with_entropy=True))  # (N,), (S,), (N,)
    logps = padded(tok, ts, S)  # (S, T)
    inputs = {
        "logps": logps, "old_logps": None if batch.old_logps is None else padded(batch.old_logps, ts, S),
        "advantages": batch.advantages, "mask": batch.token_mask(),
        "num_sequences_in_step": batch.step_sequences, "num_tokens_in_step": batch.step_tokens,
        "max_completion_length": batch.max_length, "world_size": batch.world_size,
    }
    if objective.needs_reference:
        ref = batch.ref_logps if batch.ref_logps is not None else reference_fn(batch)[0]  # (N,)
        inputs["ref_logps"] = padded(ref.detach(), ts, S)
    out = objective(**inputs)
    entropy_sums = torch.zeros(S, dtype=torch.float32, device=tok.device).index_add(0, ts, entropy.float())
    metrics = {"entropy": entropy_sums / counts.clamp(min=1)}  # (S,) token mean per sequence
    metrics.update({k: v.detach() for k, v in out.metrics.items()})
    return out.losses, metrics


def ppo_step(objective: Objective, logp_fn: LogpFn, batch, reference_fn: LogpFn | None):
    """PPO minibatches (``data.batch.PPOBatch``): per-token log-probs, entropies and values V(s_t) from one
    forward at the sampling temperature, laid out (S, T) like the rollout's π_old, V_old, advantages and
    returns. The reference is not an input here: it entered through the rewards when the rollout was shaped."""
    seqs = batch.seqs
    S, ts, width = seqs.num_sequences, seqs.target_seq, batch.mask.shape[1]
    tok, _, entropy, values = logp_fn(batch)  # (N,) each
    inputs = {
        "logps": padded(tok, ts, S, width), "old_logps": batch.old_logps, "advantages": batch.advantages,
        "mask": batch.mask, "values": padded(values, ts, S, width), "old_values": batch.old_values,
        "returns": batch.returns, "entropy": padded(entropy, ts, S, width),
        "num_tokens_in_step": batch.step_tokens, "world_size": batch.world_size,
    }
    out = objective(**inputs)
    return out.losses, {k: v.detach() for k, v in out.metrics.items()}


STEPS = {"paired": paired_step, "sft": sft_step, "unpaired": unpaired_step, "reward": reward_step,
         "policy": policy_step, "ppo": ppo_step}
