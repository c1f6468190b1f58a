"""`preftune generate` / `preftune judge`: sampling with the toy Llama, an OpenAI-compatible server on 127.0.0.1,
pairs from the toy verifier with lineage, ties and margins, the length-bias check, and the CLI end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from preftune import toy
from preftune.data.validate import validate
from preftune.errors import PreftuneError
from preftune.judges import Judge, Verdict, VerifierJudge
from preftune.judges.spec import make_judge
from preftune.rollout.generate import (
    HFBackend,
    OpenAIBackend,
    assign_temperatures,
    generate_responses,
    prompt_id,
    response_seed,
    run_generation,
)
from preftune.synth.pairs import build_pairs, judge_generations, length_bias
from preftune.toy import verifier_score

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["say : cat dog fox", "echo : red blue", "copy : plum pear fig", "repeat : owl bee"]


@pytest.fixture(scope="module")
def toy_lm():
    tok = toy.build_tokenizer()
    return toy.build_model(tok, hidden=32).eval(), tok


def texts(rows):
    return [[r["text"] for r in row["responses"]] for row in rows]


# ---- generation ---------------------------------------------------------------------------------------------


def test_n_temperatures_seeds_and_batch_independence(toy_lm):
    model, tok = toy_lm
    kw = dict(n=5, temperatures=[0.0, 0.7, 1.0], max_new_tokens=5, seed=3)
    rows = list(generate_responses(model, tok, PROMPTS, batch_size=7, **kw))
    assert [r["prompt"] for r in rows] == PROMPTS
    for row in rows:
        resp = row["responses"]
        assert [r["temperature"] for r in resp] == [0.0, 0.7, 1.0, 0.0, 0.7]  # round-robin over temperatures
        assert [r["index"] for r in resp] == list(range(5))
        assert [r["seed"] for r in resp] == [response_seed(3, prompt_id(row["prompt"]), i) for i in range(5)]
        assert resp[0]["text"] == resp[3]["text"]  # temperature 0 is greedy: copies
        assert all(r["generator"].startswith("hf:") and r["finish_reason"] in ("stop", "length") for r in resp)
    # Same seed -> same text; batch size (and so batch-mates and padding) does not matter; another seed differs.
    assert texts(list(generate_responses(model, tok, PROMPTS, batch_size=1, **kw))) == texts(rows)
    other = list(generate_responses(model, tok, PROMPTS, batch_size=7, **{**kw, "seed": 4}))
    assert texts(other) != texts(rows)
    assert assign_temperatures(4, [0.3, 0.7, 1.0]) == [0.3, 0.7, 1.0, 0.3]


def test_chat_prompts_use_the_template(toy_lm):
    model, tok = toy_lm
    seen = []  # the input ids of every forward (the first is the prefill of the prompt)
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"]), with_kwargs=True)
    try:
        rows = list(generate_responses(model, tok, PROMPTS[:1], n=1, max_new_tokens=2, chat=True))
    finally:
        hook.remove()
    assert rows[0]["prompt"] == [{"role": "user", "content": PROMPTS[0]}]  # stored as messages for training
    assert tok.convert_tokens_to_ids("<|assistant|>") in seen[0][0].tolist()
    plain = toy.build_tokenizer()
    plain.chat_template = None
    with pytest.raises(PreftuneError, match="chat template"):
        list(generate_responses(model, plain, [[{"role": "user", "content": "say : cat"}]], n=1, max_new_tokens=1))


def test_resume_generates_only_missing_prompts(toy_lm, tmp_path):
    model, tok = toy_lm
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS + [PROMPTS[0]]) + "\n")
    backend = HFBackend(model, tok, max_new_tokens=4, batch_size=6, name="toy")
    calls = []
    sample = backend.sample
    backend.sample = lambda jobs: calls.append(len(jobs)) or sample(jobs)
    out = tmp_path / "gen.jsonl"
    kw = dict(n=3, temperatures=[0.5, 1.0], seed=1, settings={"max_new_tokens": 4}, progress=False)

    res = run_generation(backend, src, out, **kw)
    assert (res.prompts, res.generated, res.duplicates, sum(calls)) == (4, 4, 1, 12)
    full = out.read_text().splitlines()
    assert [json.loads(line)["source_line"] for line in full] == [1, 2, 3, 4]

    # A crash after one row, in the middle of writing the second.
    out.write_text(full[0] + "\n" + full[1][:40])
    calls.clear()
    res = run_generation(backend, src, out, **kw)
    assert (res.already_done, res.generated, res.repaired_partial_line, sum(calls)) == (1, 3, True, 9)
    assert out.read_text().splitlines() == full  # same rows as the uninterrupted run

    calls.clear()
    assert run_generation(backend, src, out, **kw).generated == 0 and sum(calls) == 0
    with pytest.raises(PreftuneError, match="n: 3 there, 2 now"):
        run_generation(backend, src, out, **{**kw, "n": 2})


# ---- OpenAI-compatible endpoint -----------------------------------------------------------------------------


class EchoServer:
    """Chat completions that echo "T=<temperature> S=<seed> <prompt>"; request 0 answers 429 once."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict, dict]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append((body, {k.lower(): v for k, v in self.headers.items()}))
                if len(owner.requests) == 1:
                    status, payload = 429, {"error": {"message": "slow down"}}
                else:
                    content = f"T={body['temperature']} S={body['seed']} {body['messages'][-1]['content']}"
                    status, payload = 200, {
                        "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": content}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
                    }  # fmt: skip
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("retry-after", "0")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_openai_backend_rows_retry_and_key_hygiene(tmp_path, monkeypatch, caplog):
    secret = "sk-gen-test-never-log-me"
    monkeypatch.setenv("GEN_TEST_KEY", secret)
    server = EchoServer()
    try:
        backend = OpenAIBackend("echo-model", base_url=server.url, api_key_env="GEN_TEST_KEY", max_new_tokens=8,
                                backoff_base=0.01, max_concurrency=3)
        src = tmp_path / "p.txt"
        src.write_text("say : cat dog\n\necho : red\n")
        out = tmp_path / "gen.jsonl"
        res = run_generation(backend, src, out, n=2, temperatures=[0.2, 0.9], seed=5, progress=False)
    finally:
        server.close()
    assert (res.generated, res.blank, backend.retries) == (2, 1, 1)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        for r in row["responses"]:
            assert r["text"] == f"T={r['temperature']} S={r['seed']} {row['prompt']}"
            assert r["generator"] == "openai:echo-model" and r["num_tokens"] == 3
    bodies = [b for b, _ in server.requests]
    assert all(b["max_tokens"] == 8 and b["model"] == "echo-model" for b in bodies)
    assert all(h.get("authorization") == f"Bearer {secret}" for _, h in server.requests)
    assert secret not in out.read_text() and secret not in repr(backend) and secret not in caplog.text


