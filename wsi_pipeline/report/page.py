"""The report's HTML: one page, inline CSS, SVG plots inlined, a few lines of plain JS that sort
and filter the slide table (the page reads fine without it). Every value from the run is escaped."""

from __future__ import annotations

from html import escape

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1500px}
h1{font-size:1.5em}h2{font-size:1.25em;border-bottom:1px solid #ccc;margin-top:2em}h3{font-size:1.05em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f3f3f3}th.sortable{cursor:pointer;user-select:none}
th.sorted-asc::after{content:" \\25B2"}th.sorted-desc::after{content:" \\25BC"}
.plots{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.plots figure{margin:0}.plots svg{max-width:380px;height:auto}
.models{display:flex;flex-wrap:wrap;gap:24px}.model{border:1px solid #ddd;padding:8px;border-radius:4px}
img.thumb{max-width:160px;max-height:120px}img.patch{width:40px;height:40px;margin:1px}
.failed{background:#fde8e8}.muted{color:#777}pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:.8em}
.err{font-family:monospace;font-size:.85em;white-space:pre-wrap}
"""

# Sort on header click (numbers as numbers, empty cells last); filter rows by the text box.
SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    if (th.dataset.nosort !== undefined) return;
    th.classList.add('sortable');
    th.addEventListener('click', function () {
      var asc = !th.classList.contains('sorted-asc');
      Array.prototype.forEach.call(heads, function (h) { h.classList.remove('sorted-asc', 'sorted-desc'); });
      th.classList.add(asc ? 'sorted-asc' : 'sorted-desc');
      var rows = Array.prototype.slice.call(table.tBodies[0].rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
        if (x === '' || y === '') return (x === '') - (y === '');
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
        return asc ? c : -c;
      });
      rows.forEach(function (r) { table.tBodies[0].appendChild(r); });
    });
  });
});
document.querySelectorAll('input.filter').forEach(function (box) {
  var table = document.getElementById(box.dataset.table);
  box.addEventListener('input', function () {
    var q = box.value.toLowerCase();
    Array.prototype.forEach.call(table.tBodies[0].rows, function (r) {
      r.style.display = r.dataset.text.indexOf(q) >= 0 ? '' : 'none';
    });
  });
});
"""


def e(value) -> str:
    return escape("" if value is None else str(value), quote=True)


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def metric_text(metric: dict | None) -> str:
    """'0.912 [0.801, 0.990]' from training/metrics.py's {"value", "ci95"}."""
    if not isinstance(metric, dict) or metric.get("value") is None:
        return "–"
    ci = metric.get("ci95")
    ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, list) and len(ci) == 2 else ""
    return f"{metric['value']:.3f}{ci_text}"


def table(header: list[str], rows: list[list], *, cls: str = "", table_id: str | None = None,
          raw_columns: frozenset[int] = frozenset(), sort_values: list[list] | None = None,
          row_classes: list[str] | None = None, row_text: list[str] | None = None) -> str:
    """An HTML table; cells escaped except `raw_columns` (already HTML). `sort_values` give the
    data-v the sorter compares (default the cell text)."""
    ident = f' id="{e(table_id)}"' if table_id else ""
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for j, cell in enumerate(row):
            v = sort_values[i][j] if sort_values is not None else cell
            text = cell if j in raw_columns else e(cell)
            cells.append(f'<td data-v="{e(v)}">{text}</td>')
        attrs = f' class="{e(row_classes[i])}"' if row_classes and row_classes[i] else ""
        if row_text is not None:
            attrs += f' data-text="{e(row_text[i].lower())}"'
        body.append(f"<tr{attrs}>{''.join(cells)}</tr>")
    return (f'<table class="{e(cls)}"{ident}><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def figure(svg: str | None, caption: str = "") -> str:
    if not svg:
        return ""
    cap = f"<figcaption class=\"muted\">{e(caption)}</figcaption>" if caption else ""
    return f'<figure class="plot">{svg}{cap}</figure>'


def document(title: str, sections: list[str], *, subtitle: str = "") -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width\"><title>{e(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{e(title)}</h1>"
            f"<p class=\"muted\">{e(subtitle)}</p>{''.join(sections)}"
            f"<script>{SCRIPT}</script></body></html>\n")
