"""Reading files without losing or garbling rows: the row size limit, CSV record text and CSV line numbers."""

from __future__ import annotations

import json
import tracemalloc

from preftune.data.formats import DropLog, normalize
from preftune.data.load import MAX_ROW_BYTES, read_rows
from preftune.data.validate import validate


def _big_row_file(path, size):
    small = {"prompt": "p", "chosen": "a good answer", "rejected": "a bad one"}
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(small) + "\n")
        f.write(json.dumps({"prompt": "q", "chosen": "x " * (size // 2), "rejected": "y"}) + "\n")
        f.write(json.dumps(small | {"prompt": "r"}) + "\n")
    return path


def test_a_row_over_the_limit_is_dropped_unread_with_bounded_memory(tmp_path):
    path = _big_row_file(tmp_path / "big.jsonl", 4 * 2**20)  # line 2 holds a 4 MiB row
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    rows = list(read_rows(path, max_row_bytes=2**16))  # not collecting errors: still a row, not an exception
    peak = tracemalloc.get_traced_memory()[1]
    if started:
        tracemalloc.stop()
    # Reading the row whole would hold its 4 MiB of bytes, its text and the parsed strings (> 12 MiB); skipping
    # it holds at most the 64 KiB limit and a 64 KiB piece at a time.
    assert peak < 2**20, peak
    assert [(r.line, r.reason, r.data is None) for r in rows] == [
        (1, "malformed_line", False), (2, "row_too_large", True), (3, "malformed_line", False)]
    size = len(path.read_bytes().split(b"\n")[1])
    assert rows[1].drop_reason == "row_too_large" and rows[1].error == f"{size} bytes, more than the 65536-byte limit"
    assert rows[1].raw.startswith('{"prompt": "q"') and len(rows[1].raw) == 1000  # a preview, not the row
    # The loader counts it (kept + dropped = read) instead of stopping.
    drops = DropLog()
    kept = list(normalize(read_rows(path, max_row_bytes=2**16), "paired", drops))
    assert (len(kept), drops.read, dict(drops.counts)) == (2, 3, {"row_too_large": 1})


def test_validate_reports_row_too_large_as_an_error_over_rows_read(tmp_path):
    path = _big_row_file(tmp_path / "big.jsonl", MAX_ROW_BYTES)  # over the default 8 MiB limit
    r = validate(path)
    f = r.finding("row_too_large")
    assert (f.count, f.total, f.severity, f.example_rows) == (1, 3, "error", [f"{path}:2"])
    assert (r.rows_read, r.rows_usable) == (3, 2)
    assert validate(path, max_row_bytes=2 * MAX_ROW_BYTES).finding("row_too_large") is None


def test_csv_record_with_extra_cells_keeps_its_text(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\np1,good,bad\np2,"two\nlines",x,EXTRA\np3,fine,worse\n',
                    encoding="utf-8")
    rows = list(read_rows(path, collect_errors=True))
    assert [r.line for r in rows] == [2, 4, 5]
    assert rows[1].data is None and rows[1].error == "more cells than header columns"
    assert rows[1].raw == 'p2,"two\nlines",x,EXTRA'  # the record as written, both of its lines


def test_csv_encoding_error_is_reported_at_its_line_and_the_rest_is_read(tmp_path):
    # 300 rows (> the 8 KiB a text reader decodes at once) put the bad byte far from where decoding starts.
    lines = [b"prompt,chosen,rejected"] + [f"p{i},good answer {i},bad answer {i}".encode() for i in range(300)]
    lines[251] = b"p250,caf\xe9 au lait,bad answer"
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    r = validate(path)
    f = r.finding("non_utf8")
    assert f.example_rows == [f"{path}:252"] and f.details["errors"][0].startswith(f"{path}:252: not valid UTF-8")
    assert (r.rows_read, r.rows_usable) == (300, 299)
    bad = [row for row in read_rows(path, collect_errors=True) if row.data is None]
    assert bad[0].raw == "p250,caf\ufffd au lait,bad answer"


def test_csv_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,chosen,rejected\np,yes,no\n")
    assert next(iter(read_rows(path))).data == {"prompt": "p", "chosen": "yes", "rejected": "no"}
