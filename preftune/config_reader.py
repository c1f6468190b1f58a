"""Reading a tree of typed dataclasses: every type, range and key problem collected, then raised as one error.

The schema itself (the sections of ``preftune.config``) knows nothing of this machinery beyond two markers on a
field: :func:`within` declares the interval its numbers must lie in, and ``metadata={"rest": (placeholder,
type)}`` marks a dict field that collects the section's other keys (the loss hyperparameters). YAML is read with YAML 1.2 number
rules, so ``5e-6`` is a float (PyYAML's YAML 1.1 reads it as a string).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from preftune.errors import ConfigError

REQUIRED: Any = dataclasses.MISSING


# ---- ranges ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """A closed, open or half-open interval of numbers; ``None`` bounds are infinite."""

    low: float | None
    high: float | None
    low_open: bool = False
    high_open: bool = False

    @classmethod
    def parse(cls, text: str) -> Interval:
        """``"[0, 1]"``, ``"(0, ∞)"``, ``"[1, ∞)"`` (``inf`` also reads as ∞)."""
        m = re.fullmatch(r"\s*([\[(])\s*([^,]+?)\s*,\s*([^,]+?)\s*([\])])\s*", text)
        if not m:
            raise ValueError(f"not an interval: {text!r}")
        lo, hi = (None if b.lstrip("+-") in ("∞", "inf") else float(b) for b in (m[2], m[3]))
        return cls(lo, hi, m[1] == "(", m[4] == ")")

    def __contains__(self, x: float) -> bool:
        if isinstance(x, float) and math.isnan(x):
            return False
        above = self.low is None or (x > self.low if self.low_open else x >= self.low)
        below = self.high is None or (x < self.high if self.high_open else x <= self.high)
        return above and below

    def __str__(self) -> str:
        def num(v: float | None, sign: str) -> str:
            return f"{sign}∞" if v is None else str(int(v)) if float(v).is_integer() else f"{v:g}"

        return (f"{'(' if self.low_open or self.low is None else '['}{num(self.low, '-')}, "
                f"{num(self.high, '')}{')' if self.high_open or self.high is None else ']'}")


def within(interval: str, default: Any = REQUIRED, *, default_factory: Any = REQUIRED) -> Any:
    """A dataclass field whose numbers (each item, for a list) must lie in ``interval``; None passes."""
    return field(default=default, default_factory=default_factory, metadata={"range": Interval.parse(interval)})


# ---- problems ----------------------------------------------------------------------------------------------


class Problems:
    """Every problem found in a config, each under the dotted key it concerns; raised together as one error."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, key: str, message: str) -> None:
        self.items.append((key, message))

    def touches(self, *keys: str) -> bool:
        """Whether a problem sits at, inside or above one of ``keys`` (so a check reading them must not run)."""
        return any(k == p or k.startswith(p + ".") or p.startswith(k + ".") for p, _ in self.items for k in keys)

    def raise_if_any(self) -> None:
        """One ConfigError: the message itself for one problem, else all of them numbered on one line."""
        messages = list(dict.fromkeys(m for _, m in self.items))
        if not messages:
            return
        text = messages[0] if len(messages) == 1 else (
            f"{len(messages)} problems in the config: " + "; ".join(f"({i}) {m}" for i, m in enumerate(messages, 1)))
        error = ConfigError(text)
        error.problems = messages  # for callers that show them one per line
        raise error


# ---- types -------------------------------------------------------------------------------------------------


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _sections(tp: Any) -> list[type]:
    return [a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)]


