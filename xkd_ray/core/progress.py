"""Progress of long steps (teacher epochs, explanation batches, student epochs), visible everywhere.

A rich bar alone is not enough: it is drawn only on a terminal, and a transient one leaves nothing
behind, so a 17-minute ``xkd teacher`` under ``nohup``, a pipe or ``ray job logs`` printed nothing.
``track`` therefore draws the bar on a terminal and otherwise prints one plain, flushed line to
stdout (what Ray jobs and workers forward) at the first update, every ``interval_s`` seconds, and at
the end::

    teacher epochs: 3/20 (15%) elapsed 0:00:42 rate 0.07/s eta 0:04:03 loss=0.41

``XKD_PROGRESS_INTERVAL`` (seconds) sets the default interval; it is read once, at import.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from datetime import timedelta
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

INTERVAL_ENV = "XKD_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0


def interval_from_env(environ: Mapping[str, str]) -> float:
    """The plain-line interval ``environ`` asks for; a bad value warns and falls back to the
    default rather than failing a long run over a logging setting."""
    text = environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also rejects nan
        warnings.warn(f"{INTERVAL_ENV}={text!r}: not seconds >= 0; using {DEFAULT_INTERVAL_S}", stacklevel=2)
        return DEFAULT_INTERVAL_S
    return value


INTERVAL_S = interval_from_env(os.environ)


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def _field(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def progress_line(description: str, done: int, total: int, elapsed: float, fields: Mapping[str, object]) -> str:
    """One self-contained log line: readable alone, since log viewers show lines out of context."""
    percent = f" ({100 * done // total}%)" if total > 0 else ""
    rate = done / elapsed if elapsed > 0 else None
    rate_text = "?" if rate is None else f"{rate:.3g}/s" if rate < 100 else f"{rate:.0f}/s"  # never 1.2e+04
    eta_text = _duration((total - done) / rate) if rate else ("0:00:00" if done >= total else "?")
    extras = "".join(f" {key}={_field(value)}" for key, value in fields.items())
    timing = f"elapsed {_duration(elapsed)} rate {rate_text} eta {eta_text}"
    return f"{description}: {done}/{total}{percent} {timing}{extras}"


class track:
    """Progress of one step of ``total`` units: a transient rich bar on a terminal, plain lines
    otherwise, nothing when ``enabled`` is false (the callers' ``progress`` flags).

    ``live`` forces the choice (default: whether ``stream``, stdout by default, is a terminal) and
    ``clock`` is the time source; both exist so the plain path can be tested without a terminal
    or sleeping. Lower-case, like ``contextlib.suppress``: it reads as ``with track(...) as bar``.
    """

    def __init__(
        self,
        description: str,
        total: int,
        enabled: bool = True,
        *,
        interval_s: float | None = None,
        stream: TextIO | None = None,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.description = description
        self.total = total
        self.enabled = enabled
        self.interval_s = INTERVAL_S if interval_s is None else interval_s
        self.stream = sys.stdout if stream is None else stream
        self.clock = clock
        self.done = 0
        self.fields: dict[str, object] = {}
        self._started = self._last_line = 0.0
        self._printed: int | None = None  # ``done`` at the last plain line
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        console = Console(file=self.stream)
        if enabled and (console.is_terminal if live is None else live):
            columns = (*Progress.get_default_columns(), MofNCompleteColumn(), TimeElapsedColumn())
            self._bar = Progress(*columns, TextColumn("{task.fields[info]}"), console=console, transient=True)

    def __enter__(self) -> track:
        self._started = self.clock()
        if self._bar is not None:
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, info="")
        return self

    def advance(self, n: int = 1, **fields: object) -> None:
        """Count ``n`` more units done; ``fields`` (e.g. loss=0.41) replace the shown ones."""
        if not self.enabled:
            return
        self.done += n
        self.fields.update(fields)
        if self._bar is not None and self._task is not None:
            info = " ".join(f"{key}={_field(value)}" for key, value in self.fields.items())
            self._bar.update(self._task, advance=n, info=info)
            return
        now = self.clock()
        if self._printed is None or self.done >= self.total or now - self._last_line >= self.interval_s:
            self._print(now)

    def _print(self, now: float) -> None:
        line = progress_line(self.description, self.done, self.total, now - self._started, self.fields)
        print(line, file=self.stream, flush=True)
        self._printed, self._last_line = self.done, now

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        """Stop the bar; in plain mode, print the last state unless it is already the last line
        (so a step that stops early, or fails, still says how far it got)."""
        if self._bar is not None:
            self._bar.stop()
        elif self.enabled and self._printed != self.done:
            self._print(self.clock())
