"""HTML for the dashboard, written by hand: every value that came from a file or a person goes
through `e()` (escaped, quotes included) before it reaches a page, and no page carries inline
script, so the Content-Security-Policy can forbid it."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any


def e(value: Any) -> str:
    return escape(str(value), quote=True)


def attr_json(value: Any) -> str:
    """A value for a data-* attribute, read back by the page's script with JSON.parse."""
    return e(json.dumps(value))


def fmt(v: Any) -> str:
    """A number as a person reads it: integers with separators, floats to 4 significant
    digits (scientific when tiny or huge)."""
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if v == 0 or 1e-3 <= abs(v) < 1e6 else f"{v:.3e}"
    return str(v)


def ago(t: float, now: float | None = None) -> str:
    s = max(0.0, (time.time() if now is None else now) - t)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.0f} {unit} ago"
    return f"{s:.0f} s ago"


def badge(state: str) -> str:
    return f'<span class="badge {e(state)}" data-state="{e(state)}">{e(state)}</span>'


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """Headers are escaped here; cells are HTML the caller built (escaped where needed)."""
    return _table([e(h) for h in headers], rows, cls)


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """A table of cells that are all HTML already."""
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    cls_attr = f' class="{e(cls)}"' if cls else ""
    return f"<table{cls_attr}><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as (dotted.key, leaf) rows; a list is one leaf."""
    if isinstance(value, dict):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, value)]


def cell(v: Any) -> str:
    if isinstance(v, (list, dict)):
        text = json.dumps(v)
        return f"<code>{e(text if len(text) <= 200 else text[:200] + ' ...')}</code>"
    return e(fmt(v))


def page(title: str, body: str, *, scripts: Sequence[str] = (), active: str = "") -> str:
    nav = "".join(f'<a href="{href}" class="{"on" if name == active else ""}">{name}</a>'
                  for name, href in (("runs", "/"), ("annotate", "/annotate")))
    tags = "".join(f'<script defer src="/static/{e(s)}"></script>' for s in scripts)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{e(title)} · lmforge</title>'
            f'<link rel="stylesheet" href="/static/uplot/uPlot.min.css">'
            f'<link rel="stylesheet" href="/static/style.css">{tags}</head>'
            f'<body><header><b>lmforge</b><nav>{nav}</nav></header>'
            f'<main><h1>{e(title)}</h1>{body}</main></body></html>')


# --------------------------------------------------------------------------- markdown

_INLINE = [
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"<b>\1</b>"),
    (re.compile(r"(?<![*\w])\*([^*\s][^*]*)\*(?!\w)"), r"<i>\1</i>"),
]
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def _inline(text: str, src: Any) -> str:
    """One line of markdown: escaped first, then images (through `src`, which maps a path
    relative to the report to a URL, or None to drop it), links (http(s) and relative only),
    code, bold and italics."""
    out = e(text)
    out = _IMAGE.sub(lambda m: (f'<img alt="{m[1]}" src="{e(u)}">'
                                if (u := src(m[2])) else m[1]), out)
    out = _LINK.sub(lambda m: (f'<a href="{m[2]}">{m[1]}</a>' if re.match(
        r"(https?://|#|[\w./-]+$)", m[2]) and not m[2].startswith("//") else m[1]), out)
    for pattern, repl in _INLINE:
        out = pattern.sub(repl, out)
    return out


def markdown(text: str, src: Any) -> str:
    """The markdown `report.py` writes: headings, pipe tables, lists, images, paragraphs and
    fenced code. Anything else is shown as text, escaped."""
    html: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            html.append(f"<pre>{e(chr(10).join(lines[i + 1:j]))}</pre>")
            i = j + 1
            continue
        if m := re.match(r"(#{1,4}) (.*)", line):
            level = len(m[1]) + 1  # the page's own title is the h1
            html.append(f"<h{level}>{_inline(m[2], src)}</h{level}>")
        elif line.startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            html.append(_md_table(lines[i:j], src))
            i = j
            continue
        elif m := re.match(r"(\s*)[-*] (.*)", line):
            depth = len(m[1]) // 2
            html.append(f'<div class="li" style="margin-left:{depth * 1.5}em">'
                        f"&bull; {_inline(m[2], src)}</div>")
        elif line.strip():
            html.append(f"<p>{_inline(line, src)}</p>")
        i += 1
    return "\n".join(html)


def _md_table(rows: list[str], src: Any) -> str:
    cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
    body = [r for r in cells[1:] if not all(re.fullmatch(r":?-+:?", c) for c in r)]
    return _table([_inline(c, src) for c in cells[0]],
                  [[_inline(c, src) for c in r] for r in body])
