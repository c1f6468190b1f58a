"""Scoring on-policy samples: reward functions with TRL's signature, and judges through the same interface.

A reward function is plain Python, referenced in the config as ``path/to/file.py:fn`` or ``package.module:fn``::

    def fn(prompts: list, completions: list, **columns) -> list[float | None]

called once per batch with one entry per completion (a prompt repeated for each of its samples), exactly as
TRL's ``GRPOTrainer`` calls it, so a reward function written for TRL works unchanged: a text prompt gives text
completions; a conversational prompt (a message list) gives completions as ``[{"role": "assistant",
"content": text}]``. ``columns`` are the prompt rows' other fields, repeated the same way, plus
``completion_ids`` (token ids, without the stop token). None means "no score" for that completion (masked out of
the combination, as TRL does). A judge (``preftune.judges``: verifiers, reward models, LLM judges) becomes a
reward function of the same shape: its ``score`` when it has one, else the wins of each sample against the
prompt's other samples, each comparison asked in both orders (a tie counts half).

Every call is checked: the function must return a list of len(completions) numbers or Nones; an exception, a
wrong count or a non-number is one error naming the function and the row.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.errors import ConfigError, PreftuneError
from preftune.judges.prompts import prompt_text


class RewardError(PreftuneError):
    """A reward function failed or answered something that is not one score per completion."""


def load_function(ref: str, what: str = "reward function") -> Callable[..., Any]:
    """``path/to/file.py:fn`` or ``package.module:fn`` -> the function; a clear ConfigError when it cannot be."""
    if not isinstance(ref, str) or ":" not in ref:
        raise ConfigError(f"{what} {ref!r}: expected 'path/to/file.py:function' or 'package.module:function'")
    target, _, name = ref.rpartition(":")
    if target.endswith(".py") or "/" in target or Path(target).exists():
        path = Path(target).expanduser()
        if not path.exists():
            raise ConfigError(f"{what} {ref!r}: file {path} not found")
        spec = importlib.util.spec_from_file_location(f"preftune_user_{path.stem}_{abs(hash(str(path)))}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise ConfigError(f"{what} {ref!r}: importing {path} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ConfigError(f"{what} {ref!r}: cannot import module {target!r} ({e})") from None
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:12]
        raise ConfigError(f"{what} {ref!r}: {target} has no function {name!r} (it has: {', '.join(public)})")
    return fn


@dataclass
class RewardFunction:
    """One named scorer and its weight in the sum."""

    name: str
    fn: Callable[..., Any]
    weight: float = 1.0

    def __call__(self, prompts: list, completions: list, columns: dict[str, list]) -> list[float]:
        """Scores of the completions, None as NaN; every failure is a RewardError naming the function and row."""
        try:
            out = self.fn(prompts=prompts, completions=completions, **columns)
        except RewardError:
            raise
        except Exception as e:
            row = _failing_row(self.fn, prompts, completions, columns)
            where = f" on row {row} (prompt {_short(prompts[row])!r}, completion {_short(completions[row])!r})" \
                if row is not None else ""
            raise RewardError(f"reward function {self.name} raised {type(e).__name__}: {e}{where}") from None
        if hasattr(out, "tolist"):  # numpy arrays, tensors
            out = out.tolist()
        if not isinstance(out, (list, tuple)) or len(out) != len(completions):
            got = f"{len(out)} values" if isinstance(out, (list, tuple)) else type(out).__name__
            raise RewardError(f"reward function {self.name} returned {got} for {len(completions)} completions; it "
                              "must return one float (or None) per completion")
        scores = []
        for i, v in enumerate(out):
            if v is None:
                scores.append(math.nan)
            elif isinstance(v, bool) or isinstance(v, (int, float)):
                scores.append(float(v))
            else:
                raise RewardError(f"reward function {self.name} returned {v!r} ({type(v).__name__}) for row {i} "
                                  f"(prompt {_short(prompts[i])!r}); expected a float or None")
        return scores


def _short(value: Any, n: int = 60) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _failing_row(fn, prompts, completions, columns) -> int | None:
    """The first row on which ``fn`` raises when called one row at a time (for the error message), or None."""
    for i in range(len(completions)):
        try:
            fn(prompts=prompts[i : i + 1], completions=completions[i : i + 1],
               **{k: v[i : i + 1] for k, v in columns.items()})
        except Exception:
            return i
    return None


def judge_function(judge, group_size: int, mode: str = "auto") -> Callable[..., list[float | None]]:
    """A judge as a reward function: ``judge.score`` per completion (``mode`` "score", or "auto" when the judge
    scores), else per-prompt wins ("pairwise").

    Wins: within each group of samples of one prompt (a run of consecutive completions of the same prompt, at
    most ``group_size`` long), every pair is judged (both orders, through the judge's own position-bias
    control); a win counts 1, a tie 0.5 to each side. The reward is the number of wins, in [0, group_size - 1].
    A completion alone with its prompt (a held-out greedy sample) has nothing to be compared with: None.
    """

    def by_score(prompts, completions, **_):
        return judge.score_many([(prompt_text(p), _text(c)) for p, c in zip(prompts, completions)])

    def by_wins(prompts, completions, **_):
        wins: list[float | None] = [None] * len(completions)
        for idx in _prompt_groups(prompts, group_size):
            if len(idx) < 2:
                continue
            for a in idx:
                wins[a] = 0.0
            pairs = [(a, b) for a in idx for b in idx if a < b]
            verdicts = judge.judge_many([(prompt_text(prompts[a]), _text(completions[a]), _text(completions[b]))
                                         for a, b in pairs])
            for (a, b), v in zip(pairs, verdicts):
                if v.winner == "A":
                    wins[a] += 1.0
                elif v.winner == "B":
                    wins[b] += 1.0
                else:
                    wins[a] += 0.5
                    wins[b] += 0.5
        return wins

    if mode == "auto":
        mode = "score" if judge.supports_score else "pairwise"
    if mode == "score" and not judge.supports_score or mode == "pairwise" and not judge.supports_pairwise:
        raise ConfigError(f"reward.judge_mode: {mode}, but judge {judge.name} does not "
                          f"{'score single responses' if mode == 'score' else 'compare pairs'}")
    return by_score if mode == "score" else by_wins


def _prompt_groups(prompts: list, group_size: int) -> list[range]:
    """Runs of consecutive equal prompts, each cut into pieces of at most ``group_size`` (index ranges)."""
    groups, start = [], 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or prompts[i] != prompts[start] or i - start == group_size:
            groups.append(range(start, i))
            start = i
    return groups


def _text(completion: Any) -> str:
    """A completion as text: itself, or the content of TRL's ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion)
    return completion


