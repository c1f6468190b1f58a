"""Convert between the preference-data layouts users meet; every input row is converted or dropped with a reason.

Input formats (``--from``, detected per row when not given):
    standard        {"prompt": str, "chosen": str, "rejected": str} (prompt may be implicit, see formats.py)
    conversational  {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]} or full dialogues without prompt
    hh              HH-RLHF: {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."} (full dialogues)
    ultrafeedback   {"prompt" | "instruction": str, "completions": [{"response": str, "overall_score": x}, ...]}
                    or {"prompt": str, "responses": [str], "ratings" | "scores": [x]}
    kto             {"prompt", "completion", "label"} (output only: unpaired data cannot be paired)
Output formats (``--to``): standard, conversational, hh, kto. ``--to standard`` writes text prompts: a single
user turn, after any system messages, becomes "{system}\n\n{user}" (``--prompt-style plain``); prompts with
earlier turns need ``--prompt-style hh`` or ``--to conversational`` (dropped as ``multi_turn_prompt``).

Every paired row goes through ``formats.to_pair``, so what is written is exactly what the trainer accepts; rows
it rejects (empty or identical responses, missing fields) are written to ``OUT.dropped.jsonl`` with the
reason. UltraFeedback rows become pairs by ``pairing``: best-vs-worst, best-vs-random (seeded), or all pairs
whose rating margin is > 0 and >= ``min_margin``; the ratings are kept as ``score_chosen`` / ``score_rejected``.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.data.formats import Skip, Text, is_unpaired_row, to_pair
from preftune.data.load import MAX_ROW_BYTES, read_rows
from preftune.data.outputs import AtomicJsonl, dropped_path_for, refuse_overwrite
from preftune.errors import PreftuneError

FORMATS_IN = ("standard", "conversational", "hh", "ultrafeedback")
FORMATS_OUT = ("standard", "conversational", "hh", "kto")
PAIRINGS = ("best-vs-worst", "best-vs-random", "all")
PROMPT_STYLES = ("plain", "hh")
TEXT_KEYS = ("response", "text", "completion", "content", "output")
RATING_KEYS = ("overall_score", "rating", "score", "fine-grained_score")
_HH_ROLES = {"Human": "user", "Assistant": "assistant", "System": "system"}
_HH_NAMES = {v: k for k, v in _HH_ROLES.items()}
_HH_SPLIT = re.compile(r"(?:^|\n\n)(Human|Assistant|System): ?")
_PAIR_KEYS = ("prompt", "chosen", "rejected")
_UF_KEYS = ("prompt", "instruction", "completions", "responses", "ratings", "scores")


@dataclass
class ConvertResult:
    """Counts of one ``convert`` run: ``read == converted + dropped``; ``written`` counts output records."""

    read: int = 0
    converted: int = 0
    dropped: int = 0
    written: int = 0
    reasons: Counter = field(default_factory=Counter)
    out: Path | None = None
    dropped_path: Path | None = None

    def summary(self) -> str:
        lines = [f"read {self.read}, converted {self.converted}, dropped {self.dropped}; "
                 f"wrote {self.written} records to {self.out}"]
        if self.reasons:
            lines.append("dropped by reason: " + ", ".join(f"{r}: {n}" for r, n in self.reasons.most_common())
                         + f" (rows in {self.dropped_path})")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Row-level conversions (pure functions)


def detect_format(row: dict) -> str:
    """The input format of one row (see the module docstring); raises Skip("unknown_format") otherwise."""
    if "completions" in row or ("responses" in row and ("ratings" in row or "scores" in row)):
        return "ultrafeedback"
    if is_unpaired_row(row):
        return "kto"
    if "chosen" in row or "rejected" in row:
        chosen = row.get("chosen")
        if isinstance(chosen, list):
            return "conversational"
        if row.get("prompt") is None and isinstance(chosen, str) and _HH_SPLIT.search(chosen):
            return "hh"
        return "standard"
    raise Skip("unknown_format")


def parse_hh(text: str) -> list[dict[str, str]]:
    """ "\\n\\nHuman: hi\\n\\nAssistant: hello" -> [{"role": "user", "content": "hi"}, {"role": "assistant", ...}]."""
    parts = _HH_SPLIT.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise Skip("no_turn_markers")
    return [{"role": _HH_ROLES[parts[i]], "content": parts[i + 1]} for i in range(1, len(parts), 2)]


def render_hh(messages: list[dict[str, str]]) -> str:
    """The inverse of :func:`parse_hh`: each message as "\\n\\n{Human|Assistant|System}: {content}"."""
    out = []
    for m in messages:
        name = _HH_NAMES.get(m.get("role", ""))
        if name is None:
            raise Skip(f"unsupported_role:{m.get('role')}")
        out.append(f"\n\n{name}: {m['content']}")
    return "".join(out)


def _as_messages(value: Text, role: str) -> list[dict[str, str]]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def _prompt_text(prompt: Text, style: str) -> str:
    """The prompt as text. Plain: one user turn, after any leading system messages, which open the text
    ("{system}\n\n{user}"): a text prompt is tokenized as it stands (no chat template), so the system text is
    kept as the prompt's first paragraph. A prompt with earlier user or assistant turns cannot be plain text."""
    if isinstance(prompt, str):
        return prompt if style == "plain" else render_hh(_as_messages(prompt, "user")) + "\n\nAssistant:"
    if style == "hh":
        return render_hh(prompt) + "\n\nAssistant:"
    *system, last = prompt
    if last.get("role") == "user" and all(m.get("role") == "system" for m in system):
        return "\n\n".join([m["content"] for m in system if m["content"].strip()] + [last["content"]])
    raise Skip("multi_turn_prompt")  # plain text cannot hold turns: use --prompt-style hh or conversational


