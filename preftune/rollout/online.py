"""Online DPO's experience source: every step the current policy samples, the rewards pick, DPO learns.

    prompts of the step -> N samples each from the current policy (``preftune.generation``) -> rewards
    (reward functions / judges, ``scoring.py``) -> per prompt the best vs the worst sample -> pairs

A prompt gives no pair when fewer than two of its samples have a score, or when best and worst differ by no
more than ``reward.min_margin`` (ties: always), or the two token sequences are identical; it is counted in
``rollout/skipped_fraction``. The step's loss is the mean over its pairs, however many each process and
micro-batch get (``PreferenceBatch.weights``); a step with no pair anywhere makes no update.

Reproducible and resumable: the prompts of a step come from the epoch order, a function of (seed, epoch),
and sample j of the prompt at position q of the epoch is drawn with the seed ``rollout_seed(seed, step, q)``
and index j; the samples then depend only on (seed, step) and the current weights. The reference is scored
live (``static = False``): an on-policy source never precomputes reference log-probs.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preftune.data.batch import PreferenceBatch
from preftune.data.layouts import LAYOUTS
from preftune.data.packing import epoch_order
from preftune.data.prompts import PromptSet
from preftune.data.tokenize import TokenizedPair
from preftune.generation import SamplingParams, generate, sample_seed, stop_ids
from preftune.rewards import soft_overlong_penalty
from preftune.rollout.scoring import RewardFunction, check_functions, score_completions


def rollout_seed(seed: int, step: int, position: int) -> int:
    """The sampling seed of the prompt at ``position`` of the epoch order, at optimizer step ``step``."""
    return sample_seed(seed * 1_000_003 + step, position)


def epoch_positions(k: int, micro_batches: int, micro: int, world: int, rank: int) -> list[int]:
    """Epoch-order positions of this process's prompts for the k-th optimizer step (or rollout) of an epoch
    made of ``micro_batches`` micro-batches of ``micro`` prompts per process: micro-batch m on rank r takes
    ``(k·B + m)·M·W + r·M ...`` (B micro-batches, M prompts, W processes), as the static source picks examples,
    so the prompts of a step do not depend on how it is split over processes."""
    out = []
    for m in range(micro_batches):
        at = (k * micro_batches + m) * micro * world + rank * micro
        out.extend(range(at, at + micro))
    return out


def process_sums(accelerator, world: int, *values: float) -> list[float]:
    """``values`` summed over every process (unchanged in a single process), in float64."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if world > 1 and accelerator is not None:
        t = accelerator.reduce(t.to(accelerator.device), reduction="sum").cpu()
    return t.tolist()


