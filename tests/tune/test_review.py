"""`preftune review export|import`: blind sheets (identities only in the key, order shuffled per item), the round
trip through two raters with a hand-computed win rate and κ, agreement with a judge, bad answer files, and the
HTML form exporting its answers in headless Chromium."""

from __future__ import annotations

import csv
import json
import shutil
import urllib.parse
from pathlib import Path

import pytest

from preftune.cli import main
from preftune.errors import PreftuneError
from preftune.tune import adapter
from preftune.tune.review import export_sheet, import_answers, recorded_reference, resolve_model
from preftune.tune.scoring import bootstrap_ci

from .helpers import WORDS3, render

CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def sheet(tmp_path_factory, saved_model_dir, other_model_dir, toy_files):
    out = tmp_path_factory.mktemp("review") / "sheet"
    paths = export_sheet(saved_model_dir, toy_files["eval"], out, against=str(other_model_dir), seed=0,
                         max_new_tokens=8)
    return {**paths, "key_data": json.loads(Path(paths["key"]).read_text())}


def answers(path: Path, key: dict, rater: str, picks: list[str]) -> Path:
    """An answer CSV in which ``rater`` prefers ``picks[i]`` (policy / reference / tie) on item i + 1."""
    rows = []
    for i, who in enumerate(picks):
        item = key["items"][f"{i + 1:04d}"]
        rows.append({"item_id": f"{i + 1:04d}", "rater": rater,
                     "choice": "tie" if who == "tie" else ("a" if item["a"] == who else "b")})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["item_id", "rater", "choice"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_export_is_blind_and_shuffled(sheet, saved_model_dir, other_model_dir):
    rows = list(csv.DictReader(open(sheet["csv"])))
    assert [r["item_id"] for r in rows] == [f"{i:04d}" for i in range(1, 9)] and sheet["items"] == 8
    assert set(rows[0]) == {"item_id", "prompt", "response_a", "response_b", "choice", "rater", "comment"}
    key = sheet["key_data"]
    assert key["models"] == {"policy": str(saved_model_dir), "reference": str(other_model_dir)}
    sides = [key["items"][r["item_id"]]["a"] for r in rows]
    assert set(sides) == {"policy", "reference"}  # both orders occur (seed 0)
    for page in (Path(sheet["csv"]).read_text(), Path(sheet["html"]).read_text()):
        assert str(saved_model_dir) not in page and str(other_model_dir) not in page
        assert "policy" not in page and "reference" not in page
    html = Path(sheet["html"]).read_text()
    assert html.count('class="item"') == 8 and "<script src" not in html and "<link" not in html
    # the key's A is what the named side answered
    tok = adapter.load_tokenizer(None, str(saved_model_dir))
    ids = adapter.encode_prompts(tok, [r["prompt"] for r in rows])
    from preftune.tune.scoring import greedy_responses

    policy = greedy_responses(adapter.load_model(saved_model_dir), tok, ids, max_new_tokens=8)[1]
    for r, text in zip(rows, policy):
        assert r["response_a" if key["items"][r["item_id"]]["a"] == "policy" else "response_b"] == text


def test_round_trip_two_raters(sheet, tmp_path):
    key = sheet["key_data"]
    r1 = answers(tmp_path / "r1.csv", key, "r1", ["policy"] * 6 + ["reference"] * 2)
    r2 = answers(tmp_path / "r2.csv", key, "r2", ["policy"] * 5 + ["tie", "reference", "policy"])
    res = import_answers([r1, r2], sheet["key"])
    # per item, the mean over raters: items 1-5 -> 1, item 6 (1, 1/2) -> 0.75, item 7 -> 0, item 8 (0, 1) -> 0.5
    y = [1, 1, 1, 1, 1, 0.75, 0, 0.5]
    assert res["win_rate"] == pytest.approx(sum(y) / 8) == pytest.approx(0.78125)
    assert res["ci"] == list(bootstrap_ci(y)) and res["ci"][0] <= 0.78125 <= res["ci"][1]
    assert (res["policy_wins"], res["reference_wins"], res["ties"]) == (12, 3, 1)
    # Cohen's kappa on policy / reference / tie: p_o = 6/8; r1 marginals P 6/8, R 2/8; r2 P 6/8, T 1/8, R 1/8;
    # p_e = 0.75*0.75 + 0.25*0.125 = 0.59375; kappa = (0.75 - 0.59375) / (1 - 0.59375) = 5/13
    assert res["kappa"]["method"] == "cohen" and res["kappa"]["value"] == pytest.approx(5 / 13, abs=1e-6)
    assert res["raters"] == ["r1", "r2"] and res["answers"] == 16


def test_agreement_with_a_judge_and_the_cli(sheet, tmp_path, capsys):
    key = sheet["key_data"]
    r1 = answers(tmp_path / "r1.csv", key, "r1", ["policy"] * 6 + ["reference"] * 2)
    r2 = answers(tmp_path / "r2.csv", key, "r2", ["policy"] * 5 + ["tie", "reference", "policy"])
    res = import_answers([r1, r2], sheet["key"], judge=WORDS3)
    judge = adapter.make_judge(WORDS3)
    # the raters' majority exists on items 1-5 (policy) and 7 (reference); items 6 and 8 are split
    majority = {f"{i:04d}": "policy" for i in range(1, 6)} | {"0007": "reference"}
    agree = 0
    for item, label in majority.items():
        it = key["items"][item]
        v = judge.judge(it["prompt"], it["response_a"], it["response_b"]).winner
        agree += ("tie" if v == "tie" else it[v.lower()]) == label
    assert res["judge"]["compared"] == 6 and res["judge"]["agreement"] == pytest.approx(agree / 6)
    out = tmp_path / "result.json"
    assert main(["review", "import", str(r1), str(r2), "--key", str(sheet["key"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "win rate 0.781 (95% CI" in printed and "cohen kappa 0.385 over 8 items" in printed
    assert json.loads(out.read_text())["win_rate"] == pytest.approx(0.78125)


def test_bad_answer_files(sheet, tmp_path):
    def write(name, text):
        (tmp_path / name).write_text(text)
        return tmp_path / name

    cases = {
        "unknown.csv": ("item_id,rater,choice\n0001,x,a\n9999,x,a\n", "unknown.csv:3: item_id '9999' is not in the key"),
        "choice.csv": ("item_id,rater,choice\n0001,x,maybe\n", "choice.csv:2: choice 'maybe'; expected a, b or tie"),
        "twice.csv": ("item_id,rater,choice\n0001,x,a\n0001,x,b\n", "twice.csv:3: rater 'x' answered item 0001 twice"),
        "columns.csv": ("id,who\n1,a\n", "columns.csv: no column choice, item_id"),
        "blank.csv": ("item_id,rater,choice\n0001,x,\n", "no answered items"),
    }
    for name, (text, message) in cases.items():
        with pytest.raises(PreftuneError, match=message.replace("(", "\\(")):
            import_answers([write(name, text)], sheet["key"])


def test_run_directories_and_their_recorded_reference(tmp_path):
    rnd = tmp_path / "round-02"
    (rnd / "train" / "final").mkdir(parents=True)
    (rnd / "train" / "final" / "config.json").write_text("{}")
    (rnd / "lineage.json").write_text(json.dumps({"sft_model": "runs/sft/final"}))
    assert resolve_model(rnd) == str(rnd / "train" / "final") and recorded_reference(rnd) == "runs/sft/final"
    assert resolve_model("org/model") == "org/model" and recorded_reference(tmp_path) is None
    with pytest.raises(PreftuneError, match="records no reference model; name the other side with --against"):
        export_sheet(tmp_path, tmp_path / "p.jsonl", tmp_path / "s")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs the Debian package)")
def test_html_form_exports_answers_in_headless_chromium(sheet, tmp_path):
    attrs, console = render(Path(sheet["html"]), tmp_path / "profile", fragment="selftest")
    assert console == [] and attrs["data-items-rendered"] == "8"
    exported = tmp_path / "answers.csv"
    exported.write_text(urllib.parse.unquote(attrs["data-export"]))
    res = import_answers([exported], sheet["key"])
    # the self-test answered A on items 1, 3, 5, 7 and B on 2, 4, 6, 8
    key = sheet["key_data"]["items"]
    wins = [key[f"{i:04d}"]["a" if i % 2 else "b"] == "policy" for i in range(1, 9)]
    assert res["answers"] == 8 and res["raters"] == ["selftest"] and res["win_rate"] == pytest.approx(sum(wins) / 8)
    attrs, _ = render(Path(sheet["html"]), tmp_path / "profile2")  # without the hook: nothing answered
    assert "data-export" not in attrs and attrs["data-items-rendered"] == "8"
