"""Result files and reports: atomic JSON/CSV writes, ``report.md`` and a self-contained ``report.html``.

An experiment's numbers are written first (``metrics.json`` plus one CSV per table),
figures are drawn from those files, and the report is rendered from a
:class:`Section` - the same content as Markdown (figures linked) and as HTML (figures
embedded as base64 PNG, so the file can be mailed or opened anywhere).

Every file is written to a temporary name in the same folder and renamed into place
(``os.replace`` is atomic), so an interrupted run never leaves a half-written file
that a later run would mistake for a finished one.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .._io import atomic_write

__all__ = ["Section", "atomic_write", "fmt", "read_json", "write_csv", "write_json", "write_report"]


def write_json(path, obj) -> None:
    """Atomically write ``obj`` as indented JSON (NaN written as ``NaN``, which Python reads back)."""
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_csv(path, columns: Sequence[str], rows: Sequence[Sequence]) -> None:
    """Atomically write a CSV with a header row."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows(rows)
    atomic_write(path, buf.getvalue().encode())


def fmt(v, digits: int = 3) -> str:
    """Format a table cell: floats to ``digits`` significant figures, None as an em dash."""
    if v is None:
        return "—"
    if isinstance(v, float):
        if v != v:
            return "NaN"
        return f"{v:.{digits}g}"
    return str(v)


@dataclass
class Section:
    """One experiment's part of a report.

    ``headline`` is ``(columns, rows)``; ``findings`` are short paragraphs stating what
    was measured and where it differs from the paper; ``figures`` are
    ``(relative PNG path, caption)``.
    """

    name: str
    title: str
    claim: str
    setup: str
    headline: tuple[list, list]
    findings: list[str] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)
    elapsed_s: float = 0.0
    reused: bool = False

    def prefixed(self, prefix: str) -> Section:
        """The same section with figure paths under ``prefix/`` (for a combined report)."""
        return Section(self.name, self.title, self.claim, self.setup, self.headline, self.findings,
                       [(f"{prefix}/{p}", c) for p, c in self.figures], self.elapsed_s, self.reused)


def _md_table(columns, rows) -> str:
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _timing(s: Section) -> str:
    how = "reused from a complete earlier run" if s.reused else "computed in this run"
    return f"_Run time: {s.elapsed_s:.1f} s ({how})._"


def render_markdown(title: str, preamble: Sequence[str], sections: Sequence[Section]) -> str:
    out = [f"# {title}", "", *[p + "\n" for p in preamble]]
    if len(sections) > 1:
        out += ["## Headlines", ""]
        for s in sections:
            out += [f"### {s.title}", "", _md_table(*s.headline), ""]
    for s in sections:
        out += [f"## {s.title}", "", f"**Claim.** {s.claim}", "", f"**Setup.** {s.setup}", "",
                _md_table(*s.headline), ""]
        out += [p + "\n" for p in s.findings]
        for path, caption in s.figures:
            out += [f"![{caption}]({path})", "", f"_{caption}_", ""]
        out += [_timing(s), ""]
    return "\n".join(out)


def _html_table(columns, rows) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _inline(text: str) -> str:
    """Escape, then render the little Markdown the findings use: **bold**, `code`."""
    import re

    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def render_html(title: str, preamble: Sequence[str], sections: Sequence[Section], root: Path) -> str:
    css = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.45;padding:0 1em}"
           "table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #bbb;padding:.25em .6em;"
           "text-align:right}th{background:#eee}img{max-width:100%}figcaption{font-style:italic;color:#444}"
           "code{background:#f3f3f3}")
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{css}</style></head><body><h1>{html.escape(title)}</h1>"]
    out += [f"<p>{_inline(p)}</p>" for p in preamble]
    for s in sections:
        out += [f"<h2>{html.escape(s.title)}</h2>", f"<p><b>Claim.</b> {_inline(s.claim)}</p>",
                f"<p><b>Setup.</b> {_inline(s.setup)}</p>", _html_table(*s.headline)]
        out += [f"<p>{_inline(p)}</p>" for p in s.findings]
        for path, caption in s.figures:
            png = base64.b64encode((root / path).read_bytes()).decode()
            out.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{png}'>"
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        out.append(f"<p><i>{html.escape(_timing(s).strip('_'))}</i></p>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(out_dir, title: str, preamble: Sequence[str], sections: Sequence[Section]) -> tuple[Path, Path]:
    """Write ``report.md`` and the self-contained ``report.html`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    md, page = out_dir / "report.md", out_dir / "report.html"
    atomic_write(md, render_markdown(title, preamble, sections).encode())
    atomic_write(page, render_html(title, preamble, sections, out_dir).encode())
    return md, page
