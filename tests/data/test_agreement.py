"""Agreement: textbook kappas worked by hand, position bias, gold accuracy and drift, filtering by agreement."""

from __future__ import annotations

import json
import math

import pytest

from preftune.data.agreement import (
    Annotation,
    analyze,
    binomial_two_sided,
    cohen_kappa,
    fleiss_kappa,
    read_annotations,
)

# Fleiss (1971) / Wikipedia "Fleiss' kappa" worked example: 10 subjects, 14 raters, 5 categories.
FLEISS_TABLE = [
    [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
]


def test_fleiss_wikipedia_example():
    # p_j = column sums / 140 = (20, 28, 39, 21, 32) / 140 -> P_e = Σ p_j² = 0.2128
    # P_i: row 1 = (14² - 14) / (14·13) = 1.0, row 2 = (4 + 36 + 16 + 4 - 14) / 182 = 0.2527, ...; P̄ = 0.3780
    # κ = (0.3780 - 0.2128) / (1 - 0.2128) = 0.2099
    assert fleiss_kappa(FLEISS_TABLE) == pytest.approx(0.20993, abs=1e-5)
    assert round(fleiss_kappa(FLEISS_TABLE), 3) == 0.210


def test_cohen_wikipedia_example():
    # 50 proposals: both yes 20, A yes B no 5, A no B yes 10, both no 15.
    # p_o = 35/50 = 0.7; A yes 25/50, B yes 30/50 -> p_e = 0.5·0.6 + 0.5·0.4 = 0.5; κ = (0.7 - 0.5)/0.5 = 0.4
    a = ["y"] * 20 + ["y"] * 5 + ["n"] * 10 + ["n"] * 15
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)


def test_kappa_edges():
    assert cohen_kappa(list("abab"), list("abab")) == 1.0
    assert math.isnan(cohen_kappa(list("aaaa"), list("aaaa")))  # p_e = 1: undefined
    # two raters, Fleiss on the same data: items (a,a), (a,b), (b,b), (b,b) ->
    # P_i = 1, 0, 1, 1 -> P̄ = 0.75; p_a = 3/8, p_b = 5/8 -> P_e = 34/64; κ = (0.75 - 0.53125) / 0.46875 = 0.4667
    assert fleiss_kappa([[2, 0], [1, 1], [0, 2], [0, 2]]) == pytest.approx(0.46667, abs=1e-5)
    with pytest.raises(ValueError):
        cohen_kappa([1], [1, 2])


def test_binomial_two_sided():
    assert binomial_two_sided(0, 3) == pytest.approx(0.25)  # 2 · (1/8)
    assert binomial_two_sided(5, 10) == 1.0
    assert binomial_two_sided(20, 20) == pytest.approx(2 / 2**20)


def _ann(item, who, choice, order, shown_first=None, gold=None, time=None):
    return Annotation(str(item), who, choice, shown_first, gold, time, order)


def test_position_bias_gold_accuracy_and_drift():
    anns, k = [], 0
    for i in range(20):  # "lazy" always picks what was shown first; order alternates a/b
        first = "a" if i % 2 == 0 else "b"
        anns.append(_ann(i, "lazy", first, k, shown_first=first, time=i))
        k += 1
        anns.append(_ann(i, "good", "a", k, shown_first=first, gold="a" if i < 8 else None, time=i))
        k += 1
    # "lazy" on gold items 0..7 (all gold "a"): picks a on even i -> right on 0, 2, 4, 6 -> 4/8;
    # windows of 2: items (0,1) (2,3) (4,5) (6,7) -> 0.5 each, drift 0
    r = analyze(anns, windows=4)
    lazy, good = r.per_annotator["lazy"], r.per_annotator["good"]
    assert lazy["position_bias"]["first_share"] == 1.0 and "position_biased" in lazy["flags"]
    assert lazy["position_bias"]["p_value"] == pytest.approx(2 / 2**20, rel=1e-6)
    assert lazy["gold"] == {"n": 8, "accuracy": 0.5, "windows": [0.5] * 4, "drift": 0.0}
    assert good["position_bias"]["first_share"] == 0.5 and good["flags"] == []
    assert good["gold"]["accuracy"] == 1.0
    # Cohen between the two: lazy = a,b,a,b,...; good = all a -> p_o = 0.5, p_e = 0.5·1 = 0.5 -> κ = 0
    assert r.kappa == {"method": "cohen", "value": 0.0, "items": 20}


def test_drift_is_measured_in_time_order():
    # gold answers right early and wrong late, given out of order in the file
    anns = [_ann(i, "x", "a" if t < 4 else "b", i, gold="a", time=t) for i, t in enumerate([7, 0, 5, 1, 6, 2, 4, 3])]
    anns += [_ann(i, "y", "a", 100 + i, gold="a") for i in range(8)]
    g = analyze(anns, windows=2).per_annotator["x"]
    assert g["gold"]["windows"] == [1.0, 0.0] and g["gold"]["drift"] == -1.0 and "drifting" in g["flags"]


