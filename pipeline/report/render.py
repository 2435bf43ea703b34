"""A report's document: sections of text, tables and figures, rendered as Markdown and as one
self-contained HTML file, and written to a folder atomically."""

from __future__ import annotations

import base64
import html
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class Section:
    """A titled block of tables and figures; rendered to both HTML and Markdown."""

    title: str
    text: str = ""
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    figures: list[tuple[str, str, bytes]] = field(default_factory=list)  # (file, caption, png)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def markdown_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    index = df.index.name is not None or not isinstance(df.index, pd.RangeIndex)
    header = ([""] if index else []) + cols
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for idx, row in df.iterrows():
        cells = ([str(idx)] if index else []) + [_fmt(v) for v in row]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def render_markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", "", s.text, ""] if s.text else [f"## {s.title}", ""]
        for name, df in s.tables:
            out += [f"**{name}** (`{name}.csv`)", "", markdown_table(df), ""]
        for file, caption, _ in s.figures:
            out += [f"![{file}]({file})", "", f"*{caption}*", ""]
    return "\n".join(out)


HTML_STYLE = """body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1.5rem;font-size:.85rem}
td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}th{background:#f3f3f3}
figure{margin:1.5rem 0}img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-style:italic;margin-top:.3rem}"""


def render_html(title: str, sections: list[Section]) -> str:
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{html.escape(title)}</title><style>{HTML_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{html.escape(s.text)}</p>")
        for name, df in s.tables:
            parts.append(f"<h3>{html.escape(name)}</h3>")
            parts.append(df.to_html(na_rep="", float_format=lambda v: f"{v:.4g}", border=0))
        for file, caption, png in s.figures:
            data = base64.b64encode(png).decode()
            parts.append(f"<figure><img alt='{html.escape(file)}' src='data:image/png;base64,"
                         f"{data}'><figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out_dir: Path, title: str, sections: list[Section]) -> Path:
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
        (tmp / "report.md").write_text(render_markdown(title, sections))
        (tmp / "index.html").write_text(render_html(title, sections))
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