class Rollouts:
    """Sampling and scoring shared by the on-policy sources: generate N samples per prompt, decode them, score
    them with every reward function and combine (weighted sum of the scored functions, a None masked).

    ``autocast``: the run's compute-precision context factory (``torch.autocast`` bf16 under
    ``training.precision: bf16``, a no-op in fp32). Sampling runs inside ONE such region per ``generate`` call,
    so the samples come from the same (bf16) policy whose log-probs the loss, π_old and the reference compute,
    and autocast casts each weight once per call (its cast cache lives as long as the region).
    """

    def __init__(self, prompts: PromptSet, *, policy, tokenizer, functions: list[RewardFunction], rollout_cfg,
                 reward_cfg, pad_id: int, autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext):
        self.prompts, self.policy, self.tokenizer, self.functions = prompts, policy, tokenizer, functions
        self.rc, self.reward_cfg, self.pad_id, self.autocast = rollout_cfg, reward_cfg, pad_id, autocast
        self.params = SamplingParams(max_new_tokens=rollout_cfg.max_new_tokens, temperature=rollout_cfg.temperature,
                                     top_p=rollout_cfg.top_p, top_k=rollout_cfg.top_k,
                                     n=rollout_cfg.num_generations, stop_ids=stop_ids(policy, tokenizer))
        if len(prompts):  # a broken reward function fails now, not after the first rollout
            check_functions(functions, prompts.prompts[0], {k: v[0] for k, v in prompts.columns.items()})

    def sample(self, indices: list[int], seeds: list[int] | None, params: SamplingParams | None = None) -> dict:
        """Samples of the prompts at ``indices`` (greedy when ``seeds`` is None) and their rewards, sampled under
        the run's autocast (see the class docstring).

        Returns a dict with ``completions`` (list per prompt of ``generation.Completion``), ``texts`` (per prompt,
        per sample), ``scores`` (F, P, N) with NaN for None, ``rewards`` (P, N) (NaN where no function scored),
        and ``generate_s`` / ``score_s`` timings.
        """
        params = params or self.params
        t0 = time.perf_counter()
        with self.autocast():
            groups = generate(self.policy, [self.prompts.prompt_ids[i] for i in indices], params, seeds,
                              pad_id=self.pad_id, batch_size=max(1, self.rc.generation_batch_size * params.n))
        t1 = time.perf_counter()
        stops = set(params.stop_ids)
        texts = [[self.tokenizer.decode([t for t in c.ids if t not in stops], skip_special_tokens=True)
                  for c in g] for g in groups]
        n = len(groups[0]) if groups else 0
        flat_prompts, flat_completions, flat_ids = [], [], []
        for i, g, ts in zip(indices, groups, texts):
            prompt = self.prompts.prompts[i]
            for c, text in zip(g, ts):
                flat_prompts.append(prompt)
                flat_completions.append([{"role": "assistant", "content": text}] if isinstance(prompt, list) else text)
                flat_ids.append([t for t in c.ids if t not in stops])
        columns = {k: [v for v in vals for _ in range(n)] for k, vals in self.prompts.columns_of(indices).items()}
        columns["completion_ids"] = flat_ids
        scores = np.array(score_completions(self.functions, flat_prompts, flat_completions, columns),
                          dtype=np.float64).reshape(len(self.functions), len(indices), n)  # (F, P, N)
        weights = np.array([f.weight for f in self.functions])[:, None, None]  # (F, 1, 1)
        scored = ~np.isnan(scores)
        rewards = np.where(scored, scores * weights, 0.0).sum(0)  # (P, N)
        rewards[~scored.any(0)] = np.nan  # no function scored this completion
        if self.reward_cfg.missing_eos_penalty:
            truncated = np.array([[c.finish_reason != "stop" for c in g] for g in groups])  # (P, N)
            rewards = rewards - self.reward_cfg.missing_eos_penalty * truncated
        if self.reward_cfg.overlong_buffer:  # DAPO's soft overlong punishment
            lengths = np.array([[len(c.ids) for c in g] for g in groups])  # (P, N)
            rewards = rewards + soft_overlong_penalty(lengths, max_length=params.max_new_tokens,
                                                      buffer=self.reward_cfg.overlong_buffer,
                                                      factor=self.reward_cfg.overlong_penalty)
        return {"completions": groups, "texts": texts, "scores": scores, "rewards": rewards,
                "generate_s": t1 - t0, "score_s": time.perf_counter() - t1}

    def stats(self, out: dict, prefix: str = "") -> dict[str, float]:
        """Reward mean / std in all and per function, completion length, EOS rate, generation throughput."""
        comps = [c for g in out["completions"] for c in g]
        lengths = np.array([len(c.ids) for c in comps], dtype=np.float64)
        m = {f"{prefix}reward/mean": _nanmean(out["rewards"]), f"{prefix}reward/std": _nanstd(out["rewards"])}
        for f, s in zip(self.functions, out["scores"]):
            m[f"{prefix}reward/{f.name}/mean"] = _nanmean(s)
            m[f"{prefix}reward/{f.name}/std"] = _nanstd(s)
        m.update({f"{prefix}completions/mean_length": float(lengths.mean()) if len(lengths) else 0.0,
                  f"{prefix}completions/max_length": float(lengths.max()) if len(lengths) else 0.0,
                  f"{prefix}rollout/eos_rate": float(np.mean([c.finish_reason == "stop" for c in comps]))
                  if comps else 0.0})
        if not prefix:
            m["time/generate_s"] = out["generate_s"]
            m["time/score_s"] = out["score_s"]
            m["rollout/tokens_per_second"] = float(lengths.sum()) / out["generate_s"] if out["generate_s"] else 0.0
        return m

    def evaluate(self, eval_prompts: PromptSet) -> dict[str, float]:
        """Greedy samples of the held-out prompts, scored: the on-policy run's eval metrics. Under the same
        autocast as the training samples, so eval measures the (bf16) policy the loss trains."""
        if not len(eval_prompts):
            return {}
        other = Rollouts.__new__(Rollouts)
        other.__dict__.update(self.__dict__)
        other.prompts = eval_prompts
        greedy = SamplingParams(max_new_tokens=self.params.max_new_tokens, temperature=0.0, n=1,
                                stop_ids=self.params.stop_ids)
        out = other.sample(list(range(len(eval_prompts))), None, greedy)
        stats = other.stats(out)
        return {k: v for k, v in stats.items() if not k.startswith(("time/", "rollout/tokens"))}


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.isfinite(x).any() else math.nan