# ---- pairs --------------------------------------------------------------------------------------------------


def gen_row(prompt, answers, temps=(0.3, 0.7, 1.0)):
    return {"prompt": prompt, "prompt_id": prompt_id(prompt), "source_line": 1,
            "responses": [{"text": a, "temperature": temps[i % len(temps)], "seed": 100 + i, "index": i,
                           "generator": "hf:toy"} for i, a in enumerate(answers)]}


ROWS = [
    # distinct non-empty: 0 "cat dog fox" (right), 1 "cat dog" (wrong), 4 "fox dog cat owl" (wrong)
    gen_row("say : cat dog fox", ["cat dog fox", "cat dog", "cat dog fox", "", "fox dog cat owl"]),
    gen_row("echo : red blue", ["red blue", "red  blue "]),  # both right: a tie
    gen_row("copy : plum", ["plum", "plum"]),  # one distinct response
]
TOY = VerifierJudge(verifier_score, name="toy-verifier")


def test_all_pairs_lineage_and_drops():
    res = build_pairs(ROWS, TOY, mode="all", judge_spec="toy-verifier")
    assert len(res.pairs) == 2 and res.reasons == {"tie": 2, "too_few_responses": 1}
    assert res.responses == {"duplicate_responses": 2, "empty_responses": 1}
    assert res.candidates == 5  # 3 + 1 candidate pairs, and one prompt with too few responses
    first = res.pairs[0]
    assert (first["chosen"], first["rejected"]) == ("cat dog fox", "cat dog")
    lin = first["lineage"]
    assert lin["judge"] == {"name": "toy-verifier", "type": "VerifierJudge", "spec": "toy-verifier"}
    assert (lin["chosen_index"], lin["rejected_index"], lin["chosen_temperature"], lin["rejected_temperature"]) \
        == (0, 1, 0.3, 0.7)
    assert (lin["score_chosen"], lin["score_rejected"], lin["generator"]) == (1.0, 0.0, "hf:toy")
    assert lin["verdicts"] == [{"shown": ["chosen", "rejected"], "winner": "chosen", "confidence": 1.0,
                                "rationale": "score 1 vs 0", "order_invariant": True}]
    assert res.pairs[1]["rejected"] == "fox dog cat owl"
    assert {d["reason"] for d in res.dropped} == {"tie", "too_few_responses"}


