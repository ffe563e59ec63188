"""The HTML report of a compare run or a sweep: one self-contained file that opens from disk, with no server
and no network, on any machine, years later. Every image is embedded as base64, the style sheet is inline,
there is no script, and a Content-Security-Policy forbids the browser to fetch anything that is not embedded,
so a report cannot silently depend on a file or a site that later disappears. The document always has the
same sections, each with "none" when empty, so reports can be compared side by side and checked by machine.
"""
from __future__ import annotations

import base64
import datetime
import html
import json
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from isynth.errors import IsynthError
from isynth.files import atomic_write_text

# (section id, heading), in the order they appear; the ids are the anchors of the table of contents
SECTIONS = (
    ("summary", "Summary"),
    ("tables", "Tables"),
    ("figures", "Figures"),
    ("fits", "Fits"),
    ("samples", "Samples"),
    ("commands", "Commands"),
    ("configs", "Configs"),
    ("environment", "Environment"),
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Only embedded images and the inline style sheet may load: anything else is blocked (and reported in the
# browser's console), so a reference to a file or a site cannot slip in unnoticed.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
SHEET = """
body { font: 15px/1.5 system-ui, sans-serif; color: #222; background: #fff; max-width: 1100px;
       margin: 1.5em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.8em; }
nav a { margin-right: .8em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-weight: bold; padding: .3em 0; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
thead th { background: #e6e9ee; }
tbody tr:nth-child(even) { background: #f4f5f7; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; height: auto; }
figcaption { color: #555; margin-top: .3em; }
.grids { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 1em; }
.grids figure { margin: 0; }
.grids img { width: 100%; image-rendering: pixelated; }
pre { background: #f4f5f7; padding: .6em .8em; overflow-x: auto; margin: .4em 0; }
details { margin: .4em 0; }
summary { cursor: pointer; font-weight: bold; }
.none { color: #777; font-style: italic; }
"""

Table = tuple[str, list[str], list[list[str]]]


@dataclass(frozen=True)
class ReportData:
    """What one report shows; built by the command that owns the data (compare, sweep), rendered here.

    Table cells arrive formatted (e.g. "31.2 ± 2.1 [28.1, 34.3]") because the precision of a number is the
    caller's knowledge; images arrive as PNG files written by matplotlib or the sampler."""
    title: str
    summary: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, Path]] = field(default_factory=list)
    grids: list[tuple[str, Path]] = field(default_factory=list)
    fits: list[Table] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    configs: dict[str, dict] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    """/proc/cpuinfo's model name, because platform.processor() says only "x86_64" on Linux."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment() -> dict[str, str]:
    """The software versions and the machine, so that a timing or a metric in a report can be traced to
    what produced it."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "scipy": _version("scipy"),
        "matplotlib": _version("matplotlib"),
        "isynth": _version("isynth"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _image(path: Path, alt: str) -> str:
    """An <img> with the PNG embedded, so the report needs no file beside it."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise IsynthError(f"{path}: cannot read the report's image ({e.strerror or type(e).__name__})") from None
    if not data.startswith(PNG_SIGNATURE):
        raise IsynthError(f"{path}: the report's image is not a PNG file")
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}" alt="{_e(alt)}">'


def _table(caption: str, header: list[str], rows: list[list[str]]) -> str:
    """One table; a row with the wrong number of cells is the caller's bug and would shift every column
    after it, so it raises rather than rendering a misleading table."""
    for i, row in enumerate(rows):
        if header and len(row) != len(header):
            raise ValueError(f"table {caption!r}: row {i} has {len(row)} cells for {len(header)} columns")
    head = "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    return f'<div class="scroll"><table>{cap}{head}<tbody>{body}</tbody></table></div>'


def _figure(caption: str, path: Path) -> str:
    return f"<figure>{_image(path, caption)}<figcaption>{_e(caption)}</figcaption></figure>"


def _bodies(data: ReportData) -> dict[str, list[str]]:
    """Each section's items as HTML fragments; an empty list becomes "none" in render."""
    configs = [f"<details><summary>{_e(name)}</summary><pre>{_e(json.dumps(cfg, indent=2, default=str))}</pre>"
               "</details>" for name, cfg in data.configs.items()]
    env = [_table("", ["key", "value"], [[k, v] for k, v in data.environment.items()])]
    grids = [f'<div class="grids">{"".join(_figure(label, p) for label, p in data.grids)}</div>']
    return {
        "summary": [f"<p>{_e(p)}</p>" for p in data.summary],
        "tables": [_table(*t) for t in data.tables],
        "figures": [_figure(c, p) for c, p in data.figures],
        "fits": [_table(*t) for t in data.fits],
        "samples": grids if data.grids else [],
        "commands": [f"<pre><code>{_e(c)}</code></pre>" for c in data.commands],
        "configs": configs,
        "environment": env if data.environment else [],
    }


def render(data: ReportData) -> str:
    """The report as one HTML5 document. Every text is escaped, and every character outside ASCII is written
    as a character reference, so the file reads the same whatever encoding a tool assumes."""
    bodies = _bodies(data)
    nav = "".join(f'<a href="#{sid}">{heading}</a>' for sid, heading in SECTIONS)
    sections = []
    for sid, heading in SECTIONS:
        items = bodies[sid] or ['<p class="none">none</p>']
        sections.append(f'<section id="{sid}">\n<h2>{heading}</h2>\n' + "\n".join(items) + "\n</section>")
    page = "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',  # no favicon request: the page loads nothing it does not embed
        f"<title>{_e(data.title)}</title>",
        f"<style>{SHEET}</style>",
        "</head>",
        "<body>",
        f"<h1>{_e(data.title)}</h1>",
        f"<nav>{nav}</nav>",
        *sections,
        "</body>",
        "</html>",
        "",
    ])
    return page.encode("ascii", "xmlcharrefreplace").decode("ascii")


def write_report(path: Path, data: ReportData) -> Path:
    """Render and write the report atomically, so a killed run never leaves half a page; returns the path."""
    path = Path(path)
    atomic_write_text(path, render(data))
    return path
