"""A self-contained HTML report: the summary tables and every picture embedded as base64 PNG."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from plerec.safe_io import atomic_write_text


def markdown_to_html(text: str) -> str:
    """The small Markdown subset the summaries use: headings, paragraphs and pipe tables."""
    out, table = [], []

    def flush() -> None:
        if not table:
            return
        rows = [r for r in table if not set(r.replace("|", "").strip()) <= {"-"}]
        out.append("<table>")
        for i, row in enumerate(rows):
            cells = [c.strip() for c in row.strip().strip("|").split("|")]
            tag = "th" if i == 0 else "td"
            out.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
        out.append("</table>")
        table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(out)


def write_report(path: str | Path, title: str, markdown: str, images: Sequence[tuple[str, str | Path]]) -> None:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}</style>",
        "</head><body>",
        markdown_to_html(markdown),
    ]
    for caption, image in images:
        data = base64.b64encode(Path(image).read_bytes()).decode("ascii")
        parts.append(
            f"<h2>{html.escape(caption)}</h2><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
        )
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts))