def test_score_fast_path_agrees_with_judge_many():
    judge = VerifierJudge(lambda p, r: len(r) / 10, tie_margin=0.15)
    items = [("p", "aaaa", "aa"), ("p", "aa", "aaa"), ("p", "a", "aaaaaa"), ("p", "aaa", "aaa")]
    naive = judge.judge_many(items)
    fast = [judge.compare_scores(len(a) / 10, len(b) / 10) for _, a, b in items]
    assert [(v.winner, round(v.confidence, 9)) for v in fast] == [(v.winner, round(v.confidence, 9)) for v in naive]


def test_a_response_the_judge_cannot_score_is_counted_and_the_run_goes_on(tmp_path):
    # The verifier gives NaN for "fox dog cat owl" (a judge fault: no score, not a low one).
    judge = VerifierJudge(lambda p, r: float("nan") if r == "fox dog cat owl" else float(verifier_score(p, r)),
                          name="flaky")
    res = build_pairs(ROWS, judge, mode="all")
    # ROWS[0] has 3 distinct responses: (0, 1) is decided, (0, 4) and (1, 4) involve the unscored one.
    assert [(p["chosen"], p["rejected"]) for p in res.pairs] == [("cat dog fox", "cat dog")]
    assert res.reasons == {"judge_error": 2, "tie": 1, "too_few_responses": 1} and res.candidates == 5
    assert [(u["index"], u["error"]) for u in res.unscored] == [(4, "non-finite score nan")]
    gen, out = tmp_path / "gen.jsonl", tmp_path / "pairs.jsonl"
    gen.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    res, _ = judge_generations(gen, judge, out, mode="best-vs-worst")
    assert len(res.pairs) == 1 and "judge failed to score 1 responses" in res.summary()
    assert json.loads(out.read_text())["lineage"]["scores"] == {"0": 1.0, "1": 0.0, "4": None}
    with pytest.raises(PreftuneError, match="is the input"):
        judge_generations(gen, judge, gen)


def test_best_vs_worst_and_min_margin():
    res = build_pairs(ROWS, TOY, mode="best-vs-worst")
    assert [(p["chosen"], p["rejected"]) for p in res.pairs] == [("cat dog fox", "cat dog")]
    assert res.pairs[0]["lineage"]["scores"] == {"0": 1.0, "1": 0.0, "4": 0.0}
    assert res.reasons == {"tie": 1, "too_few_responses": 1}

    def overlap(prompt, response):  # share of the prompt's words present: 1, 2/3, 1/3 ...
        want = prompt.split(":", 1)[1].split()
        return sum(w in response.split() for w in want) / len(want)

    rows = [gen_row("say : cat dog fox", ["cat dog fox", "cat dog owl"]),  # margin 1/3
            gen_row("say : red blue pig", ["red blue pig", "hen"])]  # margin 1
    res = build_pairs(rows, VerifierJudge(overlap), mode="best-vs-worst", min_margin=0.5)
    assert [p["rejected"] for p in res.pairs] == ["hen"] and res.reasons == {"low_margin": 1}
    res = build_pairs(rows, VerifierJudge(overlap), mode="all", min_margin=0.5)
    assert len(res.pairs) == 1 and res.reasons == {"low_margin": 1}


class FirstShown(Judge):
    """Always prefers the response shown first: pure position bias."""

    def _judge_ordered(self, prompt, first, second):
        return Verdict("A", 0.9, "first looks better")


class Shorter(Judge):
    """Prefers the shorter response; ties on equal length."""

    def _judge_ordered(self, prompt, first, second):
        if len(first) == len(second):
            return Verdict("tie", 0.5, "same length")
        return Verdict("A" if len(first) < len(second) else "B", 0.8, "shorter is better")


def test_pairwise_judges_orders_flips_and_wins():
    res = build_pairs(ROWS[:1], FirstShown(), mode="all")
    assert not res.pairs and res.reasons == {"order_flip": 3}
    assert [v["winner"] for v in res.dropped[0]["verdicts"]] == ["response_0", "response_1"]

    res = build_pairs(ROWS[:1], Shorter(), mode="best-vs-worst")  # scoring falls back to pairwise wins
    (pair,) = res.pairs
    assert (pair["chosen"], pair["rejected"]) == ("cat dog", "fox dog cat owl")
    lin = pair["lineage"]
    assert lin["scoring"] == "wins" and (lin["score_chosen"], lin["score_rejected"]) == (2.0, 0.0)
    assert [(v["shown"], v["winner"]) for v in lin["verdicts"]] == [
        (["chosen", "rejected"], "chosen"), (["rejected", "chosen"], "chosen")]
    assert lin["rationale"] == "shorter is better"
    with pytest.raises(PreftuneError, match="score-based"):
        build_pairs(ROWS, Shorter(), mode="all", min_margin=0.5)


