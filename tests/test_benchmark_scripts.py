"""The benchmark drivers' argument handling, without running a benchmark: ``benchmarks/gpu.sh`` (help, the planned
commands of ``--dry-run`` with the wheels install, clear one-line errors) and ``benchmarks/vs_trl.py``'s row
selection, model list and steady-state arithmetic. No GPU, no pip, no training."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
GPU_SH = BENCH / "gpu.sh"
sys.path.insert(0, str(BENCH))

import bench_env  # noqa: E402
import vs_trl  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def gpu_sh(*args, env=None, cwd=None):
    return subprocess.run(["bash", str(GPU_SH), *args], capture_output=True, text=True, timeout=30, env=env,
                          cwd=cwd)


def test_gpu_sh_help_lists_every_option():
    r = gpu_sh("--help")
    assert r.returncode == 0, r.stderr
    for option in ("--wheels DIR", "--out DIR", "--quick", "--dry-run", "--help"):
        assert option in r.stdout


def test_gpu_sh_dry_run_plans_install_and_every_stage_and_runs_nothing(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "trl-1.16.0-py3-none-any.whl").write_bytes(b"")  # never opened: nothing is installed
    out = tmp_path / "out"
    r = gpu_sh("--dry-run", "--wheels", str(wheels), "--out", str(out))
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("+ ")]
    install = [line for line in lines if " -m pip install " in line]
    assert len(install) == 1
    for part in ("--no-index", f"--find-links {wheels}", "--target", str(wheels / "trl-1.16.0-py3-none-any.whl")):
        assert part in install[0]
    assert lines.index(install[0]) == 0  # installed before anything imports it
    dpo = [line for line in lines if "vs_trl.py" in line]
    assert [m for line in dpo for m in ("smol135m", "qwen05b") if f"--model {m}" in line][:2] == ["smol135m",
                                                                                                  "qwen05b"]
    assert all("--device cuda" in line and "--precision bf16" in line for line in dpo)
    assert "preftune-compile-warm" in dpo[0] and "--steps 20" in dpo[0] and f"--out {out}/dpo_smol135m.json" in dpo[0]
    assert any("--attn flash_attention_2 --preftune-engine layout=padded" in line for line in dpo)
    grpo = [line for line in lines if "grpo_vs_trl.py" in line]
    assert len(grpo) == 1 and "--device cuda" in grpo[0] and f"--md {out}/gpu_results.md" in grpo[0]
    assert not out.exists()  # a dry run writes nothing


def test_gpu_sh_out_defaults_to_env_out_and_quick_is_smaller(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "o")}
    r = gpu_sh("--dry-run", "--quick", env=env)
    assert r.returncode == 0, r.stderr
    dpo = [line for line in r.stdout.splitlines() if "vs_trl.py" in line and "sdpa" in line]
    assert len(dpo) == 2
    assert all("--rows trl-off,preftune" in line and "--steps 5" in line for line in dpo)
    assert f"--out {tmp_path}/o/dpo_qwen05b.json" in dpo[1]
    assert "pip install" not in r.stdout  # no --wheels: nothing to install


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "gpu.sh: unknown option '--bogus'"),
    (["--wheels"], "gpu.sh: --wheels needs a folder of .whl files"),
    (["--wheels", "/nonexistent/wheels"], "gpu.sh: --wheels /nonexistent/wheels: no such folder"),
    (["--out"], "gpu.sh: --out needs a folder"),
])
def test_gpu_sh_bad_arguments_fail_with_one_line(args, message):
    r = gpu_sh(*args, "--dry-run")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(message)
    assert r.stdout == ""  # nothing planned, nothing run


def test_gpu_sh_wheels_folder_without_wheels_fails(tmp_path):
    r = gpu_sh("--dry-run", "--wheels", str(tmp_path))
    assert r.returncode == 2 and f"--wheels {tmp_path}: no .whl files in it" in r.stderr


def rows(**flags):
    """vs_trl's row selection for these parsed flags (a bad selection raises SystemExit with the message)."""
    import argparse

    a = argparse.Namespace(**{"rows": None, "trl_precompute": None, "preftune_compile": None,
                              "preftune_checkpointing": False, **flags})

    def error(msg):
        raise SystemExit(msg)

    return vs_trl.select_rows(a, error)


def test_rows_default_is_every_row_and_legacy_flags_select_todays_rows():
    assert rows() == list(vs_trl.ROWS)
    assert rows(trl_precompute="off", preftune_compile="off") == ["trl-off", "preftune"]
    # the earlier default command plus its checkpointing flag: trl on/off, preftune without/with compile, grad ckpt
    assert rows(preftune_checkpointing=True) == ["trl-on", "trl-off", "preftune", "preftune-compile", "preftune-gc"]
    assert rows(rows="preftune-bf16w, trl-gc") == ["trl-gc", "preftune-bf16w"]  # run in ROWS order


def test_rows_errors_name_the_row():
    with pytest.raises(SystemExit, match="unknown row 'nope'; known: trl-on"):
        rows(rows="preftune,nope")
    with pytest.raises(SystemExit, match="preftune-compile-warm reuses preftune-compile's inductor cache"):
        rows(rows="preftune-compile-warm")


def test_unknown_row_on_the_command_line_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        vs_trl.main(["--rows", "trl-on,bogus", "--device", "cpu"])
    assert e.value.code == 2 and "--rows: unknown row 'bogus'" in capsys.readouterr().err


def test_models_list_and_qwen_shape():
    assert vs_trl.parse_models("both") == ["tiny", "smol135m"]
    assert vs_trl.parse_models("smol135m,qwen05b") == ["smol135m", "qwen05b"]
    q = vs_trl.MODELS["qwen05b"]
    assert (q["hidden_size"], q["num_hidden_layers"], q["num_attention_heads"], q["num_key_value_heads"],
            q["intermediate_size"], q["vocab_size"]) == (896, 24, 14, 2, 4864, 151936)
    with pytest.raises(Exception, match="unknown model 'big'"):
        vs_trl.parse_models("tiny,big")


def test_steady_rate_leaves_out_step_one():
    # step ends at 10 s (setup + reference + step 1), 12 s, 14 s: steps 2..3 = 2 steps x 8 pairs in 4 s = 4/s
    assert bench_env.steady_rate([10.0, 12.0, 14.0], 8) == pytest.approx(4.0)
    assert bench_env.steady_rate([10.0], 8) is None  # one step: no steady state


def test_machine_record_names_cpu_and_bf16_flags():
    m = bench_env.machine("cpu")
    assert set(m["cpu_bf16_flags"]) == {"amx_bf16", "avx512_bf16"}
    line = bench_env.machine_line(m)
    assert line.startswith(f"CPU: {m['cpu']}; bf16 flags: amx_bf16 ") and "device: cpu" in line


def test_cpu_worker_env_hides_gpus():
    assert bench_env.worker_env("cpu") == {"CUDA_VISIBLE_DEVICES": ""}
    assert bench_env.worker_env("cuda") == {}
