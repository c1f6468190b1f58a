"""The blind A/B form of ``preftune review export``: one self-contained HTML page a rater opens in a browser.

Per item: the prompt, response A beside response B, and A / B / tie buttons (plus an optional comment). The page
keeps the answers in the browser's local storage while the rater works, and "Download answers" saves a CSV
(``item_id,rater,choice,comment``) that ``preftune review import`` reads. Nothing is fetched: no external
script, style or font. With ``#selftest`` in the URL the page answers every item by itself (A for odd item
numbers, B for even ones) and puts the CSV it would download into ``<body data-export>`` (URI-encoded), so a
headless browser can check the export end to end.
"""

from __future__ import annotations

import html
import json

from preftune.report.html import STYLE

FORM_STYLE = """
.item { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 1em; margin: 1em 0; }
.pair { display: flex; gap: 1em; } .side { flex: 1; border: 1px solid #eee; padding: 0.4em; background: #fafafa; }
.choices label { margin-right: 1.2em; } .done { border-color: #2ca02c; }
#bar { position: sticky; top: 0; background: #fff; padding: 0.5em 0; border-bottom: 1px solid #ddd; }
"""

SCRIPT = r"""
(function () {
  var sheet = document.body.getAttribute("data-sheet");
  var items = Array.prototype.slice.call(document.querySelectorAll(".item"));
  function store() { try { return window.localStorage; } catch (e) { return null; } }
  function csvCell(v) { v = String(v); return /[",\n]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v; }
  function answers() {
    return items.map(function (it) {
      var id = it.getAttribute("data-item");
      var picked = it.querySelector("input[type=radio]:checked");
      return {id: id, choice: picked ? picked.value : "", comment: it.querySelector("textarea").value};
    });
  }
  function buildCsv() {
    var rater = document.getElementById("rater").value.trim();
    var lines = ["item_id,rater,choice,comment"];
    answers().forEach(function (a) { lines.push([a.id, rater, a.choice, a.comment].map(csvCell).join(",")); });
    return lines.join("\n") + "\n";
  }
  function refresh() {
    var n = 0;
    answers().forEach(function (a, i) { items[i].classList.toggle("done", a.choice !== ""); if (a.choice) { n += 1; } });
    document.getElementById("progress").textContent = n + " of " + items.length + " answered";
    var s = store();
    if (s) { s.setItem("preftune-review:" + sheet, JSON.stringify({rater: document.getElementById("rater").value, answers: answers()})); }
  }
  function restore() {
    var s = store(), saved = s ? s.getItem("preftune-review:" + sheet) : null;
    if (!saved) { return; }
    saved = JSON.parse(saved);
    document.getElementById("rater").value = saved.rater || "";
    saved.answers.forEach(function (a, i) {
      if (!items[i]) { return; }
      var box = items[i].querySelector("input[value='" + a.choice + "']");
      if (box) { box.checked = true; }
      items[i].querySelector("textarea").value = a.comment || "";
    });
  }
  document.getElementById("download").addEventListener("click", function () {
    if (!document.getElementById("rater").value.trim()) { alert("Please enter your name first."); return; }
    var link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([buildCsv()], {type: "text/csv"}));
    link.download = "answers-" + sheet + "-" + document.getElementById("rater").value.trim() + ".csv";
    document.body.appendChild(link); link.click(); link.remove();
  });
  document.addEventListener("change", refresh);
  document.addEventListener("input", refresh);
  if (window.location.hash === "#selftest") {
    document.getElementById("rater").value = "selftest";
    items.forEach(function (it, i) { it.querySelector("input[value='" + (i % 2 === 0 ? "a" : "b") + "']").checked = true; });
    document.body.setAttribute("data-export", encodeURIComponent(buildCsv()));
  } else {
    restore();
  }
  refresh();
  document.body.setAttribute("data-items-rendered", String(items.length));
})();
"""


def render_form(sheet: str, items: list[dict]) -> str:
    """The form page for ``items`` (``item_id``, ``prompt``, ``response_a``, ``response_b``)."""
    e = lambda v: html.escape(str(v), quote=True)  # noqa: E731
    cards = []
    for it in items:
        iid = e(it["item_id"])
        radios = "".join(f'<label><input type="radio" name="choice-{iid}" value="{v}"> {label}</label>'
                         for v, label in (("a", "A is better"), ("b", "B is better"), ("tie", "tie")))
        cards.append(
            f'<div class="item" data-item="{iid}"><h2>item {iid}</h2><pre>{e(it["prompt"])}</pre>'
            f'<div class="pair"><div class="side"><b>A</b><pre>{e(it["response_a"])}</pre></div>'
            f'<div class="side"><b>B</b><pre>{e(it["response_b"])}</pre></div></div>'
            f'<p class="choices">{radios}</p><textarea rows="1" cols="80" placeholder="comment (optional)"></textarea>'
            "</div>")
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>preftune review: {e(sheet)}</title><style>{STYLE}{FORM_STYLE}</style></head>",
        f'<body data-sheet="{e(sheet)}" data-items="{len(items)}">',
        f"<h1>Which response is better? ({e(sheet)})</h1>",
        "<p>For each prompt, pick the better response, or tie when neither is better. The two responses come from "
        "different models in an order shuffled per item; which model wrote which is not shown.</p>",
        '<div id="bar">Your name: <input id="rater" size="20"> <button id="download">Download answers</button> '
        '<span id="progress" class="muted"></span></div>',
        *cards,
        f"<script>{SCRIPT}</script>",
        f"<script type=\"application/json\" id=\"sheet-meta\">{html.escape(json.dumps({'sheet': sheet}))}</script>",
        "</body></html>",
    ])
