"""Run a coroutine to completion from synchronous test code, whatever the calling thread holds.

Playwright's sync API keeps an event loop running in the main thread while a browser is open,
and ``asyncio.run`` refuses to start inside a running loop; a worker thread has no loop, so the
coroutine gets a fresh one there.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor


def run_coroutine(coroutine):
    """The coroutine's result (or its exception), run in a fresh event loop on a worker thread."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-event-loop") as pool:
        return pool.submit(asyncio.run, coroutine).result()
