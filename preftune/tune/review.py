"""The human check: blind A/B sheets for raters (``review export``) and their answers as numbers (``review import``).

Export: the greedy responses of a run's model and of the other side (the run's recorded reference, or
``--against``) to each prompt become one item, shown as A and B in an order drawn per item from ``--seed``.
``SHEET.csv`` (item_id, prompt, response_a, response_b, and empty choice / rater / comment columns) and
``SHEET.html`` (a form that downloads the answers as CSV) carry no model names; the key file (default
``SHEET.key.json``, to be kept from the raters) maps each item's A and B to ``policy`` / ``reference`` and keeps
the texts, so import needs only the answers and the key.

Import: every answer (item_id, rater, choice a / b / tie) is mapped through the key to a policy win (1), a tie
(½) or a loss (0). With y_i the mean outcome of item i over its raters and m answered items:

    win_rate = (1/m) Σ_i y_i        (each item weighs the same, however many raters answered it)
    ci       = percentile bootstrap over items: 2000 resamples of the m values y_i, 2.5% and 97.5% quantiles

The bootstrap, not a Wilson interval: a tie counts ½ and several raters answer one item, so the ratings are
not independent Bernoulli trials; resampling whole items keeps each item's ratings together and handles
fractional outcomes (``scoring.bootstrap_ci``). κ between raters is ``preftune data agreement``'s (Cohen for two
raters, Fleiss for more), on the labels policy / reference / tie, with each rater's position bias. With
``--judge``, the judge answers the same items (pairwise judges both orders) and its verdicts are compared with
the raters' majority: the share of items where they agree and Cohen's κ between judge and majority.
"""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError
from preftune.tune import adapter
from preftune.tune.files import fingerprint, read_json, write_json, write_text
from preftune.tune.review_html import render_form
from preftune.tune.scoring import bootstrap_ci, greedy_responses
from preftune.tune.tables import write_csv

CHOICES = {"a": "a", "b": "b", "tie": "tie", "equal": "tie", "same": "tie", "both": "tie", "neither": "tie"}
OUTCOME = {"policy": 1.0, "tie": 0.5, "reference": 0.0}


def resolve_model(run: str | Path) -> str:
    """The model of a run directory (``final/``), an iterate round (``train/final``), a sweep trial
    (``run/final``), or the path / hub id itself."""
    path = Path(run)
    for sub in ("final", "train/final", "run/final"):
        if (path / sub / "config.json").exists() or (path / sub / "adapter_config.json").exists():
            return str(path / sub)
    return str(run)


def recorded_reference(run: str | Path) -> str | None:
    """The reference a driver recorded for ``run``: an iterate round's SFT model, a sweep trial's reference."""
    path = Path(run)
    lineage = read_json(path / "lineage.json")
    if lineage:
        return lineage.get("sft_model")
    trial = read_json(path / "trial.json")
    if trial:
        return trial["score"]["reference_model"]
    return None


def export_sheet(run: str | Path, prompts: str | Path, out: str | Path, *, against: str | None = None,
                 key: str | Path | None = None, n: int | None = None, seed: int = 0,
                 max_new_tokens: int = 256, batch_size: int = 16) -> dict:
    """Write ``OUT.csv``, ``OUT.html`` and the key; returns their paths and the item count."""
    out = Path(out)
    out = out.with_suffix("") if out.suffix in (".csv", ".html") else out
    other = against or recorded_reference(run)
    if other is None:
        raise PreftuneError(f"{run} records no reference model; name the other side with --against RUN_OR_MODEL")
    policy_path, reference_path = resolve_model(run), resolve_model(other)
    prompts_list = adapter.read_prompts(prompts)[: n or None]
    if not prompts_list:
        raise PreftuneError(f"{prompts}: no prompts")
    tokenizer = adapter.load_tokenizer(None, policy_path)
    ids = adapter.encode_prompts(tokenizer, prompts_list)
    texts = {}
    for side, path in (("policy", policy_path), ("reference", reference_path)):
        model = adapter.load_model(path)
        texts[side] = greedy_responses(model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size)[1]
        del model
    rng = random.Random(seed)
    items, key_items = [], {}
    for i, p in enumerate(prompts_list):
        iid = f"{i + 1:04d}"
        a, b = ("policy", "reference") if rng.random() < 0.5 else ("reference", "policy")
        item = {"item_id": iid, "prompt": adapter.prompt_text(p), "response_a": texts[a][i],
                "response_b": texts[b][i]}
        items.append(item)
        key_items[iid] = {"a": a, "b": b, "prompt_id": adapter.prompt_id(p), **item}
    csv_path = write_csv(out.with_name(out.name + ".csv"), [{**it, "choice": "", "rater": "", "comment": ""}
                                                             for it in items],
                         ["item_id", "prompt", "response_a", "response_b", "choice", "rater", "comment"])
    html_path = out.with_name(out.name + ".html")
    write_text(html_path, render_form(out.name, items))
    key_path = Path(key) if key else out.with_name(out.name + ".key.json")
    write_json(key_path, {"sheet": out.name, "seed": seed, "models": {"policy": policy_path, "reference": reference_path},
                          "prompts": fingerprint(Path(prompts)), "max_new_tokens": max_new_tokens, "items": key_items})
    return {"csv": csv_path, "html": html_path, "key": key_path, "items": len(items)}


