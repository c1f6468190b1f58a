"""``preftune sweep CONFIG``: an Optuna study over training-config keys, each trial a normal run in its own dir.

    prepare   the search space and settings are checked (refusals name the key) before any trial starts
    study     Optuna: TPE / random / grid sampler, a pruner, storage (default ``sqlite:///<dir>/sweep.db``)
    trial     ``trials/trial-NNNN/``: trial.json (the run's config and the scoring settings), a subprocess
              ``python -m preftune.tune.trial`` that trains (``run/``) and scores (``scores.json``), log.txt
    report    ``sweep.csv``, the table, ``pareto.png``, ``sweep.html``, ``best.yaml`` (:mod:`.sweep_report`)

**Why a subprocess per trial.** ``preftune.train`` has no callbacks, and pruning needs the run's evaluations
while it runs. The driver reads the trial's ``metrics.jsonl`` as it grows, reports each evaluation's
``sweep.prune_metric`` to Optuna (``trial.report``), and when the pruner says so, ends the process. The run
itself stays an ordinary ``preftune train`` run (same code, same files); a trial that crashes, even in native
code or out of memory, is recorded as failed with its error and the sweep goes on. The child exits when the
driver dies (it watches its parent), so a killed sweep leaves no orphan training.

**Resume.** The study lives in its storage. Started again, a sweep keeps finished trials and runs until
``trials`` are finished (complete, pruned or failed). A trial that was running when the sweep was killed is
retried with the same parameters in the same directory, so its run resumes from its checkpoints: on this
machine at once (its driver process is gone: marked failed and re-enqueued), and on an RDB shared by several
machines through Optuna's heartbeat (a retry callback on ``RDBStorage``) once its heartbeat is
``grace_period`` old. Several machines work on one study by pointing ``--storage`` at one database
(``postgresql://user@host/db``) with the same ``study_name``; each runs ``preftune sweep CONFIG --storage URL``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from preftune.errors import ConfigError, PreftuneError
from preftune.tune import adapter
from preftune.tune.files import read_json, tree_hash, write_json, write_jsonl
from preftune.tune.scoring import SCORE_KEYS, direction
from preftune.tune.settings import SweepSettings, load_tree, parse_settings, split_sections
from preftune.tune.space import Dimension, apply_params, grid_size, parse_space

OBJECTIVES = SCORE_KEYS


class TrialFailed(PreftuneError):
    """A trial's run or scoring failed; the error is recorded on the trial and the sweep goes on."""


@dataclasses.dataclass
class Plan:
    out: Path
    train_tree: dict
    settings: SweepSettings
    dims: list[Dimension]
    trials: int
    direction: str
    storage: str
    reference_model: str
    prompts_path: Path
    prompts: list


def prepare(config, *, overrides: list[str] | None = None, out: str | Path | None = None,
            trials: int | None = None, sampler: str | None = None, storage: str | None = None,
            study_name: str | None = None) -> Plan:
    """Parse and check a sweep config: every refusal happens here, before the first trial."""
    tree = load_tree(config, overrides)
    train_tree, sections = split_sections(tree)
    if "sweep" not in sections:
        raise ConfigError("the config has no 'sweep:' section (the search space and settings; see docs/tune.md)")
    if "iterate" in sections:
        raise ConfigError("a config has either an 'iterate:' or a 'sweep:' section, not both")
    settings, raw_space = parse_settings(SweepSettings, sections["sweep"], "sweep", extra="return")
    for key, value in (("trials", trials), ("sampler", sampler), ("storage", storage), ("study_name", study_name)):
        if value is not None:
            setattr(settings, key, value)
    for key, low in (("num_prompts", 1), ("max_new_tokens", 1), ("heartbeat_interval", 1), ("max_retry", 0),
                     ("prune_startup_trials", 0), ("prune_warmup_steps", 0)):
        if getattr(settings, key) < low:
            raise ConfigError(f"sweep.{key} must be >= {low}, got {getattr(settings, key)}")
    if settings.objective not in OBJECTIVES:
        raise ConfigError(f"sweep.objective: {settings.objective!r} is not a score; one of {', '.join(OBJECTIVES)}")
    training = dict(train_tree.get("training") or {})
    if out is not None:
        training["output_dir"] = str(out)
    if not training.get("output_dir"):
        raise ConfigError("missing required key 'training.output_dir' (the sweep directory)")
    train_tree = {**train_tree, "training": training}
    if not isinstance(train_tree.get("model"), str):
        raise ConfigError("model: a sweep trains from a model directory or hub id, a string")
    dims = parse_space(raw_space, train_tree, sampler=settings.sampler)
    n = settings.trials or (grid_size(dims) if settings.sampler == "grid" else 20)
    if n < 1:
        raise ConfigError(f"sweep.trials must be >= 1, got {n}")
    adapter.make_judge(settings.judge)  # a bad judge fails now, not in every trial
    out_dir = Path(training["output_dir"])
    prompts_path, prompts = _held_out_prompts(settings, train_tree, out_dir)
    reference = settings.reference_model or (train_tree.get("reference") or {}).get("model") or train_tree["model"]
    url = settings.storage or f"sqlite:///{(out_dir / 'sweep.db').resolve()}"
    return Plan(out_dir, train_tree, settings, dims, n, direction(settings.objective, settings.direction), url,
                str(reference), prompts_path, prompts)


