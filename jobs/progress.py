"""The scoring job's progress line, for logs read by people: done/total, images/s and time left.

Printed by a timer, not by completed blocks, so a log shows a line at least every ``every_s``
seconds (30 s by default) even while a slow model scores one big block, and at most that often.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

PROGRESS_EVERY_S = 30.0


def duration(seconds: float) -> str:
    """``42 s``, ``7 min``, ``2 h 05 min``: a time left, as precise as it is worth."""
    s = max(0, int(round(seconds)))
    if s < 90:
        return f"{s} s"
    if s < 90 * 60:
        return f"{round(s / 60)} min"
    return f"{s // 3600} h {round(s % 3600 / 60):02d} min"


class ScoringProgress:
    """Counts scored rows (:meth:`add`) and emits :meth:`line` every ``every_s`` seconds while open.

    ``line()``: ``scored 4096/10000 (41%), 68.2 images/s, about 1 min left``; rates are since
    :meth:`__enter__` (actor start-up included: the rate an operator plans with).
    """

    def __init__(self, total: int, emit: Callable[[str], None], every_s: float = PROGRESS_EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.emit, self.every_s, self.clock = int(total), emit, float(every_s), clock
        self.done = 0
        self.t0 = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, rows: int) -> None:
        self.done += int(rows)

    def line(self) -> str:
        elapsed = max(self.clock() - self.t0, 1e-9)
        rate = self.done / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        left = (f"about {duration((self.total - self.done) / rate)} left" if rate > 0
                else f"no block done yet after {duration(elapsed)}")
        return f"scored {self.done}/{self.total} ({pct:.0f}%), {rate:.1f} images/s, {left}"

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.emit(self.line())

    def __enter__(self) -> "ScoringProgress":
        self.t0 = self.clock()
        if self.every_s > 0:
            self._thread = threading.Thread(target=self._run, name="odin-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
