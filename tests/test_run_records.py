"""What a run records and where it goes: config.yaml, experiment trackers (TensorBoard with hparams and a
clean resume, MLflow read back through its own client, W&B offline files), the model card, `preftune push`
without a network, callbacks, and the console (log lines beside the bar, one redraw per step)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import preftune
from preftune.config import to_config
from preftune.configfile import read_config
from preftune.errors import ConfigError, PreftuneError
from preftune.runlog import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"}


# ---- config.yaml ---------------------------------------------------------------------------------------------


def test_config_yaml_reloads_to_the_same_config(tmp_path, saved_model_dir, pairs_jsonl):
    """A run from a YAML file writes every field, defaults filled in, in the layout `train` reads back."""
    source = tmp_path / "run.yaml"
    source.write_text(yaml.safe_dump({
        "model": str(saved_model_dir), "data": {"train": str(pairs_jsonl)}, "loss": {"name": "dpo", "beta": 0.2},
        "training": {"output_dir": str(tmp_path / "run"), "learning_rate": 1e-3, "max_steps": 1,
                     "per_device_batch_size": 4, "max_length": 64, "progress_bar": False, "save_model": False}}))
    preftune.train(str(source), log=lambda *_: None)
    written = read_config(tmp_path / "run")
    assert written["training"]["warmup_ratio"] == 0.0 and written["training"]["report_to"] == ["tensorboard"]
    assert written["loss"] == {"name": "dpo", "weights": None, "beta": 0.2}  # hyperparameters beside the name
    assert to_config(tmp_path / "run" / "config.yaml") == to_config(source)


def test_config_yaml_describes_objects_never_pickles(dpo_config, make_model, train_pairs, tmp_path):
    cfg = dpo_config(make_model(0), train_pairs[:8], training={"max_steps": 1})
    preftune.train(cfg, log=lambda *_: None)
    text = (tmp_path / "run" / "config.yaml").read_text()
    written = yaml.safe_load(text)  # plain YAML: safe_load would refuse a python object tag
    assert "!!python" not in text
    assert written["model"].startswith("<in memory: LlamaForCausalLM, ") and "parameters" in written["model"]
    assert written["tokenizer"].startswith("<in memory: ") and "vocabulary" in written["tokenizer"]
    assert written["data"]["train"].startswith("<in memory: list of 8 rows, blake2b ")
    with pytest.raises(PreftuneError, match="could not load tokenizer '<in memory: "):  # names it, trains nothing
        preftune.train(str(tmp_path / "run" / "config.yaml"), overwrite=True, log=lambda *_: None)


# ---- TensorBoard: hparams, each step once after a resume -------------------------------------------------------


def tb_scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_dir))
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def test_tensorboard_hparams_and_each_step_once_after_resume(dpo_config, make_model, train_pairs, tmp_path):
    """6 steps with checkpoints at 2 and 4, then a resume from step 4 into the same run directory: steps 5-6
    are redone. TensorBoard's reader shows steps 1..6 once each (purge_step), with the resumed values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = {"max_steps": 6, "save_every": 2}
    preftune.train(dpo_config(make_model(0), train_pairs[:24], training=common), log=lambda *_: None)
    run_dir = tmp_path / "run"
    time.sleep(1.1)  # event files are named by the second: the resumed run's file must sort after the first's
    preftune.train(dpo_config(make_model(0), train_pairs[:24], training=common),
                   resume=str(run_dir / "checkpoints" / "step-00000004"), log=lambda *_: None)
    steps = [s for s, _ in tb_scalars(run_dir / "tensorboard", "train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    losses = train_losses(run_dir)
    assert [v for _, v in tb_scalars(run_dir / "tensorboard", "train/loss")] == pytest.approx(
        [losses[s] for s in steps], rel=1e-6)
    # hparams: a sub-run with the HParams plugin's data, holding the config's dotted keys
    hparam_runs = [d for d in (run_dir / "tensorboard").iterdir() if d.is_dir()
                   and any(f.name.startswith("events") for f in d.iterdir())]
    assert len(hparam_runs) == 1  # written once: the resumed run does not add another
    ea = EventAccumulator(str(hparam_runs[0]))
    ea.Reload()
    content = ea.PluginTagToContent("hparams")
    blob = b"".join(content.values())
    assert b"training.learning_rate" in blob and b"loss.beta" in blob


# ---- MLflow, read back through MLflow's own client -------------------------------------------------------------


def test_mlflow_file_store_read_back_through_mlflow_client(dpo_config, make_model, train_pairs, eval_pairs,
                                                           tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores behind this switch
    cfg = dpo_config(make_model(0), train_pairs[:16], eval=eval_pairs[:8],
                     training={"max_steps": 4, "eval_every": 2, "report_to": ["mlflow"]})
    preftune.train(cfg, log=lambda *_: None)
    client = MlflowClient(tracking_uri=uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "preftune"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert {m.step: m.value for m in history} == pytest.approx(train_losses(tmp_path / "run"))
    assert len(history) == 4
    evals = [r for r in read_metrics(tmp_path / "run") if r["split"] == "eval"]
    got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/rewards/accuracies")}
    assert got == pytest.approx({r["step"]: r["rewards/accuracies"] for r in evals}) and sorted(got) == [2, 4]
    assert run.data.params["training.learning_rate"] == "0.001" and run.data.params["loss.beta"] == "0.1"
    assert run.data.params["model"].startswith("<in memory: LlamaForCausalLM")
    assert json.loads((tmp_path / "run" / "trackers.json").read_text()) == {"mlflow": run.info.run_id}


def test_a_resumed_run_continues_its_mlflow_run_with_each_step_once(dpo_config, make_model, train_pairs,
                                                                     tmp_path, monkeypatch):
    """Resume from step 4 of a 6-step run in the same directory: one MLflow run, steps 1..6 once each (steps 5
    and 6, redone, are not logged a second time)."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    common = {"max_steps": 6, "save_every": 2, "report_to": ["mlflow"]}
    preftune.train(dpo_config(make_model(0), train_pairs[:24], training=common), log=lambda *_: None)
    first = json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]
    preftune.train(dpo_config(make_model(0), train_pairs[:24], training=common),
                   resume=str(tmp_path / "run" / "checkpoints" / "step-00000004"), log=lambda *_: None)
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments() if e.name == "preftune"])
    assert [r.info.run_id for r in runs] == [first] and runs[0].info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(first, "train/loss"))
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_failed_run_ends_its_mlflow_run_as_failed(dpo_config, make_model, train_pairs, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    class Boom:
        def on_step(self, step, metrics, state):
            if step == 2:
                raise RuntimeError("stop here")

    cfg = dpo_config(make_model(0), train_pairs[:16], training={"max_steps": 4, "report_to": ["mlflow"]})
    with pytest.raises(RuntimeError, match="stop here"):
        preftune.train(cfg, log=lambda *_: None, callbacks=[Boom()])
    assert mlflow.active_run() is None  # not left open for the next run in this process
    (run,) = MlflowClient(tracking_uri=uri).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri=uri).search_experiments() if e.name == "preftune"])
    assert run.info.status == "FAILED"


# ---- W&B offline ---------------------------------------------------------------------------------------------


def wandb_records(run_file: Path) -> list:
    """The protobuf records of a W&B ``.wandb`` file: a 7-byte header, then LevelDB-log blocks of 32 KiB, each
    record chunk prefixed by (crc32c u32, length u16, type u8); types 1 full, 2 first, 3 middle, 4 last."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, block, pos, buf, out = run_file.read_bytes(), 32768, 7, b"", []
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pos += 7
        if kind == 0:
            pos += left - 7
            continue
        buf += raw[pos : pos + length]
        pos += length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)  # the SDK writes either form


def test_wandb_offline_run_files_hold_the_metrics(dpo_config, make_model, train_pairs, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    cfg = dpo_config(make_model(0), train_pairs[:16], training={"max_steps": 3, "report_to": ["wandb"]})
    preftune.train(cfg, log=lambda *_: None)
    (run_dir,) = (tmp_path / "wandb-dir" / "wandb").glob("offline-run-*")
    (run_file,) = run_dir.glob("run-*.wandb")
    records = wandb_records(run_file)
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {item_key(i): json.loads(i.value_json) for i in r.history.item}
            if "train/loss" in row:
                history[row["_step"]] = row["train/loss"]
    assert history == pytest.approx(train_losses(tmp_path / "run"))
    config = {item_key(i): json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for i in r.config.update}
    assert config["training.learning_rate"] == 0.001 and config["loss.name"] == "dpo"
    run_id = run_file.stem.removeprefix("run-")
    assert json.loads((tmp_path / "run" / "trackers.json").read_text())["wandb"] == run_id


def test_unknown_or_missing_tracker_fails_before_any_model_loads(dpo_config, train_pairs, monkeypatch):
    cfg = dpo_config("no/such-model", train_pairs[:8], training={"report_to": ["tensorbaord"]})
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbaord'; did you mean 'tensorboard'"):
        preftune.train(cfg, log=lambda *_: None)
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    cfg = dpo_config("no/such-model", train_pairs[:8], training={"report_to": ["wandb"]})
    with pytest.raises(PreftuneError, match=r"wandb is not installed: pip install wandb \(or pip install 'preftune\[tracking\]'\)"):
        preftune.train(cfg, log=lambda *_: None)


# ---- model card and push -------------------------------------------------------------------------------------


@pytest.fixture
def finished_run(tmp_path, saved_model_dir, pairs_jsonl, eval_pairs, write_jsonl):
    """A 4-step DPO run from a model directory and JSONL files, saving its model."""
    eval_path = write_jsonl(tmp_path / "eval.jsonl", eval_pairs[:8])
    out = tmp_path / "run"
    summary = preftune.train({
        "model": str(saved_model_dir), "data": {"train": str(pairs_jsonl), "eval": str(eval_path)},
        "loss": {"name": "dpo", "beta": 0.1},
        "training": {"output_dir": str(out), "learning_rate": 1e-3, "max_steps": 4, "per_device_batch_size": 4,
                     "max_length": 64, "progress_bar": False}}, log=lambda *_: None)
    return out, summary, eval_path


def test_model_card_is_written_with_base_method_data_metrics_config(finished_run, saved_model_dir, pairs_jsonl):
    run_dir, summary, eval_path = finished_run
    card = (run_dir / "final" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and front["tags"] == ["preftune", "dpo"]
    assert "base_model" not in front  # a local directory is no hub id: named in the text only
    assert f"from **{saved_model_dir}**" in card and "- method: `dpo` (beta=0.1)" in card
    train = summary["data"]["train"]
    assert train["sha256"] == hashlib.sha256(pairs_jsonl.read_bytes()).hexdigest() and train["examples"] == 32
    assert f"| train | `{pairs_jsonl}` | 32 | `{train['fingerprint']}` | `{train['sha256']}` |" in card
    assert summary["data"]["eval"]["sha256"] == hashlib.sha256(eval_path.read_bytes()).hexdigest()
    acc = summary["final_eval_metrics"]["rewards/accuracies"]
    assert "| rewards/accuracies | " in card and f"{acc:.4g} |" in card
    assert "KL to the reference (k3, nats per sequence)" in card  # measured by default (weights snapshot)
    config_block = card.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(config_block) == read_config(run_dir)
    assert 'AutoModelForCausalLM.from_pretrained("' in card


def test_push_without_network_fails_with_one_line(finished_run, capsys):
    from preftune.cli import main

    run_dir, _, _ = finished_run
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: the hub is switched off in tests
    assert main(["push", str(run_dir), "someone/tuned"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: push to someone/tuned failed: the hub is switched off here (HF_HUB_OFFLINE")
    assert f"the model and its card are in {run_dir / 'final'}" in err
    assert main(["push", str(run_dir), "not a repo"]) == 2
    assert "expected `user/name`" in capsys.readouterr().err


def test_push_to_an_unreachable_hub_fails_with_one_line(finished_run, python):
    run_dir, _, _ = finished_run
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": "hf_test"}
    proc = subprocess.run([python, "-m", "preftune.cli", "push", str(run_dir), "someone/tuned"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot reach the hub at http://127.0.0.1:{port}" in lines[0], proc.stderr


def test_push_uploads_final_with_the_card_for_the_repo(finished_run, monkeypatch):
    """With the hub API replaced by a recorder: the repo is created private and final/ uploaded, card included."""
    import huggingface_hub

    run_dir, _, _ = finished_run
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw["private"]))

        def upload_folder(self, folder_path, repo_id, **kw):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            calls.append(("card", (Path(folder_path) / "README.md").read_text().splitlines()))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    from preftune.hub import push

    assert push(run_dir, "someone/tuned").endswith("/someone/tuned")
    assert calls[0] == ("create", "someone/tuned", True)
    assert calls[1][0] == "upload" and {"README.md", "model.safetensors", "config.json", "tokenizer.json"} <= set(
        calls[1][2])
    assert "# someone/tuned" in calls[2][1]


def test_push_to_hub_in_training_needs_a_repo_and_fails_cleanly_offline(dpo_config, make_model, train_pairs,
                                                                        tmp_path):
    cfg = dpo_config(make_model(0), train_pairs[:8], training={"push_to_hub": True, "save_model": True})
    with pytest.raises(ConfigError, match="push_to_hub needs training.hub_model_id"):
        preftune.train(cfg, log=lambda *_: None)
    cfg = dpo_config(make_model(0), train_pairs[:8], training={"push_to_hub": True, "hub_model_id": "me/x",
                                                              "save_model": True, "max_steps": 1})
    with pytest.raises(PreftuneError, match="push to me/x failed: the hub is switched off here"):
        preftune.train(cfg, log=lambda *_: None)
    assert (tmp_path / "run" / "final" / "README.md").exists()  # everything else was written first
    assert (tmp_path / "run" / "train_summary.json").exists()


# ---- callbacks -----------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self):
        self.calls = []

    def on_step(self, step, metrics, state):
        self.calls.append(("step", step, round(metrics["loss"], 6)))

    def on_eval(self, step, metrics, state):
        self.calls.append(("eval", step, round(metrics["loss"], 6)))

    def on_save(self, step, path, state):
        self.calls.append(("save", step, path.relative_to(state.run_dir).as_posix()))

    def on_end(self, summary, state):
        self.calls.append(("end", summary["steps"], state.total_steps))


def test_callbacks_are_called_in_order_with_the_right_steps(dpo_config, make_model, train_pairs, eval_pairs,
                                                            tmp_path):
    model = make_model(0)
    rec, only_end = Recorder(), type("OnlyEnd", (), {"on_end": lambda self, s, st: self.__dict__.update(s=s)})()
    cfg = dpo_config(model, train_pairs[:16], eval=eval_pairs[:8],
                     training={"max_steps": 4, "eval_every": 2, "save_every": 2, "save_model": True})
    summary = preftune.train(cfg, log=lambda *_: None, callbacks=[rec, only_end])
    records = read_metrics(tmp_path / "run")
    loss = {(r["split"], r["step"]): round(r["loss"], 6) for r in records if r["split"] in ("train", "eval")}
    assert rec.calls == [
        ("step", 1, loss["train", 1]), ("step", 2, loss["train", 2]), ("eval", 2, loss["eval", 2]),
        ("save", 2, "checkpoints/step-00000002"), ("step", 3, loss["train", 3]), ("step", 4, loss["train", 4]),
        ("eval", 4, loss["eval", 4]), ("save", 4, "final"), ("end", 4, 4),
    ]
    assert only_end.s == summary  # hooks a callback lacks are skipped


def test_a_callback_with_hugging_face_names_is_refused(dpo_config, make_model, train_pairs):
    class HF:
        def on_step_end(self, args, state, control):
            pass

        def on_evaluate(self, args, state, control):
            pass

    with pytest.raises(PreftuneError, match=r"callbacks\[0\]: HF has none of on_step, on_eval, on_save, on_end "
                                             r"\(Hugging Face names .*on_step_end -> on_step, on_evaluate -> on_eval"):
        preftune.train(dpo_config(make_model(0), train_pairs[:8]), log=lambda *_: None, callbacks=[HF()])


# ---- console ---------------------------------------------------------------------------------------------------


def terminal(monkeypatch) -> io.StringIO:
    """stdout and stderr into one buffer, as on a terminal."""
    screen = io.StringIO()
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    return screen


def test_monitor_lines_never_stick_to_the_bar(dpo_config, make_model, train_pairs, eval_pairs, monkeypatch):
    """Each log line printed while the bar is up starts on a cleared line, never after the bar's text; and
    transformers' "Writing model shards" bar (the best and final model saves) is silenced."""
    screen = terminal(monkeypatch)
    cfg = dpo_config(make_model(0), train_pairs[:32], eval=eval_pairs[:8], monitor={"print_samples": 1},
                     training={"max_steps": 8, "eval_every": 2, "progress_bar": True, "save_model": True})
    preftune.train(cfg)  # log=print: lines through tqdm.write
    out = screen.getvalue()
    said = [line for line in out.split("\n") if "monitor:" in line or "sample @" in line]
    assert len(said) >= 4 and all(line.split("\r")[-1].startswith(("monitor:", "sample @")) for line in said), said
    assert "Writing model shards" not in out


def test_one_bar_redraw_per_step(dpo_config, make_model, train_pairs, monkeypatch):
    """Nothing printed while the bar is up, each step made longer than tqdm's 0.1 s redraw throttle (a
    callback sleeps): the bar is drawn when it opens, once per step, and once when it closes. (Setting the
    postfix with a refresh, then updating, would draw twice per step.)"""
    screen = terminal(monkeypatch)

    class Slow:
        def on_step(self, step, metrics, state):
            time.sleep(0.12)

    cfg = dpo_config(make_model(0), train_pairs[:32], training={"max_steps": 8, "progress_bar": True})
    preftune.train(cfg, callbacks=[Slow()])
    assert screen.getvalue().count("\rtrain:") + screen.getvalue().count("\ntrain:") == 1 + 8 + 1


def test_tokens_per_second_leaves_evaluation_out(dpo_config, make_model, train_pairs, eval_pairs, monkeypatch):
    """Evaluations made slow (0.3 s each, 4 of them): the summary's rates are over the optimizer steps alone."""
    from preftune.trainer import loop

    real = loop.evaluate

    def slow(run, step):
        time.sleep(0.3)
        return real(run, step)

    monkeypatch.setattr(loop, "evaluate", slow)
    cfg = dpo_config(make_model(0), train_pairs[:16], eval=eval_pairs[:8], monitor={"enabled": False},
                     training={"max_steps": 4, "eval_every": 1})
    s = preftune.train(cfg, log=lambda *_: None)
    assert s["train_loop_s"] < s["train_runtime_s"] - 1.2  # the 1.2 s of sleeping is outside the loop time
    assert s["samples_per_second"] * s["train_loop_s"] == pytest.approx(4 * 4)  # 4 steps of 4 pairs