def build_reward_functions(reward_cfg, group_size: int) -> list[RewardFunction]:
    """The configured scorers: each ``reward.functions`` entry (a reference string, or ``{function: ref,
    name: ..., kwargs: {...}}``), then ``reward.judge``. Weights from ``reward.weights``."""
    if reward_cfg is None or (not reward_cfg.functions and reward_cfg.judge is None):
        raise ConfigError("an on-policy run needs `reward.functions` (e.g. ['my_rewards.py:score']) or "
                          "`reward.judge`")
    out = []
    for entry in reward_cfg.functions:
        if isinstance(entry, dict):
            extra = set(entry) - {"function", "name", "kwargs"}
            if "function" not in entry or extra:
                raise ConfigError(f"reward.functions entry {entry!r}: expected a reference string or "
                                  "{function: 'file.py:fn', name: ..., kwargs: {...}}")
            fn = load_function(entry["function"])
            kwargs = dict(entry.get("kwargs") or {})
            name = entry.get("name") or getattr(fn, "__name__", entry["function"])
            out.append(RewardFunction(name, _with_kwargs(fn, kwargs) if kwargs else fn))
        else:
            fn = load_function(entry)
            out.append(RewardFunction(getattr(fn, "__name__", str(entry)), fn))
    if reward_cfg.judge is not None:
        from preftune.judges.registry import build_judge
        from preftune.judges.spec import make_judge

        judge = make_judge(reward_cfg.judge) if isinstance(reward_cfg.judge, str) else build_judge(reward_cfg.judge)
        out.append(RewardFunction(f"judge:{judge.name}", judge_function(judge, group_size, reward_cfg.judge_mode)))
    weights = reward_cfg.weights
    if weights is not None:
        if len(weights) != len(out):
            raise ConfigError(f"reward.weights has {len(weights)} entries for {len(out)} reward functions "
                              f"({', '.join(f.name for f in out)})")
        for f, w in zip(out, weights):
            f.weight = float(w)
    names = [f.name for f in out]
    for i, f in enumerate(out):  # unique names for the per-function metrics
        if names.count(f.name) > 1:
            f.name = f"{f.name}#{i}"
    return out


def _with_kwargs(fn, kwargs: dict):
    params = inspect.signature(fn).parameters
    unknown = [k for k in kwargs if k not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values())]
    if unknown:
        raise ConfigError(f"reward function {fn.__name__}: unknown kwargs {unknown}")

    def call(prompts, completions, **columns):
        return fn(prompts=prompts, completions=completions, **{**columns, **kwargs})

    call.__name__ = getattr(fn, "__name__", "reward")
    return call


def score_completions(functions: Sequence[RewardFunction], prompts: list, completions: list,
                      columns: dict[str, list]) -> list[list[float]]:
    """Scores (F, N): one row per function, None as NaN."""
    return [f(prompts, completions, columns) for f in functions]


def check_functions(functions: Sequence[RewardFunction], prompt: Any, columns: dict[str, Any]) -> None:
    """Call every function once on one made-up completion of a real prompt, before any generation, so a
    broken function fails in seconds rather than after the first rollout."""
    completion = [{"role": "assistant", "content": ""}] if isinstance(prompt, list) else ""
    cols = {k: [v] for k, v in columns.items()}
    cols.setdefault("completion_ids", [[]])
    for f in functions:
        f([prompt], [completion], cols)
