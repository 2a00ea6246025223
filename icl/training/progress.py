"""Progress for long commands: rich bars on a terminal, plain periodic lines in a log.

Rich draws nothing useful when output goes to a file or a pipe, so there every task prints
one line every `interval` seconds (and when it completes):

    steps 120/500 (24%) 3.1 it/s elapsed 0:00:39 ETA 0:02:03 loss 1.234

`ICL_PROGRESS_INTERVAL` sets the interval (seconds, default 30).
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from types import TracebackType
from typing import TextIO

from rich.progress import (
    BarColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

DEFAULT_INTERVAL = 30.0


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(max(0.0, seconds))))


class Task:
    """One counted piece of work (items, steps, epochs) with an optional info text."""

    def __init__(self, owner: Progress, description: str, total: int, completed: int) -> None:
        self.owner, self.description = owner, description
        self.total, self.completed, self.info = total, completed, ""
        self._started = time.monotonic()
        self._start_count = completed
        self._last_line = self._started
        self._rich_id = (
            owner._rich.add_task(description, total=total, completed=completed, info="")
            if owner._rich is not None
            else None
        )

    def advance(self, n: int = 1, info: str | None = None) -> None:
        self.completed += n
        if info is not None:
            self.info = info
        self.owner._changed(self)

    def reset(self, total: int | None = None) -> None:
        """Start counting again (e.g. the steps of the next epoch)."""
        self.total = self.total if total is None else total
        self.completed = self._start_count = 0
        self._started = self._last_line = time.monotonic()
        if self.owner._rich is not None and self._rich_id is not None:
            self.owner._rich.reset(self._rich_id, total=self.total)

    def line(self) -> str:
        elapsed = time.monotonic() - self._started
        done = self.completed - self._start_count
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.description} {self.completed}/{self.total}"]
        if self.total:
            parts.append(f"({100 * self.completed / self.total:.0f}%)")
        parts.append(f"{rate:.2f} it/s elapsed {_clock(elapsed)}")
        if rate > 0 and self.completed < self.total:
            parts.append(f"ETA {_clock((self.total - self.completed) / rate)}")
        if self.info:
            parts.append(self.info)
        return " ".join(parts)


class Progress:
    """Tasks shown as rich bars when `stream` is a terminal, else as periodic plain lines.

    `enabled=False` shows nothing. `tty` overrides the terminal check (tests)."""

    def __init__(
        self,
        enabled: bool = True,
        *,
        stream: TextIO | None = None,
        interval: float | None = None,
        tty: bool | None = None,
    ) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        if interval is None:
            interval = float(os.environ.get("ICL_PROGRESS_INTERVAL", DEFAULT_INTERVAL))
        self.interval = interval
        is_tty = self.stream.isatty() if tty is None else tty
        self._rich: RichProgress | None = None
        if enabled and is_tty:
            self._rich = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )

    def __enter__(self) -> Progress:
        if self._rich is not None:
            self._rich.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._rich is not None:
            self._rich.__exit__(kind, exc, tb)

    def task(self, description: str, total: int, completed: int = 0) -> Task:
        return Task(self, description, total, completed)

    def log(self, message: str) -> None:
        """A one-off line (above the bars on a terminal)."""
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.console.print(message, highlight=False)
        else:
            print(message, file=self.stream, flush=True)

    def _changed(self, task: Task) -> None:
        if not self.enabled:
            return
        if self._rich is not None and task._rich_id is not None:
            self._rich.update(
                task._rich_id, completed=task.completed, total=task.total, info=task.info
            )
            return
        now = time.monotonic()
        if task.completed >= task.total or now - task._last_line >= self.interval:
            task._last_line = now
            print(task.line(), file=self.stream, flush=True)


__all__ = ["DEFAULT_INTERVAL", "Progress", "Task"]
