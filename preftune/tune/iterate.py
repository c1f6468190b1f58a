"""``preftune iterate CONFIG``: iterative DPO, rounds of whole runs in which each policy makes the next data.

    round k:  prompts -> generate (the current policy, N per prompt) -> judge -> pairs (best vs worst, ties
              dropped) -> validate (the `preftune data validate` checks; unusable pairs stop the run with the
              report) -> train (the configured paired loss) -> evaluate (against round k-1 and the SFT model)

The round's policy starts from the previous round's result (round 1 from ``model``, the SFT model). Its
reference is the round's starting policy (``iterate.reference: previous``) or the SFT model (``sft``). The
Self-Rewarding / Llama-style loop of seeds/002 §18.4.5.2, each round a standard offline DPO run.

Layout of the iterate directory (``training.output_dir``)::

    iterate.json            the resolved config and its fingerprint (a resume with other settings is refused)
    baseline.json           the SFT model scored against itself (lengths, distinct-n, judge score)
    round-01/ ...           prompts.jsonl, generations.jsonl, pairs.jsonl (+ .dropped.jsonl), verdicts.jsonl,
                            validation.json, train/ (the run; the model in train/final), eval.json, metrics.json,
                            lineage.json, state.json (the steps done)
    rounds.json, rounds.csv, rounds.png   the round table and its plot

Resume: every step writes its outputs atomically and is then recorded in ``state.json``; a killed run,
started again with the same command, skips the steps done and continues the one it was in (generation
appends to its file, training continues from its newest checkpoint with ``training.save_every``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

from preftune.errors import ConfigError, PreftuneError
from preftune.tune import adapter
from preftune.tune.files import fingerprint, read_json, tree_hash, write_json, write_jsonl
from preftune.tune.scoring import score_model
from preftune.tune.settings import IterateSettings, as_dict, load_tree, parse_settings, split_sections
from preftune.tune.tables import plot_rounds, round_rows, rounds_table, write_csv

STEPS = ("prompts", "generate", "judge", "validate", "train", "evaluate")
UNFINGERPRINTED = ("rounds", "min_win_rate")
"""Settings a resumed run may change: continue with more rounds, or stop sooner."""


class RoundsStopped(PreftuneError):
    """A round's pairs were unusable: the run stopped with the data report."""


@dataclasses.dataclass
class Plan:
    out: Path
    train_tree: dict
    settings: IterateSettings
    sft_model: str
    tokenizer: Any


def prepare(config, *, overrides: list[str] | None = None, out: str | Path | None = None,
            rounds: int | None = None) -> Plan:
    """Parse and check an iterate config (nothing is loaded or written)."""
    tree = load_tree(config, overrides)
    train_tree, sections = split_sections(tree)
    if "iterate" not in sections:
        raise ConfigError("the config has no 'iterate:' section (rounds, prompts, eval_prompts, judge; see docs/tune.md)")
    if "sweep" in sections:
        raise ConfigError("a config has either an 'iterate:' or a 'sweep:' section, not both")
    settings, _ = parse_settings(IterateSettings, sections["iterate"], "iterate")
    if rounds is not None:
        settings.rounds = rounds
    for key, low in (("rounds", 1), ("samples_per_prompt", 2), ("max_new_tokens", 1), ("generation_batch_size", 1)):
        if getattr(settings, key) < low:
            raise ConfigError(f"iterate.{key} must be >= {low}, got {getattr(settings, key)}")
    for key in ("prompts", "eval_prompts"):
        if not Path(getattr(settings, key)).exists():
            raise ConfigError(f"iterate.{key}: file not found: {getattr(settings, key)}")
    training = dict(train_tree.get("training") or {})
    if out is not None:
        training["output_dir"] = str(out)
    if not training.get("output_dir"):
        raise ConfigError("missing required key 'training.output_dir' (the iterate directory)")
    train_tree = {**train_tree, "training": training}
    if not isinstance(train_tree.get("model"), str):
        raise ConfigError("model: iterate starts from a model directory or hub id (the SFT model), a string")
    adapter.check_train_config(train_tree)  # unknown keys and bad values fail before any model is loaded
    adapter.make_judge(settings.judge)  # so does a bad judge
    return Plan(Path(training["output_dir"]), train_tree, settings, train_tree["model"], train_tree.get("tokenizer"))


