"""A report's document: sections of text, tables and figures, rendered as Markdown and as one
self-contained HTML file, and written to a folder atomically.

Both renderers share one reading of a table (``table_cells``: no positional index column, every
value formatted by ``format_value``, numeric columns right-aligned) and one anchor per section
(``anchors``), so the page and the Markdown show the same numbers and the same contents list. The
CSV files keep the raw values at full precision.
"""

from __future__ import annotations

import base64
import html
import math
import numbers
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pandas as pd


@dataclass
class Section:
    """A titled block of tables and figures; rendered to both HTML and Markdown."""

    title: str
    text: str = ""
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    figures: list[tuple[str, str, bytes]] = field(default_factory=list)  # (file, caption, png)


# -- values and tables ----------------------------------------------------------------------------


def _is_number(v) -> bool:
    return isinstance(v, numbers.Number) and not isinstance(v, bool)


def _is_missing(v) -> bool:
    try:
        return v is None or bool(pd.isna(v))
    except (TypeError, ValueError):  # a list or an array: not a missing scalar
        return False


def format_value(v) -> str:
    """A value as a reader wants it; one rule, by magnitude, for every table of both renderers:
    missing (None, NaN) -> empty; an integer -> thousands separators (12,345); a float of
    magnitude >= 1000 -> a whole number with thousands separators (12,346); >= 1 -> one decimal
    (seconds, epochs, losses: 29.0); below 1 -> four significant digits (accuracies,
    probabilities, rates: 0.9826, 1.2e-05); anything else as text. In a table, a column of
    whole numbers only (integers that pandas made float for a missing value) shows integers."""
    if _is_missing(v):
        return ""
    if not _is_number(v):
        return str(v)
    if isinstance(v, numbers.Integral):
        return f"{int(v):,}"
    v = float(v)
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    if abs(v) >= 999.95:  # what rounds to 1,000.0 or more
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.1f}"
    return f"{v:.4g}"


def _shows_index(df: pd.DataFrame) -> bool:
    """A named index, or one of labels (e.g. field names), is a column; a positional one (an
    unnamed integer index, 0..n-1 or a leftover of sorting) is not."""
    if any(n is not None for n in df.index.names):
        return True
    return not pd.api.types.is_integer_dtype(df.index.dtype)


class Cells(NamedTuple):
    """A table as both renderers show it."""

    header: list[str]
    rows: list[list[str]]  # formatted by format_value
    numeric: list[list[bool]]  # per cell: a number (right-aligned) or text (left)
    numeric_columns: list[bool]  # every value present in the column is a number
    index_columns: int  # how many leading columns are the index (row headers)


