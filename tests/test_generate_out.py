"""`preftune generate --out FILE` never modifies a file that is not a generation file of the same settings, and sets
a partial last line of its own file aside instead of destroying it."""

from __future__ import annotations

import json

import pytest

from preftune.cli import main
from preftune.errors import PreftuneError
from preftune.rollout.generate import Sample, run_generation


class Echo:
    """A backend without a model: the response to prompt p with seed s is "p s"."""

    name, jobs_per_call = "echo", 8

    def __init__(self):
        self.prompts: list = []

    def sample(self, jobs):
        self.prompts += [j.prompt for j in jobs]
        return [Sample(f"{j.prompt} {j.seed}", "stop", 2) for j in jobs]


KW = dict(n=1, temperatures=[1.0], seed=0, settings={"max_new_tokens": 4}, progress=False)


def cli(*args):
    return main(["generate", "--model", "/nonexistent/model", *args])


def test_out_equal_to_the_prompts_file_is_refused_untouched(tmp_path, capsys):
    """Before: the last prompt (no final newline) was deleted, then the file refused."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"first prompt\nsecond prompt")
    assert cli("--prompts", str(prompts), "--out", str(prompts)) == 2
    assert prompts.read_bytes() == b"first prompt\nsecond prompt"
    assert "is the prompts file" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"some notes\nlast line", b'{"prompt": "a"}\n{"prompt": "b"}',
                                     b"\xff\xfe binary"])
def test_a_file_that_is_not_a_generation_file_is_refused_untouched(tmp_path, capsys, content):
    prompts, out = tmp_path / "p.txt", tmp_path / "notes.txt"
    prompts.write_text("hello\n")
    out.write_bytes(content)
    assert cli("--prompts", str(prompts), "--out", str(out)) == 2
    assert out.read_bytes() == content
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a generation row" in err[0] and "left as it is" in err[0], err


def test_a_partial_last_line_of_our_own_file_is_set_aside(tmp_path):
    prompts, out = tmp_path / "p.txt", tmp_path / "gen.jsonl"
    prompts.write_text("a\nb\nc\n")
    run_generation(Echo(), prompts, out, **KW)
    full = out.read_text().splitlines()
    partial = full[1][:40]
    out.write_text(full[0] + "\n" + partial)  # killed while writing row 2
    backend = Echo()
    res = run_generation(backend, prompts, out, **KW)
    assert backend.prompts == ["b", "c"] and res.already_done == 1
    assert out.read_text().splitlines() == full
    side = tmp_path / "gen.jsonl.partial"
    assert res.set_aside == side and side.read_text() == partial + "\n"  # kept, not destroyed
    assert "moved a partial last line" in res.summary()


def test_a_complete_last_row_without_its_newline_is_kept(tmp_path):
    """Before: cut off as if it were partial, and generated again."""
    prompts, out = tmp_path / "p.txt", tmp_path / "gen.jsonl"
    prompts.write_text("a\nb\n")
    run_generation(Echo(), prompts, out, **KW)
    full = out.read_text()
    out.write_text(full.rstrip("\n"))
    backend = Echo()
    assert run_generation(backend, prompts, out, **KW).generated == 0 and backend.prompts == []
    assert out.read_text() == full


def test_other_settings_with_a_partial_line_are_refused_before_anything_is_cut(tmp_path):
    prompts, out = tmp_path / "p.txt", tmp_path / "gen.jsonl"
    prompts.write_text("a\nb\n")
    run_generation(Echo(), prompts, out, **KW)
    rows = out.read_text().splitlines()
    damaged = rows[0] + "\n" + rows[1][:30]
    out.write_text(damaged)
    with pytest.raises(PreftuneError, match="other settings"):
        run_generation(Echo(), prompts, out, **{**KW, "seed": 1})
    assert out.read_text() == damaged and not (tmp_path / "gen.jsonl.partial").exists()
    assert json.loads(rows[0])["generation"]["seed"] == 0