def run_iterate(config, *, overrides: list[str] | None = None, out: str | Path | None = None,
                rounds: int | None = None, log=print) -> dict:
    """Run (or resume) the rounds of an iterate config; returns the round table (also in ``rounds.json``)."""
    plan = prepare(config, overrides=overrides, out=out, rounds=rounds)
    plan.out.mkdir(parents=True, exist_ok=True)
    _check_manifest(plan)
    judge = adapter.make_judge(plan.settings.judge)
    tokenizer = adapter.load_tokenizer(plan.tokenizer, plan.sft_model)
    eval_prompts = adapter.read_prompts(plan.settings.eval_prompts, chat=plan.settings.chat)
    eval_prompts = eval_prompts[: plan.settings.num_eval_prompts or None]
    baseline = read_json(plan.out / "baseline.json")
    if baseline is None:
        sft = adapter.load_model(plan.sft_model)
        baseline = _score(plan, sft, sft, tokenizer, eval_prompts, judge, kl=False)
        write_json(plan.out / "baseline.json", baseline)
    stopped = None
    for k in range(1, plan.settings.rounds + 1):
        metrics = Round(plan, k, judge, tokenizer, eval_prompts, log).run()
        wr, floor = metrics["win_rate_vs_previous"], plan.settings.min_win_rate
        if floor is not None and wr < floor:
            stopped = (f"round {k}: win rate {wr:.3f} against the previous round's policy is below "
                       f"iterate.min_win_rate {floor:g}; no further rounds")
            log(f"iterate: {stopped}")
            break
    return _finish(plan, baseline, stopped, log)


def _check_manifest(plan: Plan) -> None:
    """Record the run's config in ``iterate.json``; refuse to resume a run made with another one.

    Values are compared after a JSON round trip (as stored); a setting the stored record lacks (added to
    preftune since) counts as its default.
    """
    settings = {k: v for k, v in as_dict(plan.settings).items() if k not in UNFINGERPRINTED}
    record = json.loads(json.dumps({"train_config": plan.train_tree, "iterate": settings}, default=str))
    path = plan.out / "iterate.json"
    old = read_json(path)
    if old is not None:
        defaults = as_dict(IterateSettings(prompts="", eval_prompts="", judge=None))
        changed = [f"iterate.{k}" for k, v in record["iterate"].items() if old["iterate"].get(k, defaults[k]) != v]
        changed += [f"config {k}" for k in sorted(set(record["train_config"]) | set(old["train_config"]))
                    if record["train_config"].get(k) != old["train_config"].get(k)]
        if changed:
            raise PreftuneError(f"{plan.out} holds an iterate run with other settings ({', '.join(changed)}); "
                                "resume with the same config (only iterate.rounds and iterate.min_win_rate may "
                                "change) or use another training.output_dir")
    write_json(path, {**record, "fingerprint": tree_hash(record), "settings": as_dict(plan.settings)})


def _score(plan: Plan, policy, reference, tokenizer, prompts, judge, kl: bool) -> dict:
    return score_model(policy, reference, tokenizer, prompts, judge, max_new_tokens=plan.settings.max_new_tokens,
                       seed=plan.settings.seed, batch_size=plan.settings.generation_batch_size, kl=kl)


def round_dir(out: Path, k: int) -> Path:
    return Path(out) / f"round-{k:02d}"