def test_length_bias_numbers():
    pairs = [{"chosen": "a b c", "rejected": "a"}, {"chosen": "a b", "rejected": "a"},
             {"chosen": "a b c d", "rejected": "a b"}, {"chosen": "a", "rejected": "a b"}]
    lb = length_bias(pairs)
    # chosen longer in 3 of 4 pairs; differences +2, +1, +2, -1 -> mean 4/4 = +1.00 words
    assert (lb.chosen_longer, lb.rejected_longer, lb.share_chosen_longer, lb.mean_difference) == (3, 1, 0.75, 1.0)
    assert lb.biased and "75.0% of 4 pairs" in lb.summary() and "warning" in lb.summary()
    assert not length_bias(pairs[:2] + pairs[3:], threshold=0.7).biased  # 2 of 3 = 66.7%


def test_written_pairs_validate_including_conversational(tmp_path):
    gen = tmp_path / "gen.jsonl"
    msgs = [{"role": "user", "content": "say : cat dog fox"}]
    rows = ROWS + [gen_row(msgs, ["cat dog fox", "cat"])]
    gen.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pairs.jsonl"
    res, bias = judge_generations(gen, TOY, out, mode="all", judge_spec="toy-verifier")
    assert len(res.pairs) == 3 and bias.pairs == 3
    conv = json.loads(out.read_text().splitlines()[-1])
    assert conv["prompt"] == msgs and conv["chosen"] == [{"role": "assistant", "content": "cat dog fox"}]
    assert len((tmp_path / "pairs.dropped.jsonl").read_text().splitlines()) == len(res.dropped) == 3
    report = validate(str(out))
    assert report.usable and report.rows_usable == 3


def test_make_judge_specs(tmp_path):
    assert make_judge("verifier:toy").name == "toy-verifier"
    assert make_judge("{type: verifier, kind: regex, pattern: cat}").score("p", "a cat") == 1.0
    cfg = tmp_path / "j.yaml"
    cfg.write_text("type: verifier\nkind: exact_match\nreference: '42'\n")
    assert make_judge(str(cfg)).score("p", "42") == 1.0
    with pytest.raises(PreftuneError, match="not a file"):
        make_judge("nonsense")
    with pytest.raises(PreftuneError, match="unknown key"):
        make_judge("{type: verifier, kind: regex, patern: x}")


# ---- CLI ----------------------------------------------------------------------------------------------------


def test_cli_generate_and_judge_end_to_end(toy_lm, tmp_path):
    model, tok = toy_lm
    model.save_pretrained(tmp_path / "toy")
    tok.save_pretrained(tmp_path / "toy")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    gen = tmp_path / "gen.jsonl"
    cmd = [sys.executable, "-m", "preftune.cli", "generate", "--model", str(tmp_path / "toy"), "--prompts",
           str(tmp_path / "prompts.txt"), "--n", "4", "--temperatures", "0.3,0.7,1.0", "--max-new-tokens", "4",
           "--out", str(gen), "--device", "cpu"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in gen.read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["responses"]) == 4 for r in rows)
    assert [r["temperature"] for r in rows[0]["responses"]] == [0.3, 0.7, 1.0, 0.3]
    assert "2 prompts; 0 already" in p.stdout

    synthetic = tmp_path / "synthetic.jsonl"
    synthetic.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "pairs.jsonl"
    cmd = [sys.executable, "-m", "preftune.cli", "judge", str(synthetic), "--judge", "toy-verifier", "--pairs",
           "all", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "kept 2 pairs, dropped 3 (tie: 2, too_few_responses: 1)" in p.stdout
    assert "length bias: chosen longer in 50.0% of 2 pairs" in p.stdout
    assert validate(str(out)).usable
    assert json.loads((tmp_path / "pairs.summary.json").read_text())["pairs"] == 2

    from preftune.cli import main

    assert main(["judge", str(gen), "--judge", "toy-verifier", "--out", str(tmp_path / "p2.jsonl")]) == 0
    assert main(["judge", str(gen), "--judge", "toy-verifier", "--pairs", "all", "--min-margin", "0.5",
                 "--out", str(tmp_path / "p3.jsonl")]) == 0
    assert main(["judge", str(tmp_path / "missing.jsonl"), "--judge", "toy-verifier", "--out", str(out)]) == 2
