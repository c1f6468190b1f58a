"""The in-training monitor: what the loop calls, in three places.

    monitor = Monitor(cfg, policy, tokenizer, eval_set, ref_model, accelerator, say)   # before the first step
    monitor.after_step(step, train_values, writer)                                     # every optimizer step
    monitor.after_eval(step, eval_values, writer)                                      # inside evaluate()

and ``monitor.stop_reason`` (set by ``max_kl`` or early stopping) ends the loop. Everything it decides is
written to ``metrics.jsonl`` (the single source of reports) as records of its own splits:

    {"step", "split": "monitor", "kl/k1_token", "kl/k3_token", "kl/k1_seq", "kl/k3_seq", "length/policy",
     "length/reference", "length/ratio", "diversity/distinct_1", ..., "diversity/reference_distinct_1", ...}
    {"step", "split": "health", "state", "message", "fix"}      when the margin-health state changes
    {"step", "split": "alarm", "name", "message"}              when an alarm turns on
    {"step", "split": "event", "name": "best" | "early_stopping", "message", ...}

**Where KL comes from.** The log-ratio needs reference log-probs of the *policy's* samples. With LoRA the
reference is the policy with its adapter disabled (no copy); with ``reference.precompute: false`` it is the
frozen model the loop already holds. Otherwise (full fine-tuning with precomputed reference log-probs, the
default; a separate precomputed ``reference.model``; a loss without a reference, where the reference is the
initial policy) no reference weights stay in memory, so they are written once to the run directory before the
first step and read back for the scoring pass of each evaluation (:mod:`preftune.monitor.snapshot`): KL is
measured in every configuration that generates.

**Generations.** At each evaluation, one sampled completion (temperature 1, a fixed seed per prompt) for each
of ``num_prompts`` held-out prompts: KL, lengths and diversity are measured on these (KL estimators need
samples from π; see ``preftune.eval.drift``). The reference's sampled completions, with the same seeds, are
generated once before the first step. Samples for reading are greedy (``preftune.monitor.samples``).

Only the main process generates, judges and writes; the stop decision is shared with the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path

import torch

from preftune.errors import ConfigError
from preftune.eval.drift import completion_token_logps, end_ids, generate_ids, generation_stats, kl_estimates
from preftune.fsio import write_dir_atomic
from preftune.losses import get_loss
from preftune.models import is_peft, reference_mode, save_pretrained
from preftune.monitor import samples as samples_mod
from preftune.monitor.health import check_alarms, diagnose
from preftune.monitor.snapshot import SNAPSHOT_FILE, WeightSnapshot
from preftune.runlog import read_metrics

SAMPLE_SEED = 1234


def metric_direction(metric: str, mode: str) -> str:
    """``min`` or ``max``: ``mode`` unless ``auto``, which maximizes accuracies, margins, rewards and win rates."""
    if mode != "auto":
        return mode
    return "max" if any(w in metric for w in ("accurac", "margin", "reward", "win")) else "min"


def reward_scale(loss_cfg) -> float | None:
    """The factor of the logged implicit rewards (β for DPO, λ for ORPO), read from the loss spec's
    ``reward_scale``: of the first loss that has one (a weighted mix logs the first component's rewards that
    exist, and the SFT term has none), with its default when the config leaves it out. None when no loss scales
    its rewards or the value is not a positive number (the rewards are then taken as nats)."""
    names = loss_cfg.name if isinstance(loss_cfg.name, list) else [loss_cfg.name]
    spec = next((s for s in map(get_loss, names) if s.reward_scale is not None), None)
    if spec is None:
        return None
    value = loss_cfg.params.get(spec.reward_scale, spec.defaults.get(spec.reward_scale))
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


class Monitor:
    """Margin health, KL, reward-hacking alarms, samples, early stopping and the best model for one run.

    Args:
        cfg: the run's :class:`~preftune.config.Config` (``cfg.monitor`` holds the settings).
        policy: the model being trained (not the DDP wrapper); still the initial weights when constructed.
        tokenizer: for decoding samples and saving the best model.
        eval_set: the held-out :class:`~preftune.data.prepare.ExampleSet`; its first ``num_prompts`` distinct
            prompts are the fixed generation prompts.
        ref_model: a separate frozen reference model, or None. If the loop scores it every step
            (``ref_is_live``) the monitor uses it as it is; otherwise (reference log-probs precomputed) it is
            handed over: its weights are snapshot to disk and the model is moved to the meta device (freed).
        accelerator: for the process rank and the shared stop decision.
        say: the loop's print function (main process only).
        ref_is_live: whether the loop scores ``ref_model`` at every step; None: ``not reference.precompute``.
    """

    def __init__(self, cfg, policy, tokenizer, eval_set, ref_model, accelerator, say=print, *,
                 ref_is_live: bool | None = None):
        if cfg.monitor.early_stopping_metric is None:  # the natural held-out metric of the run's kind
            default = "eval/reward/mean" if getattr(cfg, "rollout", None) is not None else "eval/loss"
            cfg = dataclasses.replace(cfg, monitor=dataclasses.replace(cfg.monitor, early_stopping_metric=default))
        self.mc = mc = cfg.monitor
        self.run_dir = Path(cfg.training.output_dir)
        self.policy, self.tokenizer, self.accelerator, self.say = policy, tokenizer, accelerator, say
        self.main = accelerator.is_main_process
        self.save_best = mc.save_best and cfg.training.save_model
        self.stop_reason: str | None = None
        self.stopped_at: int | None = None
        self.best: dict | None = None
        self.records: list[dict] | None = None  # history, loaded from metrics.jsonl on the first call
        self.state: str | None = None
        self.active: set[str] = set()
        self.metric_missing_noted = False
        self.snapshot: WeightSnapshot | None = None  # the reference's weights on disk, when none is in memory
        split, _, key = mc.early_stopping_metric.partition("/")
        if split not in ("eval", "monitor") or not key:
            raise ConfigError(f"monitor.early_stopping_metric: expected 'eval/<key>' or 'monitor/<key>' (a "
                              f"metrics.jsonl split and key, e.g. eval/loss), got {mc.early_stopping_metric!r}")
        self.mode = metric_direction(mc.early_stopping_metric, mc.early_stopping_mode)
        self.beta = reward_scale(cfg.loss)  # logged rewards / beta -> nats
        self.prompts: list[list[int]] = []
        self.enabled = bool(mc.enabled) and len(eval_set) > 0
        if mc.enabled and not len(eval_set):
            say("monitor: no held-out data (data.eval or data.eval_fraction), so no health checks, KL, alarms, "
                "samples or early stopping")
        if not self.enabled:
            return
        # The reference for KL: a frozen model the loop scores live, or the adapter-disabled policy (LoRA);
        # otherwise its weights are snapshot to disk below, before the first step.
        live = (not cfg.reference.precompute) if ref_is_live is None else ref_is_live
        if ref_model is not None and live:
            self.kl_ref = ref_model
        elif ref_model is None and is_peft(policy) and cfg.reference.model is None:
            self.kl_ref = policy
        else:
            self.kl_ref = None
        self.pad_id = tokenizer.pad_token_id
        self.eos = end_ids(policy, tokenizer)
        self.prompts = samples_mod.held_out_prompts(eval_set.examples, mc.num_prompts)
        if not self.main or mc.num_prompts <= 0:
            return
        # Before the first step the policy is still the reference (or the separate reference is in memory).
        ref_source = next((m for m in (self.kl_ref, ref_model) if m is not None),
                          policy if cfg.reference.model is None else None)
        self.ref_sampled = self.ref_greedy = None
        if ref_source is None:
            say("monitor: the reference's outputs are unavailable (reference.model was freed), so KL, length "
                "drift and diversity are not compared with it")
            return
        with reference_mode(ref_source):
            self.ref_sampled = self._generate(ref_source, temperature=1.0)
            self.ref_greedy = self._generate(ref_source, temperature=0.0)
        self.ref_stats = generation_stats(self.ref_sampled, self.eos)
        if self.kl_ref is None:  # precomputed reference log-probs: keep its weights on disk, not in memory
            self.snapshot = WeightSnapshot(ref_source, self.run_dir / SNAPSHOT_FILE, free=ref_source is ref_model)
            say(f"monitor: reference weights for KL saved to {self.snapshot.path} "
                f"({self.snapshot.bytes / 2**20:.1f} MiB; read back at each evaluation, removed at the end)")

    # ---- hooks ---------------------------------------------------------------------------------------------

    def after_step(self, step: int, train_values: dict, writer) -> None:
        """Keep the train record for the health checks; write greedy samples every ``sample_every`` steps."""
        if not self.enabled or not self.main:
            return
        self._history(step).append({"step": step, "split": "train", **train_values})
        if self.mc.sample_every and step % self.mc.sample_every == 0 and self.prompts:
            self._samples(step, writer)

    def after_eval(self, step: int, eval_values: dict, writer) -> None:
        """Health, KL, alarms, samples, early stopping and the best model, after the eval record of ``step``."""
        if not self.enabled:
            return
        if self.main:
            history = self._history(step)
            eval_record = {"step": step, "split": "eval", **eval_values}
            history.append(eval_record)
            if self.prompts:
                history.append(self._measure(step, writer))
            self._health(step, writer)
            self._alarms(step, eval_record, writer)
            if not self.mc.sample_every and self.prompts:
                self._samples(step, writer)
            self._early_stopping(step, eval_values, writer)
        if self.accelerator.num_processes > 1:  # every process leaves the loop at the same step
            flag = torch.tensor([1.0 if self.stop_reason else 0.0], device=self.accelerator.device)
            if self.accelerator.reduce(flag, reduction="sum").item() > 0 and not self.stop_reason:
                self.stop_reason = "stopped by the main process"
        if self.stop_reason and self.stopped_at is None:
            self.stopped_at = step

    def close(self) -> None:
        """Remove the reference-weights snapshot (the run is over)."""
        if self.snapshot is not None:
            self.snapshot.close()

    # ---- parts ---------------------------------------------------------------------------------------------

    def _history(self, step: int) -> list[dict]:
        """Records so far; on the first call, those of a resumed run (metrics.jsonl up to the checkpoint; the
        trainer cut it and samples.jsonl there before the first step)."""
        if self.records is None:
            self.records = [r for r in read_metrics(self.run_dir) if r["step"] < step]
            self._restore()
        return self.records

    def _restore(self) -> None:
        """Health state, active alarms and the best value of a resumed run, from its records."""
        evals = [r for r in self.records if r["split"] == "eval"]
        if not evals:
            return
        diagnosis = diagnose(self.records, self.beta)
        self.state = diagnosis.state if diagnosis else None
        monitors = [r for r in self.records if r["split"] == "monitor"]
        self.active = {a.name for a in check_alarms(monitors, evals[-1], self.mc)} if monitors else set()
        split, key = self.mc.early_stopping_metric.split("/", 1)
        for r in self.records:
            if r["split"] == split and isinstance(r.get(key), (int, float)) and self._better(r[key]):
                self.best = {"step": r["step"], "metric": self.mc.early_stopping_metric, "value": r[key],
                             "path": str(self.run_dir / "best") if self.save_best else None}

    def _generate(self, model, temperature: float) -> list[list[int]]:
        return generate_ids(model, self.prompts, max_new_tokens=self.mc.max_new_tokens, pad_id=self.pad_id,
                            eos_ids=self.eos, temperature=temperature, seed=SAMPLE_SEED)

    def _measure(self, step: int, writer) -> dict:
        """Sampled generations of the policy: KL to the reference, lengths and diversity; one monitor record."""
        sampled = self._generate(self.policy, temperature=1.0)
        values: dict = {}
        if self.kl_ref is not None or self.snapshot is not None:
            reference = self.snapshot.model() if self.snapshot else contextlib.nullcontext(self.kl_ref)
            with torch.no_grad(), reference as ref:
                policy_logps = completion_token_logps(self.policy, self.prompts, sampled, self.pad_id)
                with reference_mode(ref):
                    ref_logps = completion_token_logps(ref, self.prompts, sampled, self.pad_id)
            values.update(kl_estimates(policy_logps, ref_logps))
        else:
            values.update({k: None for k in ("kl/k1_token", "kl/k3_token", "kl/k1_seq", "kl/k3_seq")})
        stats = generation_stats(sampled, self.eos)
        values["length/policy"] = stats["length"]
        ref = getattr(self, "ref_stats", None)
        if ref is not None:
            values["length/reference"] = ref["length"]
            values["length/ratio"] = stats["length"] / ref["length"] if ref["length"] > 0 else None
        for key in ("distinct_1", "distinct_2", "repetition"):
            values[f"diversity/{key}"] = stats[key]
            if ref is not None:
                values[f"diversity/reference_{key}"] = ref[key]
        values = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        if writer:
            writer.write(step, "monitor", values)
        return {"step": step, "split": "monitor", **values}

    def _health(self, step: int, writer) -> None:
        diagnosis = diagnose(self.records, self.beta)
        if diagnosis is None or diagnosis.state == self.state:
            return
        self.state = diagnosis.state
        record = {"state": diagnosis.state, "message": diagnosis.message, "fix": diagnosis.fix}
        self.records.append({"step": step, "split": "health", **record})
        if writer:
            writer.write(step, "health", record)
        self.say(f"monitor: step {step}: {diagnosis.line()}")

    def _alarms(self, step: int, eval_record: dict, writer) -> None:
        monitors = [r for r in self.records if r["split"] == "monitor"]
        alarms = check_alarms(monitors, eval_record, self.mc)
        for alarm in alarms:
            if alarm.name in self.active:
                continue
            record = {"name": alarm.name, "message": alarm.message}
            self.records.append({"step": step, "split": "alarm", **record})
            if writer:
                writer.write(step, "alarm", record)
            self.say(f"monitor: ALARM at step {step}: {alarm.name}: {alarm.message}")
            if alarm.name == "max_kl" and not self.stop_reason:
                self.stop_reason = f"max_kl: {alarm.message}"
        self.active = {a.name for a in alarms}

    def _samples(self, step: int, writer) -> None:
        greedy = self._generate(self.policy, temperature=0.0)
        ref = self.ref_greedy or [[] for _ in greedy]
        text = lambda ids: samples_mod.decode(self.tokenizer, ids)  # noqa: E731
        samples_mod.write_samples(
            self.run_dir, step, [text(p) for p in self.prompts], [text(g) for g in greedy], [text(r) for r in ref],
            [len([t for t in g if t not in self.eos]) for g in greedy],
            [len([t for t in r if t not in self.eos]) for r in ref], writer, self.say, self.mc.print_samples)

    def _better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best["value"] if self.mode == "min" else value > self.best["value"]

    def _early_stopping(self, step: int, eval_values: dict, writer) -> None:
        split, key = self.mc.early_stopping_metric.split("/", 1)
        source = eval_values if split == "eval" else next(
            (r for r in reversed(self.records) if r["split"] == split and r["step"] == step), {})
        value = source.get(key)
        if not isinstance(value, (int, float)):
            if not self.metric_missing_noted:
                self.metric_missing_noted = True
                self.say(f"monitor: monitor.early_stopping_metric {self.mc.early_stopping_metric!r} is not among "
                         f"the {split} metrics ({', '.join(sorted(source)) or 'none'}); no early stopping or best model")
            return
        if self._better(value):
            self.best = {"step": step, "metric": self.mc.early_stopping_metric, "value": value,
                         "path": str(self.run_dir / "best") if self.save_best else None}
            if self.save_best:
                _save_atomically(self.policy, self.tokenizer, self.run_dir / "best", self.best)
            self._event(step, "best", f"best {self.mc.early_stopping_metric} = {value:.4g}", writer, value=value)
            return
        if self.best is None:  # no finite value yet (e.g. NaN: nothing was scored), so nothing to wait for
            return
        waited = len([r for r in self.records if r["split"] == "eval" and r["step"] > self.best["step"]])
        if self.mc.patience is not None and waited >= self.mc.patience and not self.stop_reason:
            self.stop_reason = (f"early stopping: {self.mc.early_stopping_metric} has not improved for {waited} "
                                f"evaluations (best {self.best['value']:.4g} at step {self.best['step']})")
            self._event(step, "early_stopping", self.stop_reason, writer)
            self.say(f"monitor: {self.stop_reason}")

    def _event(self, step: int, name: str, message: str, writer, **extra) -> None:
        record = {"name": name, "message": message, **extra}
        self.records.append({"step": step, "split": "event", **record})
        if writer:
            writer.write(step, "event", record)


def _save_atomically(policy, tokenizer, out: Path, info: dict) -> None:
    """``save_pretrained`` into a temporary directory, then swap it in (``fsio.write_dir_atomic``): ``best/``
    is the old best model or the new one at every instant, never half of one."""

    def write(tmp: Path) -> None:
        save_pretrained(policy, tokenizer, tmp)
        (tmp / "best.json").write_text(json.dumps(info, indent=1))

    write_dir_atomic(out, write, "the best model to")
