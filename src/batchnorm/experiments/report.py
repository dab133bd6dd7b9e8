"""Result files and reports: atomic JSON/CSV writes, ``report.md`` and a self-contained ``report.html``.

An experiment's numbers are written first (``metrics.json`` plus one CSV per table),
figures are drawn from those files, and the report is rendered from :class:`Section`
objects - the same content as Markdown (figures linked) and as HTML (figures embedded
as base64 PNG, so the file can be mailed or opened anywhere).

Both reports open with the **headline table** - one row per claim: the claim, our
number with its spread over seeds, the paper's number, and the verdict - followed by
the verdict rule, a contents list and one section per experiment.

Every file is written through :func:`batchnorm._io.atomic_write` (a temporary name in the
same folder, renamed into place), so an interrupted run never leaves a half-written
file that a later run would mistake for a finished one. Nothing here changes file
permissions.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .._io import atomic_write
from .protocol import VERDICT_RULE

__all__ = ["Claim", "Section", "atomic_write", "fmt", "read_json", "write_csv", "write_json", "write_report"]


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
class Claim:
    """One row of the headline table: a paper's claim, our measurement with spread, theirs, and the verdict."""

    claim: str
    ours: str
    paper: str
    verdict: str


@dataclass
class Section:
    """One experiment's part of a report.

    ``claims`` are its rows of the headline table; ``headline`` is its own table
    ``(columns, rows)``; ``protocol`` says how arms and learning rates were chosen;
    ``papers`` quotes the papers' numbers; ``findings`` are short paragraphs stating what
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
    claims: list[Claim] = field(default_factory=list)
    protocol: str = ""
    papers: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    reused: bool = False

    def prefixed(self, prefix: str) -> Section:
        """The same section with figure paths under ``prefix/`` (for a combined report)."""
        return Section(self.name, self.title, self.claim, self.setup, self.headline, self.findings,
                       [(f"{prefix}/{p}", c) for p, c in self.figures], self.claims, self.protocol, self.papers,
                       self.elapsed_s, self.reused)


def _md_cell(c) -> str:
    return fmt(c).replace("|", "\\|").replace("\n", " ")


def _md_table(columns, rows) -> str:
    lines = ["| " + " | ".join(_md_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _timing(s: Section) -> str:
    how = "reused from a complete earlier run" if s.reused else "computed in this run"
    return f"_Run time: {s.elapsed_s:.1f} s of compute ({how})._"


HEADLINE_COLUMNS = ["experiment", "claim", "ours (mean ± std over seeds)", "paper", "verdict"]


def _headline_rows(sections: Sequence[Section]):
    return [[s.name, c.claim, c.ours, c.paper, c.verdict] for s in sections for c in s.claims]


def _anchor(name: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", name.lower())


def render_markdown(title: str, preamble: Sequence[str], sections: Sequence[Section]) -> str:
    out = [f"# {title}", "", *[p + "\n" for p in preamble]]
    out += ["## Headline", "", _md_table(HEADLINE_COLUMNS, _headline_rows(sections)), "",
            f"**Verdict rule.** {VERDICT_RULE}", ""]
    out += ["## Contents", ""] + [f"- [{s.title}](#{_anchor(s.name)})" for s in sections] + [""]
    for s in sections:
        out += [f'<a id="{_anchor(s.name)}"></a>', "", f"## {s.title}", "", f"**Claim.** {s.claim}", "",
                f"**Setup.** {s.setup}", ""]
        if s.protocol:
            out += [f"**Protocol.** {s.protocol}", ""]
        if s.papers:
            out += ["**The papers' numbers.** " + " ".join(s.papers), ""]
        out += [_md_table(*s.headline), ""]
        out += [p + "\n" for p in s.findings]
        for path, caption in s.figures:
            out += [f"![{caption}]({path})", "", f"_{caption}_", ""]
        out += [_timing(s), ""]
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escape, then render the little Markdown the findings use: **bold**, `code`."""
    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


_VERDICT_CLASS = {"reproduced": "ok", "partly": "part", "not reproduced": "no"}


def _html_table(columns, rows, verdict_col: int | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for j, c in enumerate(row):
            cls = f" class='{_VERDICT_CLASS.get(str(c), '')}'" if j == verdict_col else ""
            cells.append(f"<td{cls}>{_inline(fmt(c))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(title: str, preamble: Sequence[str], sections: Sequence[Section], root: Path) -> str:
    css = ("body{font-family:sans-serif;max-width:64em;margin:2em auto;line-height:1.45;padding:0 1em}"
           "table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #bbb;padding:.25em .6em;"
           "text-align:left;vertical-align:top}th{background:#eee}img{max-width:100%}"
           "figcaption{font-style:italic;color:#444}code{background:#f3f3f3}"
           "td.ok{background:#dff0d8}td.part{background:#fcf8e3}td.no{background:#f2dede}")
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{css}</style></head><body><h1>{html.escape(title)}</h1>"]
    out += [f"<p>{_inline(p)}</p>" for p in preamble]
    out += ["<h2 id='headline'>Headline</h2>",
            _html_table(HEADLINE_COLUMNS, _headline_rows(sections), verdict_col=len(HEADLINE_COLUMNS) - 1),
            f"<p><b>Verdict rule.</b> {_inline(VERDICT_RULE.replace('**', ''))}</p>",
            "<h2 id='contents'>Contents</h2><ul>"]
    out += [f"<li><a href='#{_anchor(s.name)}'>{html.escape(s.title)}</a></li>" for s in sections]
    out.append("</ul>")
    for s in sections:
        out += [f"<h2 id='{_anchor(s.name)}'>{html.escape(s.title)}</h2>",
                f"<p><b>Claim.</b> {_inline(s.claim)}</p>", f"<p><b>Setup.</b> {_inline(s.setup)}</p>"]
        if s.protocol:
            out.append(f"<p><b>Protocol.</b> {_inline(s.protocol)}</p>")
        if s.papers:
            out.append(f"<p><b>The papers' numbers.</b> {_inline(' '.join(s.papers))}</p>")
        out.append(_html_table(*s.headline))
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
