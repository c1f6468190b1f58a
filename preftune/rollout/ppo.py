"""PPO's experience source: a rollout buffer sampled from the current policy, scored, shaped and turned into
GAE advantages, then served as ``rollout.ppo_epochs`` passes of ``rollout.minibatches`` shuffled minibatches,
each minibatch one optimizer step of the loop.

    prompts of the rollout -> G samples each (``Rollouts``: generation, reward functions / judges, missing-EOS
    penalty) -> no-grad pass of the training engine: π_old, V_old (and π_ref) per token -> rewards shaped per
    token (``kl_penalty_rewards``: −β·(log π_old − log π_ref) on every token, the score on the last) -> GAE
    (``advantages.gae``) -> advantages whitened over the rollout -> E epochs x M minibatches

Sizes: ``per_device_batch_size`` counts prompts per micro-batch, so a minibatch step holds
``per_device_batch_size × gradient_accumulation_steps × processes`` prompts (× ``num_generations`` samples)
and a rollout ``minibatches`` times that. Minibatches are drawn by prompt (a prompt's samples stay together,
so its prompt runs once in the forward), reshuffled every epoch by a permutation of (seed, rollout, epoch).
The loss is normalized by the minibatch's tokens over every micro-batch and process (``losses.ppo``).

π_old and V_old come from the training engine itself (not the sampler's log-probs), in exactly the layout of
the first epoch's micro-batches, so the first minibatch's ratio is exactly 1. The reference is scored in the
same pass (the adapter-disabled base with LoRA, a frozen copy or ``reference.model`` otherwise; none when
``loss.kl_coef`` is 0). With ``loss.target_kl`` the KL coefficient adapts after every rollout
(``AdaptiveKLController``, toward the measured per-sequence KL to the reference).

Early stop: with ``rollout.early_stop_kl``, a step whose approximate KL to the rollout policy
(``policy/approx_kl_k3``, measured by the step's own forward, before its update) exceeds the bound ends the
rollout after that step; the next step samples a new one (Stable-Baselines3 checks the same estimate but
skips the offending update; here it is applied, the loop having already taken it).

Resume: the rollout in use (its samples, π_old, V_old, advantages, returns, how far it got), the rollout
counter and the KL coefficient are the source's checkpoint state; prompts, seeds and shuffles are functions
of (seed, rollout index, epoch), so a resumed run serves exactly the minibatches an uninterrupted one would.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune import advantages as adv
from preftune.data.batch import PPOBatch, padded
from preftune.data.layouts import LAYOUTS
from preftune.data.packing import epoch_order
from preftune.data.prompts import PromptSet
from preftune.data.tokenize import TokenizedGroup
from preftune.errors import ConfigError, PreftuneError
from preftune.logprobs import Critic, LogpModel, ValueHead, decoder_of, hidden_size_of
from preftune.losses import get_loss
from preftune.losses.ppo import AdaptiveKLController, kl_penalty_rewards
from preftune.models import disable_dropout, is_peft, load_reward_model
from preftune.rollout.online import Rollouts, epoch_positions, process_sums, rollout_seed


class PPOSource:
    """PPO rollouts as an experience source (module docstring).

    ``companions``: the critic, which trains beside the policy (the run's optimizer, gradient clipping and
    checkpoints hold it), at ``rollout.critic_learning_rate`` (``learning_rates``) when given;
    ``forward(engine)`` gives the training forward with the critic inside it.
    """

    static = False

    def __init__(self, prompts: PromptSet, eval_prompts: PromptSet, rollouts: Rollouts, *, rollout_cfg,
                 params: dict, critic: nn.Module, engine: LogpModel, reference_fn, micro: int, accum: int,
                 world: int, rank: int, seed: int, pad_id: int, layout: str, device, run_dir: Path | None,
                 accelerator, autocast):
        self.data, self.eval_prompts, self.rollouts, self.rc, self.params = (prompts, eval_prompts, rollouts,
                                                                            rollout_cfg, params)
        self.critic, self.engine, self.reference_fn, self.autocast = critic, engine, reference_fn, autocast
        self.micro, self.accum, self.world, self.rank, self.seed = micro, accum, world, rank, seed
        self.pad_id, self.layout, self.device, self.run_dir, self.accelerator = (pad_id, layout, device, run_dir,
                                                                                 accelerator)
        self.companions = {"critic": critic}
        self.learning_rates = {} if rollout_cfg.critic_learning_rate is None else {
            "critic": rollout_cfg.critic_learning_rate}
        self.epochs, self.minibatches = rollout_cfg.ppo_epochs, rollout_cfg.minibatches
        self.steps_per_rollout = self.epochs * self.minibatches
        self.per_minibatch = micro * accum  # this process's prompts per minibatch
        self.rollouts_per_epoch = len(prompts) // (self.per_minibatch * self.minibatches * world)
        self.steps_per_epoch = self.rollouts_per_epoch * self.steps_per_rollout
        self.kl = (AdaptiveKLController(params["kl_coef"], params["target_kl"], params["kl_horizon"])
                   if params["target_kl"] is not None else None)
        self.kl_coef = float(params["kl_coef"])
        self._rollout: dict | None = None
        self._next = 0  # index of the next rollout
        self._metrics: dict[str, Any] = {}

    def forward(self, engine: LogpModel) -> LogpModel:
        """The training forward: the run's engine with the critic as a submodule (DDP then syncs it)."""
        return engine.with_critic(self.critic)

    # ---- the rollout ---------------------------------------------------------------------------------------
    def _positions(self, index: int) -> list[int]:
        """Epoch-order positions of this process's prompts in rollout ``index`` (minibatch-major)."""
        return epoch_positions(index % self.rollouts_per_epoch, self.minibatches * self.accum, self.micro,
                               self.world, self.rank)

    def _perm(self, index: int, epoch: int) -> list[int]:
        """The order of this process's rollout prompts in ``epoch``: a function of (seed, rollout, epoch, rank)."""
        g = torch.Generator().manual_seed(rollout_seed(self.seed, index, 7919 * epoch + self.rank) % 2**62)
        return torch.randperm(self.per_minibatch * self.minibatches, generator=g).tolist()

    def _layout(self, rollout: dict, part: list[int]):
        groups = [TokenizedGroup(self.data.prompt_ids[rollout["indices"][u]], rollout["completions"][u])
                  for u in part]
        return LAYOUTS[self.layout](groups, self.pad_id)

    def _score(self, rollout: dict) -> dict[str, list]:
        """π_old, V_old and π_ref per token of every sample, [prompt][sample] -> list, from no-grad passes of the
        training engine in the first epoch's micro-batch layout (so the first ratio is exactly 1)."""
        P, G = len(rollout["indices"]), len(rollout["completions"][0])
        out = {key: [[None] * G for _ in range(P)] for key in ("old", "values", "ref")}
        order = self._perm(rollout["index"], 0)
        T = self.rc.temperature
        with torch.no_grad(), self.autocast():
            for start in range(0, P, self.micro):
                part = order[start : start + self.micro]
                seqs = self._layout(rollout, part).to(self.device)
                tok, _, values = self.engine(*seqs.model_args(), per_token=True, temperature=T, values=True)
                ref = self.reference_fn(_Scoring(seqs, T))[0] if self.reference_fn is not None else tok
                S, ts = seqs.num_sequences, seqs.target_seq
                for key, flat in (("old", tok), ("values", values), ("ref", ref)):
                    rows = padded(flat.float(), ts, S).cpu()  # (S, T)
                    for s in range(S):
                        j, k = s % len(part), s // len(part)  # sequence s = j + k·P_mb
                        u = part[j]
                        out[key][u][k] = rows[s, : len(rollout["completions"][u][k])].tolist()
        return out

    def _make_rollout(self, step: int) -> dict:
        index = self._next
        self._next += 1
        order = epoch_order(len(self.data), self.seed, index // self.rollouts_per_epoch)
        positions = self._positions(index)
        indices = [order[q] for q in positions]
        out = self.rollouts.sample(indices, [rollout_seed(self.seed, index, q) for q in positions])
        rollout = {"index": index, "start": step, "stopped": None, "indices": indices,
                   "completions": [[list(c.ids) for c in g] for g in out["completions"]]}
        scores = torch.tensor(out["rewards"], dtype=torch.float32)  # (P, G), NaN: no function scored it
        use = ~torch.isnan(scores)
        rollout["use"], rollout["scores"] = use.tolist(), out["rewards"].tolist()
        beta = self.kl.value if self.kl is not None else self.kl_coef
        stats = self.rollouts.stats(out)
        signal = self._global(float(use.sum()))
        rollout["signal"] = signal
        if signal > 0:
            per_token = self._score(rollout)
            shaped, more = self._shape(rollout, per_token, scores, use, beta)
            rollout.update(shaped)
            stats.update(more)
        stats.update({"ppo/kl_coef": beta, "ppo/rollout": float(index)})
        rollout["stats"] = stats
        rollout["rows"] = [{"prompt": self.data.prompts[i], "completions": t, "rewards": r.tolist()}
                           for i, t, r in zip(indices, out["texts"], out["rewards"])][:8]
        return rollout

    def _shape(self, rollout: dict, per_token: dict, scores: torch.Tensor, use: torch.Tensor, beta: float):
        """Rewards shaped per token, GAE, whitening, and the rollout's statistics (over every process)."""
        flat = [(u, k) for u in range(scores.shape[0]) for k in range(scores.shape[1])]  # sequence u·G + k
        lengths = [len(rollout["completions"][u][k]) for u, k in flat]

        def grid(key):  # (S, T) right-padded
            out = torch.zeros(len(flat), max(lengths))
            for s, (u, k) in enumerate(flat):
                out[s, : lengths[s]] = torch.tensor(per_token[key][u][k])
            return out

        old, values, ref = grid("old"), grid("values"), grid("ref")  # (S, T) each
        real = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).float()  # (S, T)
        used = use.reshape(-1).float()  # (S,)
        score = torch.nan_to_num(scores.reshape(-1), nan=0.0)  # (S,); unscored rows are masked out below
        rewards = kl_penalty_rewards(score, old, ref, real, kl_coef=beta)  # (S, T)
        advantages, returns = adv.gae(rewards, values, real, gamma=self.rc.gamma, lam=self.rc.gae_lambda)
        mask = real * used[:, None]  # (S, T) loss-bearing tokens
        raw_mean, raw_std = self._moments(advantages, mask)
        whitened = self._whiten(advantages, mask) if self.rc.whiten_advantages else advantages * mask
        kl_seq = ((old - ref) * real).sum(1)  # (S,) Σ_t log π_old − log π_ref: the per-sequence KL (k1)
        penalty = -beta * kl_seq  # (S,) the KL part of each sequence's shaped return
        n_seq, kl_sum, pen_abs, score_abs = self._sums(used.sum(), (kl_seq * used).sum(), (penalty.abs() * used).sum(),
                                                       (score.abs() * used).sum())
        kl_mean = kl_sum / max(n_seq, 1.0)
        if self.kl is not None:  # this rollout was shaped with β; the next one gets the updated β
            self.kl.update(kl_mean, int(n_seq))
        ret_mean, ret_std = self._moments(returns, mask)
        _, err_std = self._moments(returns - values, mask)
        stats = {"ppo/advantages_mean": raw_mean, "ppo/advantages_std": raw_std, "ppo/returns_mean": ret_mean,
                 "ppo/returns_std": ret_std,
                 "ppo/explained_variance": 1.0 - err_std**2 / ret_std**2 if ret_std > 0 else math.nan,
                 "ppo/kl_ref": kl_mean, "ppo/kl_penalty": -beta * kl_mean,
                 "ppo/kl_penalty_share": pen_abs / (pen_abs + score_abs) if pen_abs + score_abs > 0 else 0.0}

        def nested(t):  # (S, T) -> [prompt][sample] -> list over the sample's tokens
            rows = [t[s, : lengths[s]].tolist() for s in range(len(flat))]
            G = scores.shape[1]
            return [rows[u * G : (u + 1) * G] for u in range(scores.shape[0])]

        shaped = {"old_logps": nested(old), "old_values": nested(values), "advantages": nested(whitened),
                  "returns": nested(returns)}
        return shaped, stats

    # ---- statistics over every process --------------------------------------------------------------------
    def _sums(self, *values) -> list[float]:
        return process_sums(self.accelerator, self.world, *values)

    def _global(self, n: float) -> float:
        return self._sums(n)[0]

    def _moments(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
        """Masked mean and population std of ``x`` over the whole rollout (every process), two passes."""
        n, total = self._sums(mask.sum(), (x * mask).sum())
        if n == 0:
            return 0.0, 0.0
        mean = total / n
        (sq,) = self._sums((((x - mean) * mask) ** 2).sum())
        return mean, math.sqrt(sq / n)

    def _whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``advantages.whiten`` over the rollout of every process: (x − μ) / (σ + 1e-8) on the mask, else 0."""
        if self.world == 1 or self.accelerator is None:
            return adv.whiten(x, mask)
        mean, std = self._moments(x, mask)
        return torch.where(mask > 0, (x - mean) / (std + 1e-8), torch.zeros_like(x))

    # ---- micro-batches -------------------------------------------------------------------------------------
    def micro_batches(self, step: int):
        r = self._rollout
        if r is None or r["stopped"] is not None or step - r["start"] >= self.steps_per_rollout:
            previous = None if r is None else (r["stopped"] or self.steps_per_rollout)
            r = self._rollout = self._make_rollout(step)
            if previous is not None:
                r["stats"]["ppo/previous_rollout_steps"] = float(previous)
        epoch, m = divmod(step - r["start"], self.minibatches)
        self._metrics = {**r["stats"], "ppo/epoch": float(epoch)}
        if step != r["start"]:  # a reused rollout: its generation was paid for when it was sampled
            self._metrics.update({"time/generate_s": 0.0, "time/score_s": 0.0})
        if r["signal"] == 0:
            self._metrics["rollout/why"] = "no sample of the rollout was scored"
            return
        part = self._perm(r["index"], epoch)[m * self.per_minibatch : (m + 1) * self.per_minibatch]
        n_seq = sum(sum(r["use"][u]) for u in part)
        n_tok = sum(len(c) for u in part for c, ok in zip(r["completions"][u], r["use"][u]) if ok)
        step_sequences, step_tokens = self._sums(n_seq, n_tok)
        for a in range(self.accum):
            yield self._batch(r, part[a * self.micro : (a + 1) * self.micro], max(step_sequences, 1.0),
                              max(step_tokens, 1.0)).to(self.device)

    def _batch(self, r: dict, part: list[int], step_sequences: float, step_tokens: float) -> PPOBatch:
        G = len(r["completions"][0])
        seqs = [(u, k) for k in range(G) for u in part]  # sequence j + k·P_mb: completion k of prompt part[j]
        width = max(len(r["completions"][u][k]) for u, k in seqs)

        def grid(key):
            out = torch.zeros(len(seqs), width)
            for s, (u, k) in enumerate(seqs):
                values = r[key][u][k]
                out[s, : len(values)] = torch.tensor(values)
            return out

        use = torch.tensor([float(r["use"][u][k]) for u, k in seqs])  # (S,)
        lengths = torch.tensor([len(r["completions"][u][k]) for u, k in seqs])
        mask = (torch.arange(width)[None, :] < lengths[:, None]).float() * use[:, None]  # (S, T)
        return PPOBatch(self._layout(r, part), old_logps=grid("old_logps"), old_values=grid("old_values"),
                        advantages=grid("advantages"), returns=grid("returns"), mask=mask, seq_mask=use,
                        step_sequences=step_sequences, step_tokens=step_tokens, world_size=self.world,
                        temperature=self.rc.temperature)

    # ---- the contract --------------------------------------------------------------------------------------
    def after_step(self, step: int, values: dict) -> None:
        """Early stop: after a step whose approximate KL to the rollout policy exceeds ``rollout.early_stop_kl``,
        the rest of the rollout's epochs are skipped (the next step samples anew). ``values`` are the step's
        metrics, averaged over processes, so every process decides alike."""
        r, bound = self._rollout, self.rc.early_stop_kl
        if bound is None or r is None or r["stopped"] is not None:
            return
        kl = values.get("policy/approx_kl_k3")
        done = step - r["start"] + 1
        if kl is not None and kl > bound and done < self.steps_per_rollout:
            r["stopped"] = done

    def metrics(self, step: int) -> dict[str, Any]:
        return dict(self._metrics)

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out rewards of greedy samples; the current rollout's first prompts go to ``samples.jsonl``."""
        if self.run_dir is not None and self._rollout is not None:
            with open(self.run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
                for row in self._rollout["rows"]:
                    f.write(json.dumps({"step": step, "kind": "rollout", **row}, default=str) + "\n")
        return self.rollouts.evaluate(self.eval_prompts)

    def state_dict(self) -> dict:
        """The rollout in use, the rollout counter and the KL coefficient (resume continues them exactly)."""
        return {"rollout": self._rollout, "next": self._next,
                "kl": self.kl.state_dict() if self.kl is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self._rollout = state.get("rollout")
        self._next = state.get("next", 0)
        if self.kl is not None and state.get("kl") is not None:
            self.kl.load_state_dict(state["kl"])


class _Scoring:
    """The sequences of a rollout micro-batch as the reference scorer reads them (per-token, tempered)."""

    def __init__(self, seqs, temperature: float):
        self.seqs, self.temperature = seqs, temperature

    def model_args(self) -> tuple:
        return self.seqs.model_args()

    def model_kwargs(self) -> dict:
        return {"per_token": True, "temperature": self.temperature}


def build_critic(spec: str, policy: nn.Module, tokenizer) -> nn.Module:
    """``rollout.critic``: ``head`` (a value head on the policy's trunk), ``policy`` (a copy of the initial
    policy's trunk with a new head) or a reward model's path (its trunk and score head). Trains in full."""
    if spec == "head":
        return ValueHead(hidden_size_of(policy))
    if spec == "policy":
        base = copy.deepcopy(policy)
        if is_peft(base):  # the initial policy: the adapter is still zero, merging it gives the base weights
            base = base.merge_and_unload()
        head = nn.Linear(hidden_size_of(base), 1)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        critic = Critic(decoder_of(base), head)
    else:
        try:
            rm = load_reward_model(spec, tokenizer)
        except PreftuneError as e:
            raise ConfigError(f"rollout.critic {spec!r}: {e} (the critic is `head`, `policy` or a reward model's "
                              "path or hub id)") from None
        head = getattr(rm, "score", None)
        if not isinstance(head, nn.Linear):
            raise ConfigError(f"rollout.critic {spec!r}: a critic reads a decoder's hidden state at every token, "
                              f"so it needs a causal-LM reward model with a `score` head ({type(rm).__name__} "
                              "has none)")
        vocab = (rm.config.vocab_size, getattr(getattr(policy, "config", None), "vocab_size", rm.config.vocab_size))
        if vocab[0] != vocab[1]:
            raise ConfigError(f"rollout.critic {spec!r}: vocabulary of {vocab[0]} tokens, the policy's has "
                              f"{vocab[1]}; the critic reads the policy's token ids, so it needs the same tokenizer")
        critic = Critic(decoder_of(rm), head)
    for p in critic.parameters():
        p.requires_grad_(True)
    return critic


def build_ppo_source(cfg, train_prompts: PromptSet, eval_prompts: PromptSet, *, policy, tokenizer, functions,
                     run_dir, accelerator, reference_fn=None, micro, accum, world, rank, seed, pad_id, layout,
                     device, autocast):
    rc = cfg.rollout
    per_rollout = micro * accum * rc.minibatches * world
    if len(train_prompts) < per_rollout:
        raise ConfigError(f"{len(train_prompts)} training prompts are fewer than one PPO rollout needs ({micro} per "
                          f"device x {accum} accumulation x {rc.minibatches} minibatches x {world} processes)")
    params = get_loss("ppo").resolve_params(cfg.loss.params)
    critic = build_critic(rc.critic, policy, tokenizer).to(device)
    disable_dropout(policy)  # rollout and training passes alike: the ratio and the values are deterministic
    disable_dropout(critic)
    critic.train()
    rollouts = Rollouts(train_prompts, policy=policy, tokenizer=tokenizer, functions=functions, rollout_cfg=rc,
                        reward_cfg=cfg.reward, pad_id=pad_id, autocast=autocast)
    return PPOSource(train_prompts, eval_prompts, rollouts, rollout_cfg=rc, params=params, critic=critic,
                     engine=LogpModel(policy, cfg.engine.chunk_size, critic=critic),
                     reference_fn=reference_fn if params["kl_coef"] != 0 else None, micro=micro, accum=accum,
                     world=world, rank=rank, seed=seed, pad_id=pad_id, layout=layout, device=device, run_dir=run_dir,
                     accelerator=accelerator, autocast=autocast)