def table_cells(df: pd.DataFrame) -> Cells:
    header = [" / ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in df.columns]
    values = [list(row) for row in df.itertuples(index=False, name=None)]
    n_index = 0
    if _shows_index(df):
        n_index = df.index.nlevels
        header = ["" if n is None else str(n) for n in df.index.names] + header
        labels = [i if isinstance(i, tuple) else (i,) for i in df.index]
        values = [list(label) + row for label, row in zip(labels, values)]
    columns, whole = [], []
    for j in range(len(header)):
        present = [row[j] for row in values if not _is_missing(row[j])]
        columns.append(bool(present) and all(_is_number(v) for v in present))
        # Whole numbers only: an integer column that pandas made float for a missing value.
        whole.append(columns[j] and all(float(v).is_integer() for v in present))
    numeric = [[columns[j] if _is_missing(v) else _is_number(v) for j, v in enumerate(row)]
               for row in values]  # an empty cell aligns with its column
    rows = [[format_value(int(v) if whole[j] and not _is_missing(v) else v)
             for j, v in enumerate(row)] for row in values]
    return Cells(header, rows, numeric, columns, n_index)


def markdown_table(df: pd.DataFrame) -> str:
    """Markdown aligns whole columns: right where every value present is a number."""
    t = table_cells(df)

    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    out = [line(t.header), "|" + "|".join("---:" if n else ":---" for n in t.numeric_columns) + "|"]
    return "\n".join([*out, *(line(r) for r in t.rows)])


def html_table(df: pd.DataFrame) -> str:
    """Each cell aligned by its value (numbers right, text left, as a spreadsheet does) and kept
    on one line, inside a container that scrolls sideways when the table is wider than the
    page (the page itself never does)."""
    t = table_cells(df)
    out = ["<div class='table-wrap'><table><thead><tr>"]
    out += [f"<th class='{'num' if n else 'text'}' scope='col'>{html.escape(c)}</th>"
            for c, n in zip(t.header, t.numeric_columns)]
    out.append("</tr></thead><tbody>")
    for row, kinds in zip(t.rows, t.numeric):
        out.append("<tr>")
        for j, (c, n) in enumerate(zip(row, kinds)):
            tag, scope = ("th", " scope='row'") if j < t.index_columns else ("td", "")
            out.append(f"<{tag} class='{'num' if n else 'text'}'{scope}>{html.escape(c)}</{tag}>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


# -- the document ---------------------------------------------------------------------------------


def slug(title: str) -> str:
    """A heading's anchor as GitHub derives it: lower case, punctuation dropped, spaces to
    hyphens ("Headline: fine" -> "headline-fine"), so report.md's links work there too."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-") or "section"


def anchors(sections: list[Section]) -> list[str]:
    """One id per section, stable for a title; a repeated title gets -1, -2 (as GitHub does)."""
    used, out = {"top"}, []  # "top": the page's own header
    for s in sections:
        base = anchor = slug(s.title)
        n = 0
        while anchor in used:
            n += 1
            anchor = f"{base}-{n}"
        used.add(anchor)
        out.append(anchor)
    return out


def _markdown_section(s: Section) -> list[str]:
    out = [f"## {s.title}", "", s.text, ""] if s.text else [f"## {s.title}", ""]
    for name, df in s.tables:
        out += [f"**{name}** (`{name}.csv`)", "", markdown_table(df), ""]
    for file, caption, _ in s.figures:
        out += [f"![{file}]({file})", "", f"*{caption}*", ""]
    return out


def render_markdown(title: str, sections: list[Section], lead: int = 0) -> str:
    """``lead``: how many opening sections (the headline) come before the contents list."""
    contents = ["**Contents**", "", *(f"{k}. [{s.title}](#{a})" for k, (s, a)
                                      in enumerate(zip(sections, anchors(sections)), start=1)), ""]
    body = [_markdown_section(s) for s in sections]
    body.insert(min(lead, len(sections)), contents)
    return "\n".join([f"# {title}", "", *(line for part in body for line in part)])


HTML_STYLE = """*{box-sizing:border-box}
html{background:#fff;color-scheme:light}
body{font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;
background:#fff;max-width:1200px;margin:0 auto;padding:2rem 1.5rem}
h1,h2,h3,p,li,figcaption{overflow-wrap:anywhere}
h1{font-size:1.75rem;line-height:1.25;margin:0 0 1rem}
h2{font-size:1.35rem;margin:2.5rem 0 .75rem;padding-bottom:.3rem;border-bottom:1px solid #d0d7de}
h3{font-size:1rem;margin:1.5rem 0 .4rem}
h3 .file{color:#57606a;font-weight:normal;font-size:.85rem}
a{color:#0969da}
nav.contents{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:.75rem 1.25rem;
margin:2rem 0}
nav.contents h2{font-size:1rem;margin:0 0 .4rem;padding:0;border:0}
nav.contents ol{margin:0;padding-left:1.5rem}
.table-wrap{max-width:100%;overflow-x:auto;margin:.5rem 0 1.5rem}
table{border-collapse:collapse;font-size:.875rem}
th,td{border:1px solid #d0d7de;padding:.3rem .6rem;vertical-align:top;white-space:nowrap}
thead th{background:#f6f8fa}
tbody tr:nth-child(even){background:#f9fafb}
.num{text-align:right;font-variant-numeric:tabular-nums}
.text{text-align:left}
figure{margin:1.5rem 0;max-width:100%}
figure img{display:block;max-width:100%;height:auto;border:1px solid #eaeef2}
figcaption{color:#57606a;font-style:italic;font-size:.9rem;margin-top:.4rem}
.back-to-top{font-size:.85rem;text-align:right;margin:1.5rem 0 0}
@page{margin:1.5cm}
@media print{
html,body{background:#fff;color:#000}
body{max-width:none;padding:0;font-size:11pt}
.back-to-top{display:none}
figure,.table-wrap,tr,nav.contents{break-inside:avoid;page-break-inside:avoid}
h2,h3{break-after:avoid;page-break-after:avoid}
.table-wrap{overflow:visible}
thead{display:table-header-group}
tbody tr:nth-child(even),thead th,nav.contents{background:#fff}
a{color:inherit;text-decoration:none}
}"""


def _html_section(s: Section, anchor: str) -> str:
    parts = [f"<section aria-labelledby='{anchor}'><h2 id='{anchor}'>{html.escape(s.title)}</h2>"]
    if s.text:
        parts.append(f"<p>{html.escape(s.text)}</p>")
    for name, df in s.tables:
        parts.append(f"<h3>{html.escape(name)} <span class='file'>({html.escape(name)}.csv)"
                     f"</span></h3>{html_table(df)}")
    for file, caption, png in s.figures:
        data = base64.b64encode(png).decode()
        parts.append(f"<figure><img alt='{html.escape(file)}' src='data:image/png;base64,"
                     f"{data}'><figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("<p class='back-to-top'><a href='#top'>↑ Back to top</a></p></section>")
    return "\n".join(parts)


def render_html(title: str, sections: list[Section], lead: int = 0) -> str:
    """One page, nothing fetched: styles inline, images as base64. ``lead`` as for Markdown."""
    ids = anchors(sections)
    contents = ("<nav class='contents' aria-label='Contents'><h2>Contents</h2><ol>"
                + "".join(f"<li><a href='#{a}'>{html.escape(s.title)}</a></li>"
                          for s, a in zip(sections, ids)) + "</ol></nav>")
    body = [_html_section(s, a) for s, a in zip(sections, ids)]
    body.insert(min(lead, len(sections)), contents)
    return "\n".join([
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{HTML_STYLE}</style></head><body>",
        f"<header id='top'><h1>{html.escape(title)}</h1></header><main>",
        *body, "</main></body></html>"])


def write_report(out_dir: Path, title: str, sections: list[Section], lead: int = 0) -> Path:
    """Write the folder next to its final place, then swap it in: never half-written."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        for s in sections:
            for name, df in s.tables:
                df.to_csv(tmp / f"{name}.csv", index=not isinstance(df.index, pd.RangeIndex))
            for file, _, png in s.figures:
                (tmp / file).write_bytes(png)
        (tmp / "report.md").write_text(render_markdown(title, sections, lead))
        (tmp / "index.html").write_text(render_html(title, sections, lead))
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}-old-{os.getpid()}")
            out_dir.rename(old)
        try:
            tmp.rename(out_dir)
        except BaseException:
            if old is not None and not out_dir.exists():
                old.rename(out_dir)  # put the previous report back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
