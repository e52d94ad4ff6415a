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


Image = tuple[str, str | Path | bytes] | tuple[str, str | Path | bytes, str]  # caption, PNG, note

STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222;"
    "line-height:1.4}h1{margin-bottom:.3em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "td:first-child,th:first-child{text-align:left}th{background:#f4f4f4}"
    "table.details td,table.details th{text-align:left;border:none;padding:1px 12px 1px 0;vertical-align:top}"
    "table.details th{background:none;color:#555;font-weight:600;white-space:nowrap}"
    "img{max-width:100%;border:1px solid #eee}figure{margin:0}figcaption{color:#555;font-size:.9em}"
    "div.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em;margin:.6em 0}"
    "pre{background:#f6f8fa;padding:.8em;overflow:auto;font-size:.85em;column-width:22em;column-gap:2em}"
)


def _png(image: str | Path | bytes) -> str:
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def details_html(details: Sequence[tuple[str, str]]) -> str:
    """A two-column table of what a page is about (data size, hyperparameters, model, seed, date)."""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in details)
    return f"<table class='details'>{rows}</table>" if rows else ""


def write_report(
    path: str | Path,
    title: str,
    markdown: str,
    images: Sequence[Image],
    *,
    details: Sequence[tuple[str, str]] = (),
    notes: Sequence[str] = (),
    appendix: Sequence[tuple[str, str]] = (),
) -> None:
    """One self-contained page, written atomically: `markdown` (markdown_to_html) with `details` (label, value
    pairs) and `notes` (what the page leaves out, and why) after its first heading, then every image (a PNG
    file or PNG bytes, embedded as a data URI under its caption, with an optional note), then `appendix`
    (heading, text) shown preformatted. No script, no external resource: it reads offline, as a file."""
    body = markdown_to_html(markdown)
    top = details_html(details) + "".join(f"<div class='note'>{html.escape(n)}</div>" for n in notes)
    head, sep, rest = body.partition("</h1>")
    body = head + sep + "\n" + top + rest if sep else top + body
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head><body>",
        body,
    ]
    for caption, image, *note in images:
        parts.append(f"<h2>{html.escape(caption)}</h2><figure><img alt='{html.escape(caption)}' src='{_png(image)}'>")
        parts.extend(f"<figcaption>{html.escape(n)}</figcaption>" for n in note)
        parts.append("</figure>")
    for heading, text in appendix:
        parts.append(f"<h2>{html.escape(heading)}</h2><pre>{html.escape(text, quote=False)}</pre>")
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts))
