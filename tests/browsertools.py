"""A real browser for the HTML reports: Debian's headless Chromium driven by playwright (CI installs both)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from isynth.report import SECTIONS

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# --no-sandbox: the tests may run as root. The rest keep Chromium from phoning home at start-up, whose
# refused connections would otherwise show up as noise (or failures) on machines without internet.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
IDS = [sid for sid, _ in SECTIONS]


def _chromium() -> str:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; CI installs Debian's chromium for this test")
        pytest.skip("Debian's chromium is not installed: apt-get install chromium")
    return CHROMIUM


def browser_problems(path: Path, screenshot: Path | None = None) -> list[str]:
    """Everything a reader opening `path` from disk would find broken, as one line each: console errors,
    uncaught page errors, failed requests, requests leaving the file, images that did not decode, and
    sections that are missing or hidden. Takes a full-page screenshot when asked."""
    problems: list[str] = []
    page_url = path.resolve().as_uri()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text}"))
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url[:80]} ({r.failure})"))
            page.on("request", lambda r: r.url.startswith(("data:", page_url))
                    or problems.append(f"outside request: {r.url[:80]}"))
            page.goto(page_url, wait_until="load")
            broken = page.evaluate("""() => [...document.images]
                .map((img, i) => [i, img.complete && img.naturalWidth > 0, img.alt])
                .filter(([, ok]) => !ok).map(([i, , alt]) => `image ${i} (${alt}) did not load`)""")
            problems += broken
            for sid in IDS:
                section = page.locator(f"section#{sid}")
                if section.count() != 1 or not section.is_visible() or not section.locator("h2").is_visible():
                    problems.append(f"section {sid} is missing or hidden")
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return problems