def test_fleiss_for_three_annotators_and_item_filter():
    votes = {1: "aaa", 2: "aab", 3: "abb", 4: "ab", 5: "a"}
    anns = [_ann(i, f"r{j}", c, 10 * i + j) for i, v in votes.items() for j, c in enumerate(v)]
    r = analyze(anns, min_agreement=0.66)
    assert r.kappa["method"] == "fleiss" and r.kappa["items"] == 4
    # table (a, b): [3,0] [2,1] [1,2] [1,1]; P_i = 1, 1/3, 1/3, 0 -> P̄ = 5/12; p_a = 7/11, p_b = 4/11
    # P_e = (49 + 16) / 121 = 65/121; κ = (5/12 - 65/121) / (56/121) = -0.2604
    assert r.kappa["value"] == pytest.approx((5 / 12 - 65 / 121) / (56 / 121), abs=1e-6)
    assert r.kept_items == ["1", "2", "3"]
    assert r.dropped_items == {"4": "no_majority", "5": "single_annotation"}
    assert analyze(anns, min_agreement=0.9).dropped_items["2"] == "below_min_agreement"
    assert set(r.kappa["pairwise_cohen"]) == {"r0|r1", "r0|r2", "r1|r2"}


def test_cli_agreement_writes_filtered_pairs(tmp_path, jsonl, read, cli, capsys):
    rows = []
    for i in range(6):
        for j, who in enumerate(["ann1", "ann2", "ann3"]):
            choice = "a" if (i < 4 or j == 0) else "b"  # items 0-3 unanimous a; 4-5 split 1 a / 2 b
            rows.append({"item_id": i, "annotator": who, "choice": choice, "prompt": f"p{i}",
                         "response_a": f"A{i}", "response_b": f"B{i}", "shown_first": "a"})
    rows.append({"annotator": "ann1", "choice": "a"})  # no item id
    src = jsonl(tmp_path / "ann.jsonl", rows)
    out, rep = tmp_path / "kept.jsonl", tmp_path / "agree.json"
    assert cli(["agreement", str(src), "--out", str(out), "--report", str(rep), "--min-agreement", "0.66"]) == 0
    text = capsys.readouterr().out
    assert "fleiss kappa" in text and "kept 6 items" in text and "1 unreadable rows" in text
    kept = read(out)
    assert kept[0] == {"prompt": "p0", "chosen": "A0", "rejected": "B0", "item_id": "0", "agreement": 1.0}
    assert kept[5]["chosen"] == "B5" and kept[5]["agreement"] == pytest.approx(2 / 3, abs=1e-6)
    report = json.loads(rep.read_text())
    assert report["items"] == 6 and report["unreadable_rows"] == 1 and "item_agreement" in report
    assert report["per_annotator"]["ann1"]["position_bias"]["first_share"] == 1.0
    assert read(tmp_path / "kept.dropped.jsonl") == []
    anns, payload, bad = read_annotations(src)
    assert len(anns) == 18 and bad[0]["reason"] == "missing_field:item" and bad[0]["line"] == 19


def test_unknown_labels_are_refused_with_file_line_and_the_allowed_set(tmp_path, jsonl, cli):
    from preftune.data.load import DataError

    rows = [{"item_id": 1, "annotator": "x", "choice": "A"},  # upper case is fine: labels are lower-cased
            {"item_id": 1, "annotator": "y", "choice": "Tie"},
            {"item_id": 2, "annotator": "x", "choice": "response_a"},  # line 3: not a label
            {"item_id": 2, "annotator": "y", "choice": "b", "shown_first": "c"},  # line 4
            {"item_id": 3, "annotator": "x", "choice": "b", "gold": "bb"}]  # line 5
    src = jsonl(tmp_path / "ann.jsonl", rows)
    with pytest.raises(DataError) as e:
        read_annotations(src)
    msg = str(e.value)
    assert msg.startswith("3 annotation rows have labels outside the allowed set")
    assert f"{src}:3: choice 'response_a'" in msg and f"{src}:4: shown_first 'c'" in msg
    assert f"{src}:5: gold 'bb'" in msg and "a, b, tie, equal, none, both, neither" in msg
    anns, _, _ = read_annotations(jsonl(tmp_path / "ok.jsonl", rows[:2]))
    assert [a.choice for a in anns] == ["a", "tie"]
    with pytest.raises(SystemExit):  # argparse: --first-label must be a or b
        cli(["agreement", str(src), "--first-label", "c"])
    with pytest.raises(ValueError, match="first_label"):
        analyze(anns, first_label="left")


def test_agreement_outputs_may_not_overwrite_the_input(tmp_path, jsonl, cli):
    from preftune.errors import PreftuneError

    src = jsonl(tmp_path / "ann.jsonl", [{"item_id": 1, "annotator": "x", "choice": "a"}])
    with pytest.raises(PreftuneError, match="is the input"):
        cli(["agreement", str(src), "--report", str(src)])
    assert "annotator" in src.read_text()
