"""Progress on the command line: a tqdm bar with the remaining time on a terminal; elsewhere (a log file, a
pipe, CI) plain lines, one every `interval` seconds and one at the end, with no carriage returns.

`bar(desc)` is an `on_progress(done, total)` callback (disp.pipeline's); `stage_bars()` an
`on_progress(stage, done, total)` one (disp.defend's), a bar per stage."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

PLAIN_INTERVAL_S = 10.0


def remaining(seconds: float | None) -> str:
    """A duration as people read it: '45s', '3m05s', '2h07m'; '?' when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class _Plain:
    """Periodic lines for non-terminals: `scoring 12/40 (30%), 1m20s left`."""

    def __init__(self, desc: str, file: TextIO, interval: float) -> None:
        self.desc, self.file, self.interval = desc, file, interval
        self.start: tuple[float, int] | None = None
        self.last = -float("inf")

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.start is None:
            self.start = (now, done)
        if now - self.last < self.interval and 0 < done < total:
            return
        self.last = now
        t0, d0 = self.start
        rate = (done - d0) / (now - t0) if now > t0 and done > d0 else None
        left = f", {remaining((total - done) / rate)} left" if rate and done < total else ""
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        print(f"{self.desc} {done}/{total}{pct}{left}", file=self.file, flush=True)


class _Bar:
    """A tqdm bar (elapsed<remaining, rate) that closes itself when done reaches total."""

    def __init__(self, desc: str, file: TextIO) -> None:
        self.desc, self.file, self.bar = desc, file, None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, file=self.file, leave=False, dynamic_ncols=True)
        if total != self.bar.total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()


def is_terminal(file: TextIO) -> bool:
    return hasattr(file, "isatty") and file.isatty()


def bar(
    desc: str, *, file: TextIO | None = None, interval: float = PLAIN_INTERVAL_S
) -> Callable[[int, int], None]:
    """An `on_progress(done, total)` that shows `desc`'s progress on `file` (default: stderr)."""
    file = file or sys.stderr
    return _Bar(desc, file) if is_terminal(file) else _Plain(desc, file, interval)


def stage_bars(
    *, file: TextIO | None = None, interval: float = PLAIN_INTERVAL_S
) -> Callable[[str, int, int], None]:
    """An `on_progress(stage, done, total)` with one bar per stage."""
    bars: dict[str, Callable[[int, int], None]] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = bar(stage, file=file, interval=interval)
        bars[stage](done, total)

    return update