class Round:
    """The six steps of round ``k``, each skipped when ``state.json`` records it done."""

    def __init__(self, plan: Plan, k: int, judge, tokenizer, eval_prompts: list, log) -> None:
        self.plan, self.k, self.judge, self.tokenizer, self.eval_prompts = plan, k, judge, tokenizer, eval_prompts
        self.s = plan.settings
        self.dir = round_dir(plan.out, k)
        self.parent = plan.sft_model if k == 1 else str(round_dir(plan.out, k - 1) / "train" / "final")
        self.model_dir = self.dir / "train" / "final"
        self.log = log
        self.state = read_json(self.dir / "state.json", {"done": [], "info": {}})
        self._parent_model = None

    def run(self) -> dict:
        for step in STEPS:
            if step in self.state["done"]:
                continue
            self.log(f"iterate: round {self.k}: {step}")
            info = getattr(self, f"_{step}")()
            self.state["done"].append(step)
            self.state["info"][step] = info
            write_json(self.dir / "state.json", self.state)
        return read_json(self.dir / "metrics.json")

    def parent_model(self):
        if self._parent_model is None:
            self._parent_model = adapter.load_model(self.parent)
        return self._parent_model

    # ---- steps ------------------------------------------------------------------------------------------
    def _prompts(self) -> dict:
        pool = adapter.read_prompts(self.s.prompts)
        n = self.s.prompts_per_round or len(pool)
        start = ((self.k - 1) * n) % len(pool)
        chosen = [pool[(start + i) % len(pool)] for i in range(min(n, len(pool)))]
        write_jsonl(self.dir / "prompts.jsonl", [{"prompt": p} for p in chosen])
        return {"prompts": len(chosen), "pool": len(pool), "first": start}

    def _generate(self) -> dict:
        summary = adapter.sample_responses(
            self.parent_model(), self.tokenizer, self.dir / "prompts.jsonl", self.dir / "generations.jsonl",
            n=self.s.samples_per_prompt, temperatures=self.s.temperatures, seed=self.s.seed + self.k,
            max_new_tokens=self.s.max_new_tokens, top_p=self.s.top_p, batch_size=self.s.generation_batch_size,
            chat=self.s.chat, name=self.parent)
        self.log(f"iterate: round {self.k}: {summary}")
        return {"summary": summary}

    def _judge(self) -> dict:
        pairs = self.dir / "pairs.jsonl"
        result, bias = adapter.judge_pairs(self.dir / "generations.jsonl", self.judge, pairs, mode=self.s.pairs,
                                           min_margin=self.s.min_margin, spec=self.s.judge,
                                           scoring=self.s.scoring)
        write_jsonl(self.dir / "verdicts.jsonl", _verdicts(result))
        self.log(f"iterate: round {self.k}: {result.summary()}")
        return {"pairs": len(result.pairs), "dropped": len(result.dropped), "reasons": dict(result.reasons),
                "length_bias": bias.to_dict()}

    def _validate(self) -> dict:
        max_length = (self.plan.train_tree.get("training") or {}).get("max_length")
        report = adapter.validate_pairs(self.dir / "pairs.jsonl", self.tokenizer, max_length)
        write_json(self.dir / "validation.json", report.to_dict())
        if not report.usable:
            for line in report.summary().splitlines():
                self.log(f"iterate: round {self.k}: data check: {line}")
            raise RoundsStopped(f"round {self.k}: the round's pairs are unusable ({'; '.join(report.unusable_reasons)}); "
                                f"stopped. The report: {self.dir / 'validation.json'}")
        return {"usable": True, "pairs": report.pairs, "warnings": [f.name for f in report.warnings]}

    def train_tree(self, record: bool = False) -> dict:
        """The round's training config; ``record``: as written to lineage (the parent by path, never loaded)."""
        tree = copy.deepcopy({k: v for k, v in self.plan.train_tree.items() if k != "model"})
        parent: Any = self.parent
        if not record and (Path(parent) / "adapter_config.json").exists():  # LoRA: start from the parent merged
            parent = self.parent_model()
        tree["model"] = parent
        tree["tokenizer"] = self.tokenizer
        tree["data"] = {**(tree.get("data") or {}), "train": str(self.dir / "pairs.jsonl")}
        tree["training"] = {**tree["training"], "output_dir": str(self.dir / "train"),
                            "seed": int(tree["training"].get("seed", 0)) + self.k - 1, "save_model": True}
        reference = dict(tree.get("reference") or {})
        reference["model"] = self.plan.sft_model if self.s.reference == "sft" and self.k > 1 else None
        tree["reference"] = reference
        return tree

    def _train(self) -> dict:
        tree = self.train_tree()
        self._parent_model = None  # training loads (and changes) its own copy
        summary = adapter.train(tree, resume=True, log=lambda *a: self.log(f"iterate: round {self.k}: train:", *a))
        self._write_lineage(self.train_tree(record=True))
        return {"steps": summary["steps"], "final_loss": summary["final_loss"],
                "train_runtime_s": summary["train_runtime_s"]}

    def _evaluate(self) -> dict:
        policy = adapter.load_model(self.model_dir)
        sft = adapter.load_model(self.plan.sft_model)
        vs_sft = _score(self.plan, policy, sft, self.tokenizer, self.eval_prompts, self.judge, kl=True)
        if self.k == 1:
            vs_prev = vs_sft
        else:
            del sft
            vs_prev = _score(self.plan, policy, self.parent_model(), self.tokenizer, self.eval_prompts, self.judge,
                             kl=False)
        write_json(self.dir / "eval.json", {"vs_previous": vs_prev, "vs_sft": vs_sft})
        info = self.state["info"]
        metrics = {
            "round": self.k, "model": str(self.model_dir), "pairs": info["judge"]["pairs"],
            "win_rate_vs_previous": vs_prev["win_rate"], "lc_win_rate_vs_previous": vs_prev["lc_win_rate"],
            "win_rate_vs_sft": vs_sft["win_rate"], "lc_win_rate_vs_sft": vs_sft["lc_win_rate"],
            "kl_to_sft": vs_sft["kl"], "length": vs_sft["length"], "distinct_1": vs_sft["distinct_1"],
            "distinct_2": vs_sft["distinct_2"], "repetition": vs_sft["repetition"], "eos_rate": vs_sft["eos_rate"],
            "perplexity_under_sft": vs_sft["perplexity"], "model_score": vs_sft.get("model_score"),
            "train_loss": info["train"]["final_loss"],
        }
        write_json(self.dir / "metrics.json", metrics)
        self._write_lineage(self.train_tree(record=True), metrics)
        return {"win_rate_vs_previous": metrics["win_rate_vs_previous"], "win_rate_vs_sft": metrics["win_rate_vs_sft"]}

    def _write_lineage(self, tree: dict, metrics: dict | None = None) -> None:
        files = {name: fingerprint(self.dir / f) for name, f in (("prompts", "prompts.jsonl"),
                                                                  ("generations", "generations.jsonl"),
                                                                  ("pairs", "pairs.jsonl"))}
        files["eval_prompts"] = fingerprint(Path(self.s.eval_prompts))
        reference = tree["reference"]["model"] or f"{self.parent} (the round's starting policy)"
        record = {
            "round": self.k, "model": str(self.model_dir), "parent_model": self.parent,
            "sft_model": self.plan.sft_model, "reference_model": reference,
            "judge": adapter.judge_info(self.judge, self.s.judge),
            "seeds": {"generation": self.s.seed + self.k, "training": tree["training"]["seed"],
                      "evaluation": self.s.seed},
            "data": files,
            "config": {k: v for k, v in tree.items() if k not in ("model", "tokenizer")},
            "iterate": as_dict(self.s), "metrics": metrics,
        }
        write_json(self.dir / "lineage.json", record)


