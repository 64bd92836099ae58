"""Wall-clock stopwatch for the training log and evaluation timings."""

from __future__ import annotations

import time


class Timer:
    """Wall-clock stopwatch: toc() reads, hold()/release() accumulate intervals."""

    def __init__(self) -> None:
        self.acc = 0.0
        self.t0 = time.perf_counter()

    def tic(self) -> None:
        self.t0 = time.perf_counter()

    def toc(self, restart: bool = False) -> float:
        now = time.perf_counter()
        diff = now - self.t0
        if restart:
            self.t0 = now
        return diff

    def hold(self) -> None:
        self.acc += self.toc()

    def release(self) -> float:
        acc, self.acc = self.acc, 0.0
        return acc
