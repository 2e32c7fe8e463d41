"""Where long work is: a progress bar with its ETA on a terminal, log lines with the ETA everywhere.

``Bar`` is used over blocks while quantizing, over windows (or offloaded blocks) while computing
perplexity and over lm-eval tasks. On a terminal it draws a tqdm bar and routes the log lines above it
(tqdm's ``logging_redirect_tqdm``); in a log file or a pipe there is no bar, only lines: one per step
when the caller logs each step (blocks), else one per quarter of the work (``quarters=True``).
``PTQ_PROGRESS=off`` turns the bar off on a terminal too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

log = logging.getLogger("ptq")


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


class Bar:
    def __init__(self, total: int, what: str, unit: str, quarters: bool = False) -> None:
        self.total, self.what, self.unit = total, what, unit
        self.quarters = quarters and total >= 4
        self.done = 0
        self.started = time.perf_counter()
        self.interactive = sys.stderr.isatty() and os.environ.get("PTQ_PROGRESS", "auto") != "off"
        self._bar = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Bar:
        if self.interactive and self.total > 1:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._stack.enter_context(logging_redirect_tqdm())
            self._bar = self._stack.enter_context(tqdm(total=self.total, desc=self.what, unit=self.unit, leave=False))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def eta(self) -> str:
        elapsed = time.perf_counter() - self.started
        left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        return f"{_seconds(elapsed)} elapsed" + (f", about {_seconds(left)} left" if self.done < self.total else "")

    def step(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        if self._bar is not None:
            self._bar.update(n)
        if self.quarters and (4 * before) // self.total != (4 * self.done) // self.total:
            log.info("%s: %d/%d %ss (%s)", self.what, self.done, self.total, self.unit, self.eta())