def read_answers(paths: list[Path], key: dict) -> tuple[list[dict], int]:
    """(answers {item, rater, choice}, blank answers skipped); a bad row is an error naming its file and line."""
    rows, blank, seen = [], 0, set()
    for path in paths:
        if not Path(path).exists():
            raise PreftuneError(f"answer sheet not found: {path}")
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"item_id", "choice"} - set(reader.fieldnames or [])
            if missing:
                raise PreftuneError(f"{path}: no column {', '.join(sorted(missing))} (expected item_id, rater, choice)")
            for line, row in enumerate(reader, 2):
                item, raw = (row.get("item_id") or "").strip(), (row.get("choice") or "").strip().lower()
                if not raw:
                    blank += 1
                    continue
                if item not in key["items"]:
                    raise PreftuneError(f"{path}:{line}: item_id {item!r} is not in the key (another sheet's key?)")
                if raw not in CHOICES:
                    raise PreftuneError(f"{path}:{line}: choice {raw!r}; expected a, b or tie")
                rater = (row.get("rater") or "").strip() or Path(path).stem
                if (item, rater) in seen:
                    raise PreftuneError(f"{path}:{line}: rater {rater!r} answered item {item} twice")
                seen.add((item, rater))
                choice = CHOICES[raw]
                rows.append({"item": item, "annotator": rater, "sheet_choice": choice,
                             "choice": "tie" if choice == "tie" else key["items"][item][choice],
                             "shown_first": key["items"][item]["a"]})
    if not rows:
        raise PreftuneError("no answered items in " + ", ".join(map(str, paths)))
    return rows, blank


def import_answers(sheets: list[str | Path], key_path: str | Path, *, judge: Any = None, seed: int = 0) -> dict:
    """Win rate with its bootstrap interval, κ between raters, agreement with a judge (see the module docstring)."""
    key = read_json(Path(key_path))
    if key is None:
        raise PreftuneError(f"key file not found: {key_path}")
    rows, blank = read_answers([Path(s) for s in sheets], key)
    by_item: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        by_item[r["item"]].append(OUTCOME[r["choice"]])
    items = sorted(by_item)
    y = [sum(by_item[i]) / len(by_item[i]) for i in items]
    lo, hi = bootstrap_ci(y, seed=seed)
    counts = {k: sum(r["choice"] == k for r in rows) for k in OUTCOME}
    report = adapter.agreement(rows)
    result: dict[str, Any] = {
        "sheet": key["sheet"], "models": key["models"], "answers": len(rows), "blank": blank, "items": len(items),
        "raters": report.annotators, "win_rate": sum(y) / len(y), "ci": [lo, hi],
        "ci_method": "percentile bootstrap over items, 2000 resamples, 95%",
        "policy_wins": counts["policy"], "reference_wins": counts["reference"], "ties": counts["tie"],
        "kappa": report.kappa, "per_rater": report.per_annotator,
    }
    if judge is not None:
        result["judge"] = judge_agreement(judge, key, report.item_agreement, items)
    return result


def judge_agreement(spec: Any, key: dict, item_agreement: dict, items: list[str]) -> dict:
    """The judge's verdicts on the same items against the raters' majority (items with a unique majority)."""
    judge = adapter.make_judge(spec)
    payload = [key["items"][i] for i in items]
    verdicts = judge.judge_many([(p["prompt"], p["response_a"], p["response_b"]) for p in payload])
    labels = {i: ("tie" if v.winner == "tie" else key["items"][i][v.winner.lower()]) for i, v in zip(items, verdicts)}
    majority = {i: item_agreement[i]["majority"] for i in items if item_agreement[i]["majority"] is not None}
    shared = sorted(majority)
    agree = sum(labels[i] == majority[i] for i in shared)
    outcomes = [OUTCOME[labels[i]] for i in items]
    return {"judge": judge.name, "items": len(items), "compared": len(shared),
            "agreement": agree / len(shared) if shared else None,
            "kappa": adapter.cohen_kappa([labels[i] for i in shared], [majority[i] for i in shared]) if shared else None,
            "judge_win_rate": sum(outcomes) / len(outcomes), "verdicts": labels}


def format_result(result: dict) -> str:
    """A few readable lines of an import result."""
    k = result["kappa"]
    kappa = "n/a" if k.get("value") is None else f"{k['value']:.3f}"
    lines = [f"{result['answers']} answers on {result['items']} items by {len(result['raters'])} raters "
             f"({result['blank']} blank); policy {result['models']['policy']} vs reference "
             f"{result['models']['reference']}",
             f"win rate {result['win_rate']:.3f} (95% CI {result['ci'][0]:.3f} to {result['ci'][1]:.3f}, bootstrap "
             f"over items): {result['policy_wins']} policy, {result['reference_wins']} reference, {result['ties']} ties",
             f"agreement between raters: {k['method']} kappa {kappa} over {k['items']} items"]
    for name, a in result["per_rater"].items():
        share = a["position_bias"]["first_share"]
        lines.append(f"  {name}: {a['annotations']} answers, picked the response shown first in "
                     f"{'-' if share is None else f'{100 * share:.0f}%'} of decisions"
                     + (f" ({', '.join(a['flags'])})" if a["flags"] else ""))
    j = result.get("judge")
    if j:
        agree = "n/a" if j["agreement"] is None else f"{j['agreement']:.3f}"
        kj = "n/a" if j["kappa"] is None or j["kappa"] != j["kappa"] else f"{j['kappa']:.3f}"
        lines.append(f"judge {j['judge']}: agrees with the raters' majority on {agree} of {j['compared']} items "
                     f"(kappa {kj}); its win rate on the same items {j['judge_win_rate']:.3f}")
    return "\n".join(lines)
