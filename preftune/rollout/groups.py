"""GRPO's experience source: every step, G samples of each prompt from the current policy, scored, turned into
group-relative advantages, and handed to the loop as :class:`~preftune.data.batch.GroupBatch` micro-batches.

    prompts of the step -> G samples each (``preftune.generation``, the prompt prefilled once per group)
    -> rewards (weighted reward functions / judges) -> advantages (``preftune.advantages``: group_relative,
    rloo or REINFORCE++-style whitening) -> micro-batches of whole groups, each prompt run once in the forward

``per_device_batch_size`` counts prompts per micro-batch; a micro-batch holds its prompts' whole groups.
The policy-gradient loss is normalized over the WHOLE optimizer step (``step_sequences`` / ``step_tokens``
summed over micro-batches and processes), so accumulation and process count leave the gradient unchanged.

``rollout.num_iterations`` μ > 1: the rollout sampled at step k is trained on at steps k .. k+μ−1, with π_old
its per-token log-probs from a no-grad pass of the training engine right after sampling (not the sampler's
own log-probs: the KV-cache decode and the packed training forward differ in rounding, and the ratio must
start at exactly 1). The rollout is part of the checkpoint, so a run killed between k and k+μ−1 resumes on it.
With μ = 1, π_old is the current policy detached (ratio 1, the gradient of REINFORCE with these advantages).

A step whose every group has zero reward spread has no policy-gradient signal: it is skipped and said so
("all rewards equal: no learning signal") rather than logged as a loss of 0; ``rollout.dynamic_sampling``
(DAPO) replaces such groups with fresh prompts first, up to ``rollout.max_resample_rounds`` rounds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preftune import advantages as adv
from preftune.data.batch import GroupBatch
from preftune.data.layouts import LAYOUTS
from preftune.data.packing import epoch_order
from preftune.data.prompts import PromptSet
from preftune.data.tokenize import TokenizedGroup
from preftune.logprobs import LogpModel
from preftune.rollout.online import Rollouts, epoch_positions, process_sums, rollout_seed

ESTIMATORS = ("grpo", "rloo", "reinforce_pp")


def advantages_of(rewards: torch.Tensor, estimator: str, scale: str) -> torch.Tensor:
    """(P, G) rewards (NaN: no score) -> (P, G) advantages by the configured estimator."""
    if estimator == "grpo":
        return adv.group_relative(rewards, scale=scale)
    if estimator == "rloo":
        return adv.rloo(rewards)
    if estimator == "reinforce_pp":  # group mean removed, then whitened over the batch (REINFORCE++ baseline)
        centred = adv.group_relative(rewards, scale="none")
        return adv.whiten(centred, ~torch.isnan(rewards))
    raise ValueError(f"unknown advantage estimator {estimator!r}; one of {ESTIMATORS}")


class GroupSource:
    """GRPO / RLOO / REINFORCE++ groups as an experience source (module docstring)."""

    static = False

    def __init__(self, prompts: PromptSet, eval_prompts: PromptSet, rollouts: Rollouts, *, rollout_cfg,
                 estimator: str, scale: str, micro: int, accum: int, world: int, rank: int, seed: int, pad_id: int,
                 layout: str, device, run_dir: Path | None, accelerator, logp: LogpModel, autocast):
        self.data, self.eval_prompts, self.rollouts, self.rc = prompts, eval_prompts, rollouts, rollout_cfg
        self.estimator, self.scale = estimator, scale
        self.micro, self.accum, self.world, self.rank, self.seed = micro, accum, world, rank, seed
        self.pad_id, self.layout, self.device, self.run_dir = pad_id, layout, device, run_dir
        self.accelerator, self.logp, self.autocast = accelerator, logp, autocast
        self.steps_per_epoch = len(prompts) // (micro * world * accum)
        self.writer = None  # the run's MetricWriter, for the completions table in TensorBoard (set by the run)
        self._rollout: dict | None = None
        self._metrics: dict[str, Any] = {}

    # ---- the rollout of a step ---------------------------------------------------------------------------
    def _sample(self, step: int) -> dict:
        """This process's groups for ``step``: prompt indices, completions, rewards (P, G), stats."""
        order = epoch_order(len(self.data), self.seed, step // self.steps_per_epoch)
        positions = epoch_positions(step % self.steps_per_epoch, self.accum, self.micro, self.world, self.rank)
        indices = [order[q] for q in positions]
        out = self.rollouts.sample(indices, [rollout_seed(self.seed, step, q) for q in positions])
        out["indices"] = indices
        out["zero_spread"] = _zero_spread(out["rewards"])  # (P,) as first sampled, before any refill
        out["refilled"], out["rounds"] = 0, 0
        if self.rc.dynamic_sampling:
            out = self._refill(step, out)
        return out

    def _refill(self, step: int, out: dict) -> dict:
        """DAPO's dynamic sampling: groups with zero reward spread are replaced by groups of fresh prompts
        (drawn from a permutation that is a function of (seed, step, round)), while any remain and rounds last."""
        for r in range(self.rc.max_resample_rounds):
            flat = _zero_spread(out["rewards"])
            if not flat.any():
                break
            need = min(int(flat.sum()), len(self.data))
            g = torch.Generator().manual_seed(rollout_seed(self.seed, step, -(r + 1) - 7919 * self.rank) % 2**62)
            extra_idx = torch.randperm(len(self.data), generator=g)[:need].tolist()
            extra = self.rollouts.sample(extra_idx, [rollout_seed(self.seed, step, 10**9 + r * 10**6 + self.rank * 10**4
                                                                  + j) for j in range(need)])
            slots = np.flatnonzero(flat)[:need]
            out["refilled"] += need
            out["rounds"] += 1
            for j, slot in enumerate(slots):
                for key in ("completions", "texts"):
                    out[key][slot] = extra[key][j]
                out["indices"][slot] = extra_idx[j]
                out["rewards"][slot] = extra["rewards"][j]
                out["scores"][:, slot] = extra["scores"][:, j]
            out["generate_s"] += extra["generate_s"]
            out["score_s"] += extra["score_s"]
        return out

    def _make_rollout(self, step: int) -> dict:
        out = self._sample(step)
        rewards = torch.tensor(out["rewards"], dtype=torch.float32)  # (P, G), NaN: unscored
        if self.scale == "batch" or self.estimator == "reinforce_pp":
            rewards_all = self._gather(rewards)
            advantages = advantages_of(rewards_all, self.estimator, self.scale)
            advantages = advantages[self.rank * rewards.shape[0]: (self.rank + 1) * rewards.shape[0]]
        else:
            advantages = advantages_of(rewards, self.estimator, self.scale)
        truncated = [[c.finish_reason != "stop" for c in g] for g in out["completions"]]
        use = ~torch.isnan(rewards)
        if self.rc.mask_truncated_completions:
            use &= ~torch.tensor(truncated)
        stats = self.rollouts.stats(out)
        # (P,) the trained groups without a reward spread (after any refill; as sampled when nothing refills)
        flat = _zero_spread(out["rewards"]) if self.rc.dynamic_sampling else out["zero_spread"]
        stats.update({"rollout/frac_reward_zero_std": float(out["zero_spread"].mean()),
                      "rollout/truncated_fraction": float(np.mean(truncated)),
                      "advantages/mean": float(advantages[use].mean()) if use.any() else 0.0,
                      "advantages/std": float(advantages[use].std()) if use.sum() > 1 else 0.0})
        if self.rc.dynamic_sampling:
            stats.update({"rollout/refilled_groups": float(out["refilled"]),
                          "rollout/resample_rounds": float(out["rounds"]),
                          "rollout/frac_reward_zero_std_trained": float(flat.mean())})
        rollout = {"step": step, "indices": out["indices"],
                   "completions": [[list(c.ids) for c in g] for g in out["completions"]],
                   "advantages": advantages.tolist(), "use": use.tolist(), "stats": stats,
                   "rows": self._table(out, advantages, truncated)}
        signal = self._global(float(((advantages != 0) & use).sum()))
        rollout["signal"] = signal
        if signal == 0:  # say why, with the whole step's rewards (every process takes part in the gather)
            finite = out["rewards"][np.isfinite(out["rewards"])]
            lo_hi = torch.tensor([[finite.min(), finite.max()] if finite.size else [math.inf, -math.inf]])  # (1, 2)
            lo_hi = self._gather(lo_hi)  # (W, 2)
            lo, hi = float(lo_hi[:, 0].min()), float(lo_hi[:, 1].max())
            spread = self._global(float((~flat).sum()))  # groups with a reward spread
            rollout["why"] = ("no completion was scored (every reward function returned None)" if lo > hi
                              else "all rewards equal" if lo == hi
                              else "all rewards equal within each group" if spread == 0
                              else "every completion with a nonzero advantage is masked "
                                   "(rollout.mask_truncated_completions: they were truncated)")
        if signal > 0 and self.rc.num_iterations > 1:
            rollout["old_logps"] = self._old_logps(rollout)
        return rollout

    def _table(self, out: dict, advantages: torch.Tensor, truncated: list[list[bool]], groups: int = 4) -> list[dict]:
        """The completions table of the first ``groups`` groups: one row per completion with its prompt, text,
        reward (and each function's score), advantage and finish reason (NaN: None, JSON has no NaN)."""
        def num(x) -> float | None:
            return float(x) if math.isfinite(x) else None

        rows = []
        for p, i in enumerate(out["indices"][:groups]):
            for k, text in enumerate(out["texts"][p]):
                rows.append({"group": p, "prompt": self.data.prompts[i], "completion": text,
                             "reward": num(out["rewards"][p][k]),
                             "scores": {f.name: num(sc[p][k]) for f, sc in zip(self.rollouts.functions,
                                                                                out["scores"])},
                             "advantage": float(advantages[p, k]), "truncated": truncated[p][k]})
        return rows

    def _old_logps(self, rollout: dict) -> list[list[float]]:
        """π_old per token of every micro-batch of the rollout, from the training engine without gradients."""
        out = []
        with torch.no_grad(), self.autocast():
            for batch in self._batches(rollout):
                tok, _ = self.logp(*batch.model_args(), **batch.model_kwargs())
                out.append(tok.float().cpu().tolist())
        return out

    # ---- micro-batches -----------------------------------------------------------------------------------
    def micro_batches(self, step: int):
        start = step - step % self.rc.num_iterations
        if self._rollout is None or self._rollout["step"] != start:
            self._rollout = self._make_rollout(start)
        rollout = self._rollout
        self._metrics = dict(rollout["stats"])
        if step != start:  # a reused rollout: its generation was paid for at step `start`
            self._metrics.update({"time/generate_s": 0.0, "time/score_s": 0.0})
        if rollout["signal"] == 0:
            self._metrics["rollout/why"] = rollout["why"]
            return
        yield from self._batches(rollout, with_old=True)

    def _batches(self, rollout: dict, with_old: bool = False):
        """The rollout's ``accum`` micro-batches of ``micro`` whole groups each."""
        groups = [TokenizedGroup(self.data.prompt_ids[i], comps)
                  for i, comps in zip(rollout["indices"], rollout["completions"])]
        adv_t = torch.tensor(rollout["advantages"], dtype=torch.float32)  # (P, G)
        use = torch.tensor(rollout["use"], dtype=torch.float32)  # (P, G)
        if "counts" not in rollout:  # the global normalizers of the step
            tokens = sum(len(c) * u for g, us in zip(rollout["completions"], rollout["use"]) for c, u in zip(g, us))
            rollout["counts"] = (self._global(float(use.sum())), self._global(float(tokens)))
        step_sequences, step_tokens = rollout["counts"]
        old = rollout.get("old_logps") if with_old else None
        for m in range(self.accum):
            part = slice(m * self.micro, (m + 1) * self.micro)
            batch = GroupBatch(LAYOUTS[self.layout](groups[part], self.pad_id),
                               advantages=adv_t[part].T.reshape(-1),  # (S,) sequence u + k·P
                               seq_mask=use[part].T.reshape(-1), step_sequences=max(step_sequences, 1.0),
                               step_tokens=max(step_tokens, 1.0), max_length=self.rc.max_new_tokens,
                               world_size=self.world, temperature=self.rc.temperature,
                               old_logps=None if old is None else torch.tensor(old[m]))
            yield batch.to(self.device)

    def _gather(self, rewards: torch.Tensor) -> torch.Tensor:
        if self.world == 1 or self.accelerator is None:
            return rewards
        return self.accelerator.gather(rewards.to(self.accelerator.device)).cpu()

    def _global(self, n: float) -> float:
        return process_sums(self.accelerator, self.world, n)[0]

    # ---- the contract ------------------------------------------------------------------------------------
    def metrics(self, step: int) -> dict[str, Any]:
        return dict(self._metrics)

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out rewards of greedy samples; the last rollout's completions table (its first groups) goes to
        ``samples.jsonl`` (kind "rollout") and to TensorBoard (tag ``rollout``, when the run gave a writer)."""
        if self.run_dir is not None and self._rollout is not None:
            rows = self._rollout["rows"]
            with open(self.run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps({"step": step, "kind": "rollout", "rollout_step": self._rollout["step"],
                                        **row}, default=str) + "\n")
            if self.writer is not None:
                self.writer.text(step, "rollout", completions_markdown(rows))
        return self.rollouts.evaluate(self.eval_prompts)

    def state_dict(self) -> dict:
        # The rollout in use: a run killed while reusing it (num_iterations > 1) must resume on the same one.
        if self._rollout is None or self.rc.num_iterations == 1:
            return {}
        return {"rollout": self._rollout}

    def load_state_dict(self, state: dict) -> None:
        self._rollout = state.get("rollout")


def completions_markdown(rows: list[dict]) -> str:
    """The completions table as markdown (TensorBoard's text tab): prompt, completion, reward, advantage."""
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    def num(x) -> str:
        return "—" if x is None else f"{x:.3g}"

    head = "| group | prompt | completion | reward | advantage | truncated |\n|---|---|---|---|---|---|\n"
    return head + "\n".join(f"| {r['group']} | {cell(r['prompt'])} | {cell(r['completion'])} | {num(r['reward'])} | "
                             f"{num(r['advantage'])} | {'yes' if r['truncated'] else ''} |" for r in rows)


def _zero_spread(rewards: np.ndarray) -> np.ndarray:
    """(P,) True for a group whose scored rewards are all equal (or that has fewer than two scores)."""
    out = []
    for row in rewards:
        scored = row[np.isfinite(row)]
        out.append(len(scored) < 2 or float(scored.max() - scored.min()) == 0.0)
    return np.array(out, dtype=bool)


def build_group_source(cfg, train_prompts: PromptSet, eval_prompts: PromptSet, *, policy, tokenizer, functions,
                       run_dir, accelerator, micro, accum, world, rank, seed, pad_id, layout, device,
                       autocast, reference_fn=None):  # the step scores the reference itself
    rollouts = Rollouts(train_prompts, policy=policy, tokenizer=tokenizer, functions=functions,
                        rollout_cfg=cfg.rollout, reward_cfg=cfg.reward, pad_id=pad_id, autocast=autocast)
    return GroupSource(train_prompts, eval_prompts, rollouts, rollout_cfg=cfg.rollout,
                       estimator=cfg.rollout.advantage_estimator, scale=cfg.rollout.scale_rewards, micro=micro,
                       accum=accum, world=world, rank=rank, seed=seed, pad_id=pad_id, layout=layout, device=device,
                       run_dir=run_dir, accelerator=accelerator, logp=LogpModel(policy, cfg.engine.chunk_size),
                       autocast=autocast)
