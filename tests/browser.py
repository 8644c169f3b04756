"""Headless Chromium for tests that look at a page the way an admin does.

Debian's `chromium` package, driven by Playwright's Python API (its own browser
downloads are impossible here and unnecessary: Playwright drives any recent Chromium
through the DevTools protocol). Screenshots go to `artifact_path()`, which CI keeps.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Page

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("PXEPEER_CHROMIUM", "/usr/bin/chromium"))


def artifact_path(name: str) -> Path:
    """Where a test leaves a file for people to look at after the run (screenshots).

    PXEPEER_ARTIFACTS if set, else tests/artifacts/ in the checkout (ignored by git).
    """
    root = Path(os.environ.get("PXEPEER_ARTIFACTS") or REPO / "tests" / "artifacts")
    root.mkdir(parents=True, exist_ok=True)
    return root / name


def browser_available() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return CHROMIUM.exists() or shutil.which("chromium") is not None


needs_browser = pytest.mark.skipif(
    not browser_available(), reason="needs Debian's chromium and the playwright package"
)


@contextmanager
def chromium_page(width: int = 1280, height: int = 900) -> Iterator[Page]:
    """One page in a fresh headless Chromium, closed on exit."""
    from playwright.sync_api import sync_playwright

    executable = CHROMIUM if CHROMIUM.exists() else Path(shutil.which("chromium") or "")
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(
            executable_path=str(executable), args=["--no-sandbox"], headless=True
        )
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()
