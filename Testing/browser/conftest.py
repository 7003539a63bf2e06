"""Fixtures of the real-browser tests (helpers in `web_harness`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from web_harness import CHROMIUM_ARGS, chromium_path, require_browser  # noqa: E402


@pytest.fixture(scope="module")
def chromium():
    """A headless Debian chromium (Playwright sync API), shared by one test module.

    Module scope: while Playwright's sync API is open it holds a running event loop in the main
    thread, which later modules' ``asyncio.run`` must not meet."""
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()

