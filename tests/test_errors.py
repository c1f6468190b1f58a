"""Messages that name something: a full disk, a model directory that is not one, an endpoint that answers 200
with something other than a chat completion, YAML errors in --set values and judge files, an API key pasted where
a variable name belongs, a failing judge in `eval`, a bad `lora.r`. Each is one line with exit code 2."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from preftune.cli import main
from preftune.errors import PreftuneError

KEY = "sk-proj-4fQx9TzL2mV8pR6wK1nB3yH7jD5sA0cE"


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]


@pytest.fixture
def train_yaml(tmp_path, saved_model_dir, pairs_jsonl):
    def make(model=None, **training):
        cfg = {"model": str(model or saved_model_dir), "data": {"train": str(pairs_jsonl)}, "loss": {"beta": 0.1},
               "training": {"output_dir": str(tmp_path / "out"), "learning_rate": 1e-3, "max_steps": 4,
                            "per_device_batch_size": 4, "max_length": 64, "progress_bar": False,
                            "save_model": False, **training}}
        path = tmp_path / "train.yaml"
        path.write_text(json.dumps(cfg))
        return path

    return make


# ---- disk and files ------------------------------------------------------------------------------------------


def test_a_full_disk_during_a_checkpoint_is_one_line(train_yaml, tmp_path, capsys, monkeypatch):
    """Before: `error (RuntimeError): [enforce fail at inline_container.cc:672] ...`, exit 1."""
    real = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "step-00000004" in str(path) or "reference" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4484480 vs 4484368")
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(["train", str(train_yaml(max_steps=6, save_every=2))]) == 2
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.startswith("error")]
    assert len(err) == 1, captured.err
    assert "could not write checkpoint" in err[0] and "step-00000004" in err[0], err
    assert "the previous checkpoint is intact" in err[0]
    assert "warning: could not write the reference cache" in captured.out  # the cache is optional: a warning
    root = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]


def test_a_model_directory_without_config_json(train_yaml, tmp_path, capsys, pairs_jsonl):
    """Before: `error (ValueError): Couldn't instantiate the backend tokenizer ...`, exit 1."""
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    assert main(["train", str(train_yaml(model=empty))]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and f"model directory {empty} has no config.json" in err[0], err
    assert main(["eval", str(empty), "--data", str(pairs_jsonl)]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "has no config.json" in err[0], err
    (empty / "adapter_config.json").write_text("{}")
    assert main(["train", str(train_yaml(model=empty))]) == 2
    assert "a LoRA adapter directory" in error_lines(capsys)[0]


# ---- endpoints -----------------------------------------------------------------------------------------------


class RawServer:
    """Answers every POST with HTTP 200 and the next of ``bodies`` (the last one repeats)."""

    def __init__(self, bodies: list[tuple[str, bytes]]):
        self.bodies, self.count = bodies, 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                ctype, body = owner.bodies[min(owner.count, len(owner.bodies) - 1)]
                owner.count += 1
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


COMPLETION = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": '{"score": 7}'}}]}).encode()
HTML, EMPTY = ("text/html", b"<html>proxy login</html>"), ("application/json", b"{}")


@pytest.mark.parametrize("bad", [HTML, EMPTY, ("application/json", b'{"choices": []}'), ("application/json", b"")],
                         ids=["html", "empty-object", "no-choices", "empty-body"])
def test_a_200_without_a_chat_completion_is_retried_then_named(bad):
    from preftune.judges import JudgeRequestError, LLMJudge

    server = RawServer([bad])
    try:
        judge = LLMJudge("m", base_url=server.url, api_key_env=None, max_attempts=3, backoff_base=0.0,
                         score_template="{prompt} {response}")
        with pytest.raises(JudgeRequestError, match=r"answered HTTP 200 without a chat completion 3 times"):
            judge.score("q", "r")
        assert server.count == 3
        # a bad reply followed by a good one: the retry recovers
        server.bodies, server.count = [bad, ("application/json", COMPLETION)], 0
        assert judge.score("q", "r") == 7.0 and server.count == 2
    finally:
        server.close()


def test_generate_against_a_non_json_endpoint_is_one_line(tmp_path, capsys):
    server = RawServer([HTML])
    try:
        prompts = tmp_path / "p.txt"
        prompts.write_text("hello\n")
        rc = main(["generate", "--backend", "openai", "--base-url", server.url, "--api-key-env", "none",
                   "--model", "m", "--prompts", str(prompts), "--out", str(tmp_path / "gen.jsonl"), "--n", "1"])
    finally:
        server.close()
    assert rc == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "without a chat completion" in err[0] and "the body is not JSON" in err[0], err


# ---- YAML and keys -------------------------------------------------------------------------------------------


def test_a_yaml_error_inside_a_set_value(train_yaml, capsys):
    """Before: `error (ParserError): while parsing a flow sequence`, exit 1."""
    assert main(["train", str(train_yaml()), "--set", "training.adam_betas=[0.9, 0.99"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "--set training.adam_betas: the value '[0.9, 0.99' is not valid YAML" in err[0], err


def test_a_yaml_error_in_a_judge_file(tmp_path, capsys):
    gen = tmp_path / "gen.jsonl"
    gen.write_text("")
    bad = tmp_path / "judge.yaml"
    bad.write_text("type: llm\nmodel: [m\nbase_url: x\n")
    assert main(["judge", str(gen), "--judge", str(bad), "--out", str(tmp_path / "pairs.jsonl")]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and f"{bad}:" in err[0] and "invalid YAML" in err[0], err
    assert main(["judge", str(gen), "--judge", "{type: llm, model: [m", "--out", str(tmp_path / "p.jsonl")]) == 2
    assert "--judge <inline>: invalid YAML" in error_lines(capsys)[0]


def test_a_key_pasted_as_api_key_env_is_never_printed(tmp_path, capsys):
    """Before: `environment variable sk-proj-... is not set`."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    rc = main(["generate", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--api-key-env", KEY,
               "--model", "m", "--prompts", str(prompts), "--out", str(tmp_path / "gen.jsonl")])
    captured = capsys.readouterr()
    assert rc == 2 and KEY not in captured.err + captured.out and KEY[:12] not in captured.err
    assert "must name the environment variable" in captured.err
    judge = tmp_path / "judge.yaml"
    judge.write_text(f"type: llm\nmodel: m\nbase_url: http://127.0.0.1:9/v1\napi_key_env: {KEY}\n")
    gen = tmp_path / "gen.jsonl"
    gen.write_text("")
    assert main(["judge", str(gen), "--judge", str(judge), "--out", str(tmp_path / "pairs.jsonl")]) == 2
    captured = capsys.readouterr()
    assert KEY not in captured.err + captured.out and "must name the environment variable" in captured.err


