"""``preftune eval``'s engine: :func:`evaluate_model` and :func:`format_table` (see ``preftune.eval``)."""

from __future__ import annotations

import math

from preftune.data.formats import DropLog, Skip, normalize
from preftune.data.load import read_rows
from preftune.data.tokenize import Tokenization
from preftune.errors import PreftuneError
from preftune.eval.drift import completion_token_logps, end_ids, generate_ids, generation_stats, kl_estimates
from preftune.eval.preference_accuracy import preference_metrics, score_pairs
from preftune.eval.win_rate import win_rate


def _load_pairs(data, tokenization: Tokenization) -> tuple[list, list, DropLog]:
    """(records, tokenized pairs) aligned one to one, and the drops (unusable rows, over-long prompts)."""
    drops = DropLog()
    records, pairs = [], []
    for rec in normalize(read_rows(data), "paired", drops):
        try:
            pairs.append(tokenization.pair(rec))
            records.append(rec)
        except Skip as skip:
            drops.drop(rec.source, rec.line, str(skip), {"prompt": rec.prompt})
    return records, pairs, drops


def evaluate_model(model, tokenizer, data, *, reference=None, judge=None, beta: float = 0.1, num_prompts: int = 64,
                   max_new_tokens: int = 64, max_length: int = 512, max_prompt_length: int | None = None,
                   batch_size: int = 8, seed: int = 0, log=print, before_judge=None) -> dict:
    """Evaluate ``model`` (and, when given, against ``reference``) on held-out preference pairs ``data``.

    ``data``: anything ``data.load.read_rows`` reads (a JSONL/Parquet/CSV path, a list of dicts, a Dataset).
    ``judge``: a :class:`~preftune.judges.Judge` for the win rate (needs ``reference``) and, when it scores
    single responses (a verifier, a reward model), the mean score of each side's greedy responses.
    ``beta`` scales the implicit-reward margins (not the accuracy). ``before_judge(result)`` is called with every
    other metric before the judge runs (so a failing judge loses none of them). Returns the JSON-ready result.
    """
    from preftune.judges.prompts import prompt_text

    tokenization = Tokenization(tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    records, pairs, drops = _load_pairs(data, tokenization)
    if not pairs:
        raise PreftuneError(f"no usable preference pairs in the data ({drops.summary()})")
    log(f"eval: {len(pairs)} pairs ({drops.summary()})")
    pad_id = tokenizer.pad_token_id
    result: dict = {"pairs": len(pairs), "dropped": dict(drops.counts), "beta": beta}

    # -- held-out pairs
    policy_scores = score_pairs(model, pairs, pad_id, batch_size)
    reference_scores = score_pairs(reference, pairs, pad_id, batch_size) if reference is not None else None
    result["preference"] = preference_metrics(policy_scores, reference_scores, beta)

    # -- generations on the distinct held-out prompts
    seen, prompts, texts = set(), [], []
    for rec, pair in zip(records, pairs):
        if tuple(pair.prompt_ids) not in seen and len(prompts) < num_prompts:
            seen.add(tuple(pair.prompt_ids))
            prompts.append(pair.prompt_ids)
            texts.append(prompt_text(rec.prompt))
    eos = end_ids(model, tokenizer)
    log(f"eval: generating for {len(prompts)} prompts (max {max_new_tokens} new tokens)")
    gen = dict(max_new_tokens=max_new_tokens, pad_id=pad_id, eos_ids=eos, seed=seed)
    sampled = generate_ids(model, prompts, temperature=1.0, **gen)
    generation: dict = {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "temperature": 1.0,
                        "model": generation_stats(sampled, eos)}
    if reference is not None:
        generation["reference"] = generation_stats(generate_ids(reference, prompts, temperature=1.0, **gen), eos)
        generation["kl"] = kl_estimates(completion_token_logps(model, prompts, sampled, pad_id, batch_size),
                                        completion_token_logps(reference, prompts, sampled, pad_id, batch_size))
    result["generation"] = generation

    # -- greedy responses, judged
    def greedy(m) -> tuple[list[str], list[int]]:
        ids = generate_ids(m, prompts, temperature=0.0, **gen)
        return ([tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids],
                [len([t for t in x if t not in eos]) for x in ids])

    model_text, model_len = greedy(model)
    ref_text, ref_len = greedy(reference) if reference is not None else (None, None)
    result["samples"] = [{"prompt": p, "model": a, **({"reference": ref_text[i]} if ref_text else {})}
                         for i, (p, a) in enumerate(zip(texts[:5], model_text))]
    if judge is not None:
        if before_judge is not None:
            before_judge(result)
        judged: dict = {"judge": judge.name}
        if judge.supports_score:
            judged["model_score"] = _mean(judge.score_many(list(zip(texts, model_text))))
            if ref_text is not None:
                judged["reference_score"] = _mean(judge.score_many(list(zip(texts, ref_text))))
        if ref_text is not None and judge.supports_pairwise:
            verdicts = judge.judge_many(list(zip(texts, model_text, ref_text)))
            judged.update(win_rate([v.winner for v in verdicts], model_len, ref_len))
            if not judge.order_invariant:
                judged["position_bias"] = judge.position_stats.as_dict()
        elif ref_text is None:
            judged["note"] = "win rate needs --reference"
        result["judge"] = judged
    return result


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def format_table(result: dict) -> str:
    """A compact two-column table (model | reference) of the headline numbers."""
    pref, gen = result["preference"], result["generation"]
    ref_gen = gen.get("reference") or {}
    judge = result.get("judge") or {}
    rows = [
        ("preference accuracy, implicit reward", pref.get("accuracy_implicit_reward"), None),
        ("preference accuracy, log-prob", pref["accuracy_logp"], pref.get("reference_accuracy_logp")),
        ("preference accuracy, log-prob per token", pref["accuracy_logp_per_token"], None),
        (f"margin mean (p05 / p95) [{pref['margin']['kind'].split(',')[0]}]",
         f"{_fmt(pref['margin']['mean'])} ({_fmt(pref['margin']['p05'])} / {_fmt(pref['margin']['p95'])})", None),
        ("chosen perplexity", pref["chosen_perplexity"], pref.get("reference_chosen_perplexity")),
        ("mean output length (tokens, sampled)", gen["model"]["length"], ref_gen.get("length")),
        ("distinct-1 / distinct-2", f"{_fmt(gen['model']['distinct_1'])} / {_fmt(gen['model']['distinct_2'])}",
         f"{_fmt(ref_gen.get('distinct_1'))} / {_fmt(ref_gen.get('distinct_2'))}" if ref_gen else None),
        ("self-repetition", gen["model"]["repetition"], ref_gen.get("repetition")),
    ]
    if "kl" in gen:
        kl = gen["kl"]
        rows.append(("KL to reference k1 / k3 per sequence", f"{_fmt(kl['kl/k1_seq'])} / {_fmt(kl['kl/k3_seq'])}",
                     None))
        rows.append(("KL to reference k1 / k3 per token", f"{_fmt(kl['kl/k1_token'], 4)} / "
                                                         f"{_fmt(kl['kl/k3_token'], 4)}", None))
    if "model_score" in judge:
        rows.append((f"mean judge score ({judge['judge']}, greedy)", judge["model_score"],
                     judge.get("reference_score")))
    if "win_rate" in judge:
        rows.append((f"win rate vs reference ({judge['wins']}W {judge['losses']}L {judge['ties']}T)",
                     judge["win_rate"], None))
        rows.append(("length-controlled win rate", judge["lc_win_rate"], None))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'model':>22}  {'reference':>22}"]
    for name, a, b in rows:
        lines.append(f"{name:<{width}}  {_fmt(a):>22}  {_fmt(b):>22}")
    return "\n".join(lines)
