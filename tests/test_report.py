"""The HTML report: escaping, a fixed set of sections, images embedded rather than referenced, and a real
browser (Debian's headless Chromium through playwright) that opens the file from disk with no server and
finds nothing broken: no console or page error, no failed or outside request, every image decoded, every
section visible. Negative controls prove the browser checks can fail."""
from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from browsertools import IDS, browser_problems
from matplotlib.figure import Figure
from PIL import Image

from isynth.errors import IsynthError
from isynth.report import SECTIONS, ReportData, environment, render, write_report


def _figure_png(path: Path) -> Path:
    fig = Figure(figsize=(4, 3), dpi=80)
    ax = fig.subplots()
    x = np.linspace(1, 10, 20)
    ax.plot(x, 30 / x, marker="o", label="fd")
    ax.set_xscale("log")
    ax.legend()
    fig.savefig(path)
    return path


def _grid_png(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((64, 96, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _data(tmp_path: Path, **changes) -> ReportData:
    fields = dict(
        title="isynth compare (digits, cpu, 6e12 FLOPs)",
        summary=["mar has the lowest FD at this budget.", "ar is 3.1x faster to sample."],
        tables=[("FD per paradigm", ["paradigm", "FD"], [["ar", "31.2 ± 2.1 [28.1, 34.3]"], ["mar", "25.0 ± 1.0"]])],
        figures=[("FD against training FLOPs", _figure_png(tmp_path / "fig.png"))],
        grids=[("ar, 16 samples", _grid_png(tmp_path / "grid.png"))],
        fits=[("slope of log FD on log FLOPs", ["paradigm", "slope"], [["ar", "-0.41 [-0.52, -0.30]"]])],
        commands=["isynth compare --out runs/c --train-flops 6e12"],
        configs={"ar": {"model": {"width": 64, "depth": 4}, "train": {"lr": 0.001}}},
        environment={"python": "3.11.7", "cpu": "test CPU"},
    )
    fields.update(changes)
    return ReportData(**fields)


class _Sections(HTMLParser):
    """The ids of the <section> elements and the text of their <h2>, in document order."""

    def __init__(self):
        super().__init__()
        self.ids, self.headings, self._in_h2 = [], [], False

    def handle_starttag(self, tag, attrs):
        if tag == "section":
            self.ids.append(dict(attrs).get("id"))
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data)
            self._in_h2 = False


def test_text_is_escaped(tmp_path):
    evil = "<script>alert(1)</script>"
    data = _data(tmp_path, title=evil, summary=[evil], tables=[(evil, [evil], [[evil]])],
                 figures=[(evil, tmp_path / "fig.png")], commands=[evil], configs={evil: {"k": evil}},
                 environment={evil: evil})
    out = render(data)
    assert "<script" not in out
    assert "&lt;script&gt;" in out
    assert 'alt="&lt;script&gt;alert(1)&lt;/script&gt;"' in out


def test_every_section_is_there_even_when_empty():
    out = render(ReportData(title="empty"))
    parser = _Sections()
    parser.feed(out)
    assert parser.ids == IDS
    assert parser.headings == [heading for _, heading in SECTIONS]
    assert out.count('<p class="none">none</p>') == len(SECTIONS)
    assert out.startswith("<!DOCTYPE html>")


def test_images_are_embedded_and_nothing_is_referenced(tmp_path):
    data = _data(tmp_path)
    out = render(data)
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', out)
    assert [base64.b64decode(b) for b in embedded] == [p.read_bytes() for _, p in [*data.figures, *data.grids]]
    for outside in ('src="/', 'src="http', "http:", "https:", "file:", "url(", "<script"):
        assert outside not in out, outside
    assert out.isascii() and "&#177;" in out  # ± as a character reference: the file is the same in any encoding


def test_a_missing_or_foreign_image_is_one_clear_error(tmp_path):
    with pytest.raises(IsynthError, match="nowhere.png") as e:
        render(_data(tmp_path, grids=[("cell", tmp_path / "nowhere.png")]))
    assert "\n" not in str(e.value)
    (tmp_path / "fake.png").write_text("not an image")
    with pytest.raises(IsynthError, match="fake.png.*not a PNG"):
        render(_data(tmp_path, figures=[("fig", tmp_path / "fake.png")]))


def test_write_report_is_atomic_and_returns_the_path(tmp_path):
    data = _data(tmp_path)
    path = write_report(tmp_path / "out" / "report.html", data)
    assert path == tmp_path / "out" / "report.html"
    assert path.read_text() == render(data)
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]


def test_environment_names_the_software_and_the_machine():
    env = environment()
    assert {"python", "torch", "numpy", "scipy", "matplotlib", "isynth", "platform", "cpu", "cpu_count",
            "torch_threads", "cuda", "date"} <= env.keys()
    assert all(isinstance(v, str) and v for v in env.values())


def test_the_report_opens_cleanly_in_a_browser(tmp_path):
    path = write_report(tmp_path / "report.html", _data(tmp_path))
    shot = tmp_path / "report.png"
    assert browser_problems(path, shot) == []
    assert shot.stat().st_size > 10_000
    with Image.open(shot) as img:
        assert img.format == "PNG"
        assert img.height > 1000  # full page: every section, not just the first screen
        assert img.convert("RGB").getcolors(maxcolors=64) is None  # far more than one colour: text and images


def test_the_browser_checks_catch_a_broken_page(tmp_path):
    """The same report with an image corrupted, an image pointing at a missing file, and a script (refused
    by the policy, or run without it and failing): each must be reported, so that an empty list from
    browser_problems means something."""
    good = render(_data(tmp_path))
    first = re.search(r"data:image/png;base64,[A-Za-z0-9+/=]+", good).group(0)
    bad = tmp_path / "bad.html"
    bad.write_text(good.replace(first, "data:image/png;base64,iVBORw0KGgo!!!notbase64", 1))
    assert any("did not load" in p for p in browser_problems(bad))
    bad.write_text(good.replace(first, "missing.png", 1))
    problems = browser_problems(bad)
    assert any("did not load" in p for p in problems)
    assert any("missing.png" in p for p in problems)  # blocked by the report's policy, and reported
    script = "<script>undefined_call()</script></body>"
    bad.write_text(good.replace("</body>", script))
    assert any("console error" in p for p in browser_problems(bad))  # the report's policy refuses inline scripts
    bad.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", good).replace("</body>", script))
    assert any("page error" in p and "undefined_call" in p for p in browser_problems(bad))