class Reader:
    """Builds a dataclass tree from nested dicts, collecting problems instead of stopping at the first.

    ``known`` gives every dotted key a config may hold (for suggestions across sections); ``renamed`` maps a
    foreign key name (TRL's) to the sentence that points it home.
    """

    def __init__(self, known: Callable[[], list[str]], renamed: dict[str, str]):
        self.known, self.renamed = known, renamed

    def build(self, cls: type, values: dict, where: str, problems: Problems) -> Any:
        """An instance of ``cls``: a bad value leaves its field at the default, a missing required one at None."""
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        rest = next((f.name for f in fields if f.metadata.get("rest")), None)
        names = [f.name for f in fields if f.name != rest]
        if rest is not None:  # the section's other keys (loss hyperparameters) are checked by their owner
            values = {**{k: v for k, v in values.items() if k in names},
                      rest: {k: v for k, v in values.items() if k not in names}}
        kwargs, suggested = {}, set()
        for key, value in values.items():
            dotted = join(where, key)
            if key not in names and key != rest:
                message, hints_to = self.unknown(where, key, names)
                problems.add(dotted, message)
                suggested.update(hints_to)
                continue
            try:
                kwargs[key] = self.coerce(value, hints[key], dotted, problems)
            except ConfigError as e:
                problems.add(dotted, str(e))
                kwargs[key] = None  # a placeholder; given, so not "missing" below
                continue
            interval = next(f.metadata.get("range") for f in fields if f.name == key)
            for at, number in _numbers(kwargs[key], dotted) if interval else ():
                if number not in interval:
                    problems.add(dotted, f"{at}: {number if isinstance(number, int) else f'{number:g}'} is outside "
                                         f"{interval}")
        for f in fields:
            if f.name not in kwargs and f.default is REQUIRED and f.default_factory is REQUIRED:
                kwargs[f.name] = None  # a placeholder: the problem below stops the build
                if join(where, f.name) not in suggested:  # "Did you mean <it>?" already says it is missing
                    problems.add(join(where, f.name), f"missing required key '{join(where, f.name)}'")
        return cls(**kwargs)

    def coerce(self, value: Any, tp: Any, where: str, problems: Problems) -> Any:
        """``value`` checked against ``tp``, with the conversions YAML users expect (an integral float as int)."""
        if tp is Any:
            return value
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            if isinstance(value, dict) and _sections(tp):  # a section: its own problems come through
                return self.coerce(value, _sections(tp)[0], where, problems)
            for arg in typing.get_args(tp):
                try:
                    return self.coerce(value, arg, where, problems)
                except ConfigError:
                    continue
            raise ConfigError(f"{where}: expected {type_name(tp)}, got {value!r}")
        if origin is Literal:
            if value in typing.get_args(tp):
                return value
            near = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{where}: expected one of {type_name(tp)}, got {value!r}{hint}")
        if origin is list:
            if not isinstance(value, list):
                raise ConfigError(f"{where}: expected {type_name(tp)}, got {value!r}")
            (item,) = typing.get_args(tp)
            return [self.coerce(v, item, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        if origin is dict:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping, got {value!r}")
            return dict(value)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
            return self.build(tp, value, where, problems)
        return _scalar(value, tp, where)

    def unknown(self, where: str, key: str, valid: list[str], listing: str = "Valid keys") -> tuple[str, list[str]]:
        """The message for an unknown key and the keys it suggests: TRL's name pointed home, the same name in
        another section, the nearest key of this section, the nearest key anywhere, else ``listing: valid``."""
        dotted = join(where, key)
        if key in self.renamed:
            return f"unknown key '{dotted}': {self.renamed[key]}", []
        known = self.known()
        elsewhere = [k for k in known if k.rsplit(".", 1)[-1] == key and k != dotted]
        if not elsewhere:  # the closest name: of this section (similarity >= 0.5), or of any (>= 0.8, and closer)
            def score(name: str) -> float:
                return difflib.SequenceMatcher(None, key, name).ratio()

            here = max(valid, key=score, default="")
            anywhere = max(known, key=lambda k: score(k.rsplit(".", 1)[-1]), default="")
            near = score(anywhere.rsplit(".", 1)[-1])
            if near >= 0.8 and near > score(here):
                elsewhere = [anywhere]
            elif score(here) >= 0.5:
                elsewhere = [join(where, here)]
        if elsewhere:
            return f"unknown key '{dotted}'. Did you mean {' or '.join(repr(k) for k in elsewhere)}?", elsewhere
        return f"unknown key '{dotted}'. {listing}: {', '.join(valid)}.", []


def _scalar(value: Any, tp: Any, where: str) -> Any:
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # a number written as a string from Python
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")


def _numbers(value: Any, where: str) -> list[tuple[str, float]]:
    """(dotted key, number) for a number or each number of a list; None (a documented sentinel) has none."""
    if isinstance(value, list):
        return [(f"{where}[{i}]", v) for i, v in enumerate(value) if isinstance(v, (int, float))]
    return [(where, value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


# ---- YAML and overrides -------------------------------------------------------------------------------------


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats without a dot or an exponent sign (``5e-6``, ``1e5``)."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def yaml_value(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)


def load_yaml(path: str | Path) -> dict:
    """The mapping in a YAML file; a parse error names the file, line and column."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml_value(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        # An unclosed bracket is detected at the end of the file; the context mark says where it was opened.
        mark = getattr(e, "context_mark", None) or getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{at}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections, got {type(tree).__name__}")
    return tree


def parse_overrides(items: list[str]) -> dict:
    """``["training.learning_rate=1e-5", "lora=null"]`` -> nested dict, values parsed as YAML scalars."""
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key.sub=value, got {item!r}")
        key, raw = item.split("=", 1)
        node = tree
        *parents, last = key.strip().split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        try:
            node[last] = yaml_value(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key.strip()}: the value {raw!r} is not valid YAML "
                              f"({getattr(e, 'problem', None) or e}); quote it to pass a string") from None
    return tree


def merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, section by section."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def shallow(obj: Any) -> Any:
    """A dataclass tree as nested dicts (a ``rest`` field spread into its section), field values uncopied."""
    if not dataclasses.is_dataclass(obj):
        return obj
    out: dict = {}
    for f in dataclasses.fields(obj):
        if f.metadata.get("rest"):
            out.update(getattr(obj, f.name))
        else:
            out[f.name] = shallow(getattr(obj, f.name))
    return out


# ---- documentation ------------------------------------------------------------------------------------------


def field_docs(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type with its range, default, doc) for every field, read from the string under each field."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key, sub = join(prefix, f.name), _sections(hints[f.name])
        if f.default is REQUIRED and f.default_factory is REQUIRED:
            default = "required"
        elif f.default_factory is not REQUIRED:
            default = "" if sub else repr(f.default_factory())
        else:
            default = repr(f.default)
        if sub:
            rows.append((key, "section", default, docs.get(f.name, "")))
            rows.extend(field_docs(sub[0], key))
        elif f.metadata.get("rest"):  # not a key itself: the section's other keys, as (placeholder, type) say
            placeholder, kind = f.metadata["rest"]
            rows.append((join(prefix, placeholder), kind, "", docs.get(f.name, "")))
        else:
            rows.append((key, _typed_range(hints[f.name], f.metadata.get("range")), default, docs.get(f.name, "")))
    return rows


def _typed_range(tp: Any, interval: Interval | None) -> str:
    """``float in [0, 1]``, ``int in [1, ∞) or null``: the type with the range its numbers must lie in."""
    if interval is None:
        return type_name(tp)
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    numeric = " or ".join(type_name(a) for a in args if a is not type(None))
    return f"{numeric} in {interval}" + (" or null" if type(None) in args else "")