def _verdicts(result) -> list[dict]:
    """One row per judged prompt: kept or dropped (with the reason), scores, rationale, both-order verdicts."""
    rows = []
    for p in result.pairs:
        lin = p["lineage"]
        rows.append({"prompt": p["prompt"], "prompt_id": lin.get("prompt_id"), "kept": True, "chosen": p["chosen"],
                     "rejected": p["rejected"], "scores": lin.get("scores"), "rationale": lin.get("rationale"),
                     "confidence": lin.get("confidence"), "verdicts": lin.get("verdicts")})
    for d in result.dropped:
        rows.append({"prompt": d["prompt"], "prompt_id": d.get("prompt_id"), "kept": False, "reason": d["reason"],
                     "detail": d.get("detail"), "scores": d.get("scores"), "verdicts": d.get("verdicts")})
    return rows


def _finish(plan: Plan, baseline: dict, stopped: str | None, log) -> dict:
    done = [read_json(round_dir(plan.out, k) / "metrics.json") for k in range(1, plan.settings.rounds + 1)]
    done = [m for m in done if m is not None]
    rows = round_rows(baseline, done)
    table = {"rounds": rows, "stopped": stopped, "model": done[-1]["model"] if done else plan.sft_model,
             "sft_model": plan.sft_model}
    write_json(plan.out / "rounds.json", table)
    write_csv(plan.out / "rounds.csv", rows)
    plot_rounds(rows, plan.out / "rounds.png")
    log(rounds_table(rows))
    log(f"iterate: wrote {plan.out / 'rounds.json'}, rounds.csv, rounds.png; final model {table['model']}")
    return table
