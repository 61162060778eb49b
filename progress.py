"""Progress people expect: a header stating the configuration, then a bar with the count done of
the total, the rate, the time left and the run's current figures (accuracy, loss, bytes).

On a terminal the bar is drawn by `rich <https://rich.readthedocs.io>`_ (it redraws in place and
keeps other output above it); when the stream is not a terminal (CI logs, a pipe, a file) the
same information comes as one plain line every few seconds, plus a last line at the end, so logs
stay readable. ``quiet`` prints nothing. Used by ``seedswarm sim`` (through ``sim/runlog.py``),
``seedswarm cluster`` and the benchmarks.
"""

from __future__ import annotations

import math
import sys
import time
from types import TracebackType
from typing import Any, TextIO

__all__ = ["Progress", "duration", "human_bytes"]


def human_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def duration(seconds: float) -> str:
    """``75.2`` -> ``1m15s``; ``3700`` -> ``1h01m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _field(key: str, value: Any) -> str:
    if key == "bytes":
        return f"bytes {human_bytes(float(value))}"
    if isinstance(value, float):
        return f"{key} {value:.3f}"
    return f"{key} {value}"


class Progress:
    """Progress of ``total`` units (rounds, runs, cells) on ``stream`` (default stderr).

    ``update(done, acc=..., loss=..., bytes=...)`` sets the count done and the figures shown
    after the bar (a None figure is left out); ``note(text)`` prints a line above the bar. Use it
    as a context manager, or call :meth:`close`.
    """

    def __init__(self, total: int, *, unit: str = "round", header: str | None = None,
                 stream: TextIO | None = None, quiet: bool = False, every: float = 5.0,
                 interactive: bool | None = None) -> None:
        self.total = max(1, int(total))
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.every = every
        self.done = 0
        self.fields: dict[str, Any] = {}
        self._t0 = time.monotonic()
        self._first: tuple[float, int] | None = None  # (time, done) of the first update: setup excluded
        self._printed_at = -math.inf
        self._dirty = False  # plain mode: an update not printed yet
        self._finished_at: float | None = None
        self._rich: Any = None
        self._task: Any = None
        if quiet:
            return
        from rich.console import Console

        console = Console(file=self.stream, force_terminal=True if interactive else None, highlight=False)
        if interactive is None:
            interactive = console.is_terminal and not console.is_dumb_terminal
        if header:
            console.print(header, markup=False, soft_wrap=True) if interactive else self._say(header)
        if interactive:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                # other writes to stderr (warnings, notes of other code) go above the bar;
                # stdout is data (the summary JSON) and is never touched
                console=console, redirect_stdout=False, redirect_stderr=self.stream is sys.stderr,
            )
            self._rich.start()
            self._task = self._rich.add_task(f"{unit}s", total=self.total, rate="", info="")

    # ---- figures

    def rate(self) -> float | None:
        """Units per second since the first update (set-up time before it is not counted)."""
        if self._first is None:
            return None
        t, d = self._first
        dt = (self._finished_at or time.monotonic()) - t  # a finished count's rate stays put
        return (self.done - d) / dt if dt > 0 and self.done > d else None

    def eta(self) -> float | None:
        r = self.rate()
        return None if r is None else max(0, self.total - self.done) / r

    def _rate_text(self) -> str:
        r = self.rate()
        if r is None:
            return ""
        return f"{r:.1f} {self.unit}s/s" if r >= 1 else f"{1 / r:.1f} s/{self.unit}"

    def info(self) -> str:
        return "  ".join(_field(k, v) for k, v in self.fields.items() if v is not None)

    def line(self) -> str:
        """The plain progress line (also what a test can read)."""
        pct = 100 * self.done / self.total
        parts = [f"{self.unit} {self.done}/{self.total} ({pct:.0f}%)"]
        if (rate := self._rate_text()):
            parts.append(rate)
        parts.append(f"elapsed {duration(time.monotonic() - self._t0)}")
        if (eta := self.eta()) is not None and self.done < self.total:
            parts.append(f"eta {duration(eta)}")
        if (info := self.info()):
            parts.append(info)
        return "  ".join(parts)

    # ---- output

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def update(self, done: int, **fields: Any) -> None:
        self.done = min(int(done), self.total)
        self.fields.update(fields)
        if self.done >= self.total and self._finished_at is None:
            self._finished_at = time.monotonic()
        if self._first is None:
            self._first = (time.monotonic(), self.done)
        if self.quiet:
            return
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done, rate=self._rate_text(), info=self.info())
            return
        self._dirty = True
        now = time.monotonic()
        if now - self._printed_at >= self.every:
            self._printed_at, self._dirty = now, False
            self._say(self.line())

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.update(self.done + n, **fields)

    def note(self, text: str) -> None:
        """A line above the bar (or among the plain lines): an event worth reading."""
        if self.quiet:
            return
        if self._rich is not None:
            self._rich.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            self._say(text)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done, rate=self._rate_text(), info=self.info())
            self._rich.stop()
            self._rich = None
        elif not self.quiet and self._dirty:
            self._dirty = False
            self._say(self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
