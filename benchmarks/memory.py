"""Peak memory of a block of code, sampled by a background thread.

Two figures: resident set size (RSS, what `top` shows) and its anonymous part (Linux
``RssAnon``: heap, tensors, arrays). Memory-mapped output files count in RSS while their
pages are cached but are file-backed and reclaimable, so the anonymous figure is the RAM the
work really needs.
"""

from __future__ import annotations

import threading
import time

import psutil


def anonymous_rss() -> int:
    """Anonymous resident bytes of this process (Linux); falls back to RSS elsewhere."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process().memory_info().rss


class PeakRSS:
    """``with PeakRSS() as peak: ...`` then ``peak.increase`` (RSS) and ``peak.anonymous_increase`` (bytes)."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.process = psutil.Process()
        self.baseline = self.peak = self.anonymous_baseline = self.anonymous_peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.anonymous_peak = max(self.anonymous_peak, anonymous_rss())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.baseline = self.peak = self.process.memory_info().rss
        self.anonymous_baseline = self.anonymous_peak = anonymous_rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.anonymous_peak = max(self.anonymous_peak, anonymous_rss())

    @property
    def increase(self) -> int:
        return self.peak - self.baseline

    @property
    def anonymous_increase(self) -> int:
        return self.anonymous_peak - self.anonymous_baseline
