"""Progress of a long offline job: a rich bar with rate and ETA on a terminal, plain lines
(at most one every `every_s` seconds, and the last) when the output is a file or a pipe."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} {self.unit}/s" if speed else f"- {self.unit}/s")


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


@contextmanager
def progress_bar(
    description: str,
    total: int,
    done: int = 0,
    *,
    unit: str = "items",
    stream: TextIO | None = None,
    every_s: float = 10.0,
) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; `done` items were finished before (a resumed run)."""
    stream = stream or sys.stdout
    if stream.isatty():
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(unit),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=Console(file=stream)) as bars:
            task = bars.add_task(description, total=total, completed=done)
            yield lambda n: bars.advance(task, n)
        return
    start, last = time.monotonic(), 0.0
    count = done

    def line() -> None:
        elapsed = time.monotonic() - start
        rate = (count - done) / elapsed if elapsed > 0 else 0.0
        eta = _clock((total - count) / rate) if rate > 0 else "-"
        pct = 100.0 * count / total if total else 100.0
        print(
            f"{description}: {count}/{total} {unit} ({pct:.1f}%), {rate:.1f} {unit}/s, "
            f"elapsed {_clock(elapsed)}, ETA {eta}",
            file=stream,
            flush=True,
        )

    def advance(n: int) -> None:
        nonlocal count, last
        count += n
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            line()

    line()
    yield advance
    line()


__all__ = ["progress_bar"]