def _nanstd(x: np.ndarray) -> float:
    return float(np.nanstd(x)) if np.isfinite(x).any() else math.nan


class OnlinePairSource:
    """Online DPO (best vs worst of N on-policy samples per prompt) as an experience source (module docstring).

    ``per_device_batch_size`` counts prompts: micro-batch m of step k on rank r samples the prompts at
    positions ``(k·A + m)·M·W + r·M ...`` of the epoch order, as the static source picks examples.
    """

    static = False

    def __init__(self, prompts: PromptSet, eval_prompts: PromptSet, rollouts: Rollouts, *, micro: int, accum: int,
                 world: int, rank: int, seed: int, pad_id: int, layout: str, device, min_margin: float,
                 run_dir: Path | None, accelerator=None):
        self.data, self.eval_prompts, self.rollouts = prompts, eval_prompts, rollouts
        self.micro, self.accum, self.world, self.rank, self.seed = micro, accum, world, rank, seed
        self.pad_id, self.layout, self.device, self.min_margin = pad_id, layout, device, min_margin
        self.run_dir, self.accelerator = run_dir, accelerator
        self.steps_per_epoch = len(prompts) // (micro * world * accum)
        self._metrics: dict[str, Any] = {}
        self._last: list[dict] = []

    def micro_batches(self, step: int):
        order = epoch_order(len(self.data), self.seed, step // self.steps_per_epoch)
        positions = epoch_positions(step % self.steps_per_epoch, self.accum, self.micro, self.world, self.rank)
        indices = [order[q] for q in positions]
        out = self.rollouts.sample(indices, [rollout_seed(self.seed, step, q) for q in positions])
        pairs, rows = [], []
        for p, i in enumerate(indices):
            pair = self._pair(i, out["completions"][p], out["rewards"][p])
            if pair is not None:
                pairs.append(pair[0])
                rows.append({"prompt": self.data.prompts[i], "chosen": out["texts"][p][pair[1]],
                             "rejected": out["texts"][p][pair[2]],
                             "rewards": [x if math.isfinite(x) else None for x in out["rewards"][p].tolist()]})
        metrics = self.rollouts.stats(out)
        if rows:  # None: a sample without a score (JSON has no NaN)
            metrics["reward/chosen"] = float(np.mean([max(r for r in row["rewards"] if r is not None) for row in rows]))
            metrics["reward/rejected"] = float(np.mean([min(r for r in row["rewards"] if r is not None)
                                                        for row in rows]))
        total = int(process_sums(self.accelerator, self.world, len(pairs))[0])
        metrics["rollout/skipped_fraction"] = 1.0 - len(pairs) / len(indices)
        metrics["rollout/pairs"] = float(total)
        if total == 0:
            metrics["rollout/why"] = self._why(out["rewards"])
        self._metrics, self._last = metrics, rows
        if total == 0:
            return
        padding = pairs[0] if pairs else self._any_pair(indices[0], out["completions"][0])
        chunks = np.array_split(np.arange(len(pairs)), self.accum)
        for chunk in chunks:
            chosen = [pairs[j] for j in chunk] or [padding]
            w = torch.ones(len(chosen)) if len(chunk) else torch.zeros(1)
            yield PreferenceBatch(LAYOUTS[self.layout](chosen, self.pad_id), paired=True, weights=w,
                                  step_examples=total / self.world).to(self.device)

    def _pair(self, i: int, completions: list, rewards: np.ndarray):
        """(TokenizedPair, best sample, worst sample) of prompt ``i``, or None when it gives no pair."""
        valid = [j for j in range(len(completions)) if math.isfinite(rewards[j])]
        if len(valid) < 2:
            return None
        best = max(valid, key=lambda j: rewards[j])
        worst = min(valid, key=lambda j: rewards[j])
        if rewards[best] - rewards[worst] <= self.min_margin or completions[best].ids == completions[worst].ids:
            return None
        p = self.data.prompt_ids[i]
        return TokenizedPair(p, list(completions[best].ids), list(completions[worst].ids)), best, worst

    def _why(self, rewards: np.ndarray) -> str:
        """Why rewards (P, N) gave no pair at all (for the one-time warning)."""
        scored = np.isfinite(rewards).sum(1) >= 2  # (P,)
        if not scored.any():
            return "no prompt has two scored samples (the reward functions returned None)"
        r = rewards[scored]
        if (np.nanmax(r, 1) - np.nanmin(r, 1)).max() <= 0:
            return "all rewards equal within each prompt's samples"
        return f"no prompt's reward spread exceeds reward.min_margin={self.min_margin}"

    def _any_pair(self, i: int, completions: list) -> TokenizedPair:
        """A weight-0 pair for a process that has none (its micro-batches must still run)."""
        a = completions[0].ids
        b = completions[1].ids if len(completions) > 1 else a
        return TokenizedPair(self.data.prompt_ids[i], list(a), list(b))

    def metrics(self, step: int) -> dict[str, Any]:
        return dict(self._metrics)

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out rewards of greedy samples; the last step's pairs go to ``samples.jsonl`` (kind "rollout")."""
        if self.run_dir is not None and self._last:
            with open(self.run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
                for row in self._last:
                    f.write(json.dumps({"step": step, "kind": "rollout", **row}, default=str) + "\n")
        return self.rollouts.evaluate(self.eval_prompts)

    def state_dict(self) -> dict:
        return {}  # prompts and seeds are functions of (seed, step)

    def load_state_dict(self, state: dict) -> None:
        pass


def build_online_source(cfg, train_prompts: PromptSet, eval_prompts: PromptSet, *, policy, tokenizer, functions,
                        run_dir, accelerator, micro, accum, world, rank, seed, pad_id, layout, device,
                        autocast, reference_fn=None):  # the step scores the reference itself
    rollouts = Rollouts(train_prompts, policy=policy, tokenizer=tokenizer, functions=functions,
                        rollout_cfg=cfg.rollout, reward_cfg=cfg.reward, pad_id=pad_id, autocast=autocast)
    return OnlinePairSource(train_prompts, eval_prompts, rollouts, micro=micro, accum=accum, world=world, rank=rank,
                            seed=seed, pad_id=pad_id, layout=layout, device=device,
                            min_margin=cfg.reward.min_margin, run_dir=run_dir, accelerator=accelerator)