def _completion_text(value: Text, style: str) -> str:
    text = value if isinstance(value, str) else "\n\n".join(m["content"] for m in value)
    # HH transcripts end the prompt with "Assistant:" and start the completion with a space (as in HH-RLHF).
    return " " + text if style == "hh" and not text.startswith(" ") else text


def _extras(row: dict, skip: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in skip}


def _pairs_from_paired(row: dict, fmt: str) -> list[tuple[Text, Text, Text, dict]]:
    if fmt == "hh":
        for key in ("chosen", "rejected"):
            if not isinstance(row.get(key), str):
                raise Skip(f"missing_field:{key}" if row.get(key) is None else f"wrong_type:{key}")
        row = {**row, "chosen": parse_hh(row["chosen"]), "rejected": parse_hh(row["rejected"])}
    pair = to_pair(row)
    return [(pair.prompt, pair.chosen, pair.rejected, _extras(row, _PAIR_KEYS))]


def _rated_completions(row: dict, rating_key: str | None) -> list[tuple[str, float]]:
    if "completions" in row:
        comps = row["completions"]
        if not isinstance(comps, list):
            raise Skip("wrong_type:completions")
        out = []
        for c in comps:
            if not isinstance(c, dict):
                continue
            text = next((c[k] for k in TEXT_KEYS if isinstance(c.get(k), str)), None)
            keys = (rating_key,) if rating_key else RATING_KEYS
            rating = next((c[k] for k in keys if k in c), None)
            if text is not None and _number(rating) is not None:
                out.append((text, _number(rating)))
        return out
    responses, ratings = row.get("responses"), row.get("ratings", row.get("scores"))
    if not isinstance(responses, list) or not isinstance(ratings, list) or len(responses) != len(ratings):
        raise Skip("responses_and_ratings_differ_in_length")
    return [(t, _number(r)) for t, r in zip(responses, ratings) if isinstance(t, str) and _number(r) is not None]


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if v != v else v


def ultrafeedback_pairs(row: dict, *, pairing: str = "best-vs-worst", min_margin: float | None = None,
                        rng: random.Random | None = None, rating_key: str | None = None
                        ) -> list[tuple[str, str, str, float, float]]:
    """(prompt, chosen, rejected, chosen rating, rejected rating) from one row of rated completions.

    A pair needs chosen rating - rejected rating > 0 and >= ``min_margin`` when given, and different texts.
        best-vs-worst   highest-rated vs lowest-rated (first occurrence on ties)
        best-vs-random  highest-rated vs one of the completions rated below it by the margin, drawn with ``rng``
        all             every such pair, in input order (i before j), oriented by rating
    """
    prompt = row.get("prompt", row.get("instruction"))
    if not isinstance(prompt, str):
        raise Skip("missing_field:prompt" if prompt is None else "wrong_type:prompt")
    comps = _rated_completions(row, rating_key)
    if len(comps) < 2:
        raise Skip("fewer_than_two_rated_completions")

    def ok(hi: tuple[str, float], lo: tuple[str, float]) -> bool:
        margin = hi[1] - lo[1]
        return margin > 0 and (min_margin is None or margin >= min_margin) and hi[0] != lo[0] and bool(
            hi[0].strip()) and bool(lo[0].strip())

    if pairing == "best-vs-worst":
        best = max(comps, key=lambda c: c[1])
        worst = min(comps, key=lambda c: c[1])
        pairs = [(best, worst)] if ok(best, worst) else []
    elif pairing == "best-vs-random":
        best = max(comps, key=lambda c: c[1])
        below = [c for c in comps if ok(best, c)]
        pairs = [(best, (rng or random.Random(0)).choice(below))] if below else []
    elif pairing == "all":
        pairs = []
        for i in range(len(comps)):
            for j in range(i + 1, len(comps)):
                a, b = comps[i], comps[j]
                if ok(a, b):
                    pairs.append((a, b))
                elif ok(b, a):
                    pairs.append((b, a))
    else:
        raise ValueError(f"unknown pairing {pairing!r}; choose from {', '.join(PAIRINGS)}")
    if not pairs:
        raise Skip("no_pair_with_rating_margin")
    return [(prompt, hi[0], lo[0], hi[1], lo[1]) for hi, lo in pairs]


