"""Peak resident memory of a block of code, sampled by a background thread (psutil)."""

from __future__ import annotations

import threading
import time

import psutil


class PeakRSS:
    """``with PeakRSS() as peak: ...`` then ``peak.baseline``, ``peak.peak``, ``peak.increase`` (bytes)."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.process = psutil.Process()
        self.baseline = self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.baseline = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def increase(self) -> int:
        return self.peak - self.baseline