@pytest.mark.parametrize("value,key", [("OPENAI_API_KEY", False), ("MY_COMPANY_PROD_OPENAI_API_KEY_2024", False),
                                       ("openai_key", False), ("sk-abc", True), ("gsk_" + "aB3" * 12, True),
                                       ("abc.def", True), ("0123456789abcdef0123456789abcdef", True)])
def test_looks_like_key(value, key):
    from preftune.judges.llm import looks_like_key

    assert looks_like_key(value) is key


# ---- eval with a failing judge; lora.r -----------------------------------------------------------------------


def test_eval_keeps_every_metric_when_the_judge_fails(tmp_path, saved_model_dir, pairs_jsonl, capsys,
                                                      monkeypatch):
    """Before: the judge's exception threw away the accuracy, KL and length metrics computed before it."""
    (tmp_path / "failing_judge.py").write_text("def score(prompt, response):\n    raise OSError('judge down')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "eval.json"
    rc = main(["eval", str(saved_model_dir), "--data", str(pairs_jsonl), "--reference", str(saved_model_dir),
               "--judge", "callable:failing_judge:score", "--out", str(out), "--num-prompts", "2",
               "--max-new-tokens", "2"])
    assert rc == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "failed" in err[0] and "judge down" in err[0] and str(out) in err[0], err
    result = json.loads(out.read_text())
    assert 0 <= result["preference"]["accuracy_logp"] <= 1 and result["preference"]["pairs"] == 32
    assert "kl" in result["generation"] and result["judge"]["error"].endswith("judge down")


def test_a_bad_lora_rank_names_lora_r(make_model):
    from preftune.config import LoraConfig
    from preftune.models import apply_lora

    with pytest.raises(PreftuneError, match=r"^lora\.r: "):
        apply_lora(make_model(seed=0), LoraConfig(r=0, alpha=8), 0)
    with pytest.raises(PreftuneError, match=r"^lora\.target_modules: "):
        apply_lora(make_model(seed=0), LoraConfig(r=4, alpha=8, target_modules=["nope_proj"]), 0)