def render_pair(prompt: Text, chosen: Text, rejected: Text, extras: dict, to: str,
                prompt_style: str = "plain") -> list[dict[str, Any]]:
    """One canonical pair as output records of format ``to`` (two records for kto)."""
    if to == "standard":
        return [{"prompt": _prompt_text(prompt, prompt_style), "chosen": _completion_text(chosen, prompt_style),
                 "rejected": _completion_text(rejected, prompt_style), **extras}]
    if to == "conversational":
        return [{"prompt": _as_messages(prompt, "user"), "chosen": _as_messages(chosen, "assistant"),
                 "rejected": _as_messages(rejected, "assistant"), **extras}]
    if to == "hh":
        p = _as_messages(prompt, "user")
        return [{"chosen": render_hh(p + _as_messages(chosen, "assistant")),
                 "rejected": render_hh(p + _as_messages(rejected, "assistant")), **extras}]
    if to == "kto":
        # The KTO paper's recipe for paired data: chosen is desirable, rejected undesirable (arXiv:2402.01306v4).
        rest = {k: v for k, v in extras.items() if k not in ("score_chosen", "score_rejected")}
        return [{"prompt": prompt, "completion": chosen, "label": True, **rest},
                {"prompt": prompt, "completion": rejected, "label": False, **rest}]
    raise ValueError(f"unknown output format {to!r}; choose from {', '.join(FORMATS_OUT)}")


def convert_row(row: dict, *, to: str, from_: str | None = None, pairing: str = "best-vs-worst",
                min_margin: float | None = None, rng: random.Random | None = None, rating_key: str | None = None,
                prompt_style: str = "plain") -> list[dict[str, Any]]:
    """Convert one input row to output records; raises :class:`Skip` with the reason when it cannot."""
    fmt = from_ or detect_format(row)
    if fmt == "kto":
        raise Skip("unpaired_row_cannot_be_paired")
    if fmt == "ultrafeedback":
        extras = _extras(row, _UF_KEYS)
        out = []
        for p, c, r, sc, sr in ultrafeedback_pairs(row, pairing=pairing, min_margin=min_margin, rng=rng,
                                                   rating_key=rating_key):
            out += render_pair(p, c, r, {**extras, "score_chosen": sc, "score_rejected": sr}, to, prompt_style)
        return out
    out = []
    for p, c, r, extras in _pairs_from_paired(row, fmt):
        out += render_pair(p, c, r, extras, to, prompt_style)
    return out


def convert(source: Any, out: str | Path, *, to: str, from_: str | None = None, pairing: str = "best-vs-worst",
            min_margin: float | None = None, seed: int = 0, rating_key: str | None = None,
            prompt_style: str = "plain", split: str = "train", max_row_bytes: int = MAX_ROW_BYTES) -> ConvertResult:
    """Convert a whole dataset to JSONL at ``out``; dropped input rows go to ``out.dropped.jsonl``.

    Neither output may be ``source`` (also under another name); both are standard JSON (``data.outputs``).
    """
    for name, value, allowed in (("output format", to, FORMATS_OUT), ("pairing", pairing, PAIRINGS),
                                 ("prompt style", prompt_style, PROMPT_STYLES)):
        if value not in allowed:
            raise PreftuneError(f"unknown {name} {value!r}; choose from {', '.join(allowed)}")
    if from_ is not None and from_ not in FORMATS_IN:
        raise PreftuneError(f"unknown input format {from_!r}; choose from {', '.join(FORMATS_IN)} "
                            "(unpaired KTO data cannot be converted to pairs)")
    rng = random.Random(seed)
    out = Path(out)
    res = ConvertResult(out=out, dropped_path=dropped_path_for(out))
    refuse_overwrite([source], [out, res.dropped_path])
    with AtomicJsonl(out) as fo, AtomicJsonl(res.dropped_path) as fd:
        for raw in read_rows(source, split=split, collect_errors=True, max_row_bytes=max_row_bytes):
            res.read += 1
            try:
                if raw.data is None:
                    raise Skip(raw.drop_reason)
                records = convert_row(raw.data, to=to, from_=from_, pairing=pairing, min_margin=min_margin,
                                      rng=rng, rating_key=rating_key, prompt_style=prompt_style)
            except Skip as skip:
                res.dropped += 1
                reason = str(skip)
                res.reasons[reason.split(":")[0] if reason.startswith("malformed_line") else reason] += 1
                fd.write({"source": raw.source, "line": raw.line, "reason": reason,
                          "row": raw.data if raw.data is not None else raw.raw})
                continue
            res.converted += 1
            for rec in records:
                fo.write(rec)
                res.written += 1
        if res.converted + res.dropped != res.read:  # by construction; checked because nothing may be lost
            raise PreftuneError(f"internal error: read {res.read}, converted {res.converted}, dropped {res.dropped}")
    return res