def _held_out_prompts(settings: SweepSettings, tree: dict, out: Path) -> tuple[Path, list]:
    if settings.prompts is not None:
        if not Path(settings.prompts).exists():
            raise ConfigError(f"sweep.prompts: file not found: {settings.prompts}")
        prompts = adapter.read_prompts(settings.prompts)
    else:
        source = (tree.get("data") or {}).get("eval")
        if source is None:
            raise ConfigError("sweep.prompts is not set and the config has no data.eval to take held-out prompts from")
        prompts = adapter.prompts_of_rows(source)
    prompts = prompts[: settings.num_prompts]
    if not prompts:
        raise ConfigError("the sweep's held-out prompts are empty (sweep.prompts / data.eval)")
    return out / "prompts.jsonl", prompts


# ---- the study ----------------------------------------------------------------------------------------------


def open_study(plan: Plan):
    """(study, storage): loaded or created; a study made with another config or space is refused."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the driver logs each trial itself
    s = plan.settings
    kwargs: dict[str, Any] = {}
    if plan.storage.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}  # several local workers share one file
    with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna; it is what resume relies on
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            plan.storage, heartbeat_interval=s.heartbeat_interval,
            grace_period=s.grace_period or 4 * s.heartbeat_interval,
            heartbeat_stale_trial_callback=RetryInterrupted(s.max_retry), **kwargs)
    record = {"train_config": plan.train_tree, "space": [dataclasses.asdict(d) for d in plan.dims],
              "objective": s.objective, "direction": plan.direction, "max_kl": s.max_kl, "judge": s.judge,
              "prompts": plan.prompts, "reference_model": plan.reference_model, "sampler": s.sampler}
    sampler, pruner = _sampler(plan), _pruner(s)
    try:
        study = optuna.load_study(study_name=s.study_name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        study = optuna.create_study(study_name=s.study_name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction=plan.direction, load_if_exists=True)
    old = study.user_attrs.get("fingerprint")
    if old is None:
        study.set_user_attr("fingerprint", tree_hash(record))
        study.set_user_attr("record", record)
    elif old != tree_hash(record):
        before = study.user_attrs.get("record", {})
        changed = sorted(k for k in set(record) | set(before) if before.get(k) != _jsonish(record.get(k)))
        raise PreftuneError(f"study {s.study_name!r} in {plan.storage} was made with another config "
                            f"({', '.join(changed) or 'config'} differ); resume with the same config, or name "
                            "another study (sweep.study_name / --study) or directory")
    return study, storage


def _jsonish(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


def _sampler(plan: Plan):
    import optuna

    s = plan.settings
    if s.sampler == "grid":
        return optuna.samplers.GridSampler({d.key: list(d.distribution().choices) for d in plan.dims}, seed=s.seed)
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    return optuna.samplers.TPESampler(seed=s.seed)  # infeasible trials: Trial.set_constraint in the objective


def _pruner(s: SweepSettings):
    import optuna.pruners as p

    if s.pruner == "median":
        return p.MedianPruner(n_startup_trials=s.prune_startup_trials, n_warmup_steps=s.prune_warmup_steps)
    if s.pruner == "hyperband":
        return p.HyperbandPruner()
    if s.pruner == "successive_halving":
        return p.SuccessiveHalvingPruner()
    return p.NopPruner()


def counted(trial) -> bool:
    """Whether a trial counts towards ``trials``: complete, pruned, or failed with an error (not interrupted)."""
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and bool(trial.user_attrs.get("error")) and \
        not trial.user_attrs.get("interrupted")


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed but not yet reaped process is a zombie: dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class RetryInterrupted:
    """Re-enqueue an interrupted trial with its parameters, up to ``max_retry`` times.

    Optuna's ``RetryHeartbeatStaleTrialCallback``, with the original trial's number (``retry_of``) and the
    retry history kept in the new trial's user attributes, where the objective can read them (Optuna 5 has no
    public ``Trial.system_attrs``). Used for heartbeat-stale trials (``RDBStorage``) and by :func:`recover`.
    """

    def __init__(self, max_retry: int) -> None:
        self.max_retry = max_retry

    def __call__(self, study, trial) -> None:
        import optuna

        history = [*trial.user_attrs.get("retry_history", []), trial.number]
        if len(history) > self.max_retry:
            return
        attrs = {**trial.user_attrs, "retry_of": history[0], "retry_history": history, "interrupted": False,
                 "error": None}
        system = {**trial.system_attrs, "failed_trial": history[0], "retry_history": history}  # as Optuna's
        study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.WAITING, params=trial.params,
                                            distributions=trial.distributions, user_attrs=attrs,
                                            system_attrs=system))


def recover(study, storage, max_retry: int, log) -> list[int]:
    """Retry the trials a killed sweep on this machine left behind; returns their numbers.

    A RUNNING trial whose driver (host and pid recorded on the trial) is gone is marked failed and
    interrupted; an interrupted trial (also a Ctrl-C) without a retry yet is re-enqueued with its parameters
    (:class:`RetryInterrupted`), which records the original as ``retry_of``.
    """
    from optuna.trial import TrialState

    host = socket.gethostname()
    retry = RetryInterrupted(max_retry)
    study_id = storage.get_study_id_from_name(study.study_name)
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.user_attrs.get("retry_history", [])}
    out = []
    for t in trials:
        orphan = (t.state == TrialState.RUNNING and t.user_attrs.get("host") == host
                  and not _pid_alive(t.user_attrs.get("pid")))
        if orphan:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            storage.set_trial_user_attr(trial_id, "interrupted", True)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
            t = storage.get_trial(trial_id)
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in retried:
            retry(study, t)
            out.append(t.number)
            log(f"sweep: trial {t.number} was interrupted; retrying it with the same parameters")
    return out


def run_sweep(config, *, overrides: list[str] | None = None, out: str | Path | None = None,
              trials: int | None = None, sampler: str | None = None, storage: str | None = None,
              study_name: str | None = None, log=print) -> dict:
    """Run (or resume) a sweep until ``trials`` are finished, then write its report; returns the summary."""
    from preftune.tune.sweep_report import write_report

    plan = prepare(config, overrides=overrides, out=out, trials=trials, sampler=sampler, storage=storage,
                   study_name=study_name)
    plan.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(plan.prompts_path, [{"prompt": p} for p in plan.prompts])
    study, storage = open_study(plan)
    recover(study, storage, plan.settings.max_retry, log)
    done = sum(counted(t) for t in study.get_trials(deepcopy=False))
    remaining = plan.trials - done
    log(f"sweep: study {plan.settings.study_name!r} ({plan.storage}): {done} of {plan.trials} trials finished; "
        f"{plan.settings.sampler} over " + "; ".join(d.describe() for d in plan.dims))
    if remaining > 0:
        def stop_when_done(study, _trial) -> None:  # other workers count too
            if sum(counted(t) for t in study.get_trials(deepcopy=False)) >= plan.trials:
                study.stop()

        study.optimize(Objective(plan, log), n_trials=remaining, callbacks=[stop_when_done],
                       catch=(TrialFailed,), gc_after_trial=False)
    return write_report(plan, study, log)


# ---- one trial ----------------------------------------------------------------------------------------------


class Objective:
    """Optuna's objective: one trial = write its config, run the trial process, read its scores."""

    def __init__(self, plan: Plan, log) -> None:
        self.plan, self.log = plan, log

    def __call__(self, trial) -> float:
        plan, s = self.plan, self.plan.settings
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("interrupted", False)
        params = {d.key: d.suggest(trial) for d in plan.dims}
        origin = trial.user_attrs.get("retry_of")
        origin = trial.number if origin is None else origin  # a retry continues the original's run
        tdir = plan.out / "trials" / f"trial-{origin:04d}"
        trial.set_user_attr("dir", str(tdir))
        tree = apply_params(plan.train_tree, params)
        tree["training"] = {**tree["training"], "output_dir": str(tdir / "run"), "progress_bar": False,
                            "save_model": True}
        write_json(tdir / "trial.json", {
            "trial": trial.number, "retry_of": None if origin == trial.number else origin, "params": params,
            "config": tree, "score": {"reference_model": plan.reference_model, "prompts": str(plan.prompts_path),
                                      "judge": s.judge, "max_new_tokens": s.max_new_tokens, "seed": s.seed}})
        self.log(f"sweep: trial {trial.number}: " + ", ".join(f"{k}={v}" for k, v in params.items()))
        try:
            scores = run_trial_process(trial, tdir, plan)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        except TrialFailed as e:
            trial.set_user_attr("error", str(e))
            self.log(f"sweep: trial {trial.number} failed: {e}")
            raise
        flat = {k: scores.get(k) for k in (*SCORE_KEYS, "wins", "losses", "ties", "prompts")}
        trial.set_user_attr("scores", {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                       for k, v in flat.items()})
        kl = scores.get("kl")
        feasible = s.max_kl is None or (kl is not None and not math.isnan(kl) and kl <= s.max_kl)
        trial.set_user_attr("feasible", feasible)
        if s.max_kl is not None:  # Optuna's constraint: <= 0 is feasible; TPE then prefers feasible regions
            measured = kl if kl is not None and not math.isnan(kl) else 1e9
            trial.set_constraint("kl", measured - s.max_kl)
        value = scores.get(s.objective)
        if value is None or math.isnan(value):
            trial.set_user_attr("error", f"objective {s.objective} is not a number ({value})")
            raise TrialFailed(f"objective {s.objective} is not a number ({value})")
        self.log(f"sweep: trial {trial.number}: {s.objective} = {value:.4g}, KL {kl if kl is None else f'{kl:.4g}'}"
                 + ("" if feasible else f" (infeasible: KL > sweep.max_kl {s.max_kl:g})"))
        return float(value)


