"""Headless Chromium (Debian's, driven by playwright) for pages fedrad writes or serves."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"  # screenshots kept after the run (git-ignored)


@dataclass(frozen=True)
class Loaded:
    errors: list[str]  # console errors, page errors and failed requests
    images: list[tuple[str, bool, int]]  # (alt, complete, natural width)
    text: str
    status: int | None


def chromium() -> str:
    """Path of Debian's chromium; CI (FEDRAD_REQUIRE_BROWSER=1) fails without it."""
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("FEDRAD_REQUIRE_BROWSER") == "1":
            raise RuntimeError("chromium is not installed; `make test` installs it "
                               "(apt-get install chromium)")
        pytest.skip("chromium is not installed (make test installs it)")
    return path


def load(url: str, screenshot: str) -> Loaded:
    """Open `url`, wait for the page, collect errors and images, keep a screenshot."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium(),
                                         args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
        response = page.goto(url, wait_until="load")
        images = page.eval_on_selector_all(
            "img", "els => els.map(e => [e.alt, e.complete, e.naturalWidth])")
        text = page.inner_text("body")
        page.screenshot(path=str(ARTIFACTS / screenshot), full_page=True)
        browser.close()
    return Loaded(errors, [tuple(i) for i in images], text,  # type: ignore[misc]
                  response.status if response else None)
