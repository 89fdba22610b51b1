"""One way to write a run's ``report.html``: a single self-contained file (inline CSS, images
embedded as data URIs, no script and no link outside it) with the run's parameters, its tables,
its text and its figures, that opens in any browser and can be mailed or archived as it is.
Everything shown is escaped; the file is written whole or not at all."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._io import atomic_file

STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em auto; max-width: 72em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.05em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .4em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: .6em; white-space: pre-wrap; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #666; }
"""


@dataclass
class Table:
    title: str
    header: Sequence[str]
    rows: Sequence[Sequence[Any]]


@dataclass
class Report:
    """What a report holds, in the order it is shown."""

    title: str
    params: Mapping[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    text: list[str] = field(default_factory=list)  # preformatted lines (what the CLI printed)
    figures: list[Path] = field(default_factory=list)  # PNG files, embedded
    note: str = ""

    def html(self) -> str:
        e = html.escape
        parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
                 f"<title>{e(self.title)}</title><style>{STYLE}</style></head><body>",
                 f"<h1>{e(self.title)}</h1>"]
        if self.note:
            parts.append(f"<p class=\"note\">{e(self.note)}</p>")
        if self.params:
            parts.append("<h2>Parameters</h2><table>")
            parts += [f"<tr><th>{e(str(k))}</th><td>{e(_cell(v))}</td></tr>"
                      for k, v in self.params.items()]
            parts.append("</table>")
        for t in self.tables:
            parts.append(f"<h2>{e(t.title)}</h2><table><tr>"
                         + "".join(f"<th>{e(str(h))}</th>" for h in t.header) + "</tr>")
            for row in t.rows:
                parts.append("<tr>" + "".join(
                    f"<td class=\"num\">{e(_cell(v))}</td>" if isinstance(v, (int, float))
                    and not isinstance(v, bool) else f"<td>{e(_cell(v))}</td>" for v in row)
                    + "</tr>")
            parts.append("</table>")
        if self.text:
            parts.append("<h2>Output</h2><pre>" + e("\n".join(self.text)) + "</pre>")
        for png in self.figures:
            data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
            parts.append(f"<h2>{e(Path(png).stem)}</h2>"
                         f"<img alt=\"{e(Path(png).name)}\" src=\"data:image/png;base64,{data}\">")
        parts.append("</body></html>\n")
        return "".join(parts)

    def write(self, out: str | Path) -> Path:
        """Write ``out`` (a file path) atomically and return it."""
        with atomic_file(out) as tmp:
            tmp.write_text(self.html(), encoding="utf-8")
        return Path(out)


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str)
    return str(v)