def run_trial_process(trial, tdir: Path, plan: Plan) -> dict:
    """Run ``python -m preftune.tune.trial TDIR``; report its evaluations to Optuna; prune or fail it."""
    import optuna

    s = plan.settings
    metric_split, _, metric_key = s.prune_metric.partition("/")
    higher = adapter.metric_direction(s.prune_metric, s.prune_mode) == "max"
    sign = 1.0 if higher == (plan.direction == "maximize") else -1.0  # pruners compare in the study's direction
    (tdir / "error.txt").unlink(missing_ok=True)
    env = {**os.environ, "PREFTUNE_TRIAL_PARENT": str(os.getpid())}
    reported: set[int] = set()
    metrics = tdir / "run" / "metrics.jsonl"
    with open(tdir / "log.txt", "a", encoding="utf-8") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "preftune.tune.trial", str(tdir)], stdout=logf,
                                stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                rc = proc.poll()
                for step, value in _eval_points(metrics, metric_split, metric_key, reported):
                    trial.report(sign * value, step)
                    reported.add(step)
                    if rc is None and trial.should_prune():
                        proc.terminate()
                        proc.wait(timeout=60)
                        raise optuna.TrialPruned(f"{s.prune_metric} = {value:.4g} at step {step}")
                if rc is not None:
                    break
                time.sleep(s.poll_seconds)
        finally:
            if proc.poll() is None:  # the driver is stopping (Ctrl-C, an error): take the run down with it
                proc.terminate()
                proc.wait(timeout=60)
    if rc != 0:
        error = (tdir / "error.txt").read_text().strip() if (tdir / "error.txt").exists() else \
            f"the trial process exited with {rc}; see {tdir / 'log.txt'}"
        raise TrialFailed(error)
    scores = read_json(tdir / "scores.json")
    if scores is None:
        raise TrialFailed(f"the trial process wrote no scores; see {tdir / 'log.txt'}")
    return scores


def _eval_points(path: Path, split: str, key: str, reported: set[int]) -> list[tuple[int, float]]:
    """(step, value) of the evaluations in ``metrics.jsonl`` not yet reported (a partial last line is skipped)."""
    import json

    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        value = rec.get(key)
        if rec.get("split") == split and rec.get("step") not in reported and isinstance(value, (int, float)) \
                and math.isfinite(value):
            out.append((int(rec["step"]), float(value)))
    return sorted(set(out))
