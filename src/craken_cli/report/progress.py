"""Live training progress on the main process: a Rich bar on a terminal, plain lines elsewhere.

    with ProgressReporter(total_steps=200, steps_per_print=10) as progress:
        for step in range(1, 201):
            ...
            progress.update(step, {"loss": loss, "lr": lr, "tokens_per_s": tps})
        progress.log("saved checkpoint to runs/x/final")

On a terminal: a bar with steps, ETA, loss, tokens/s, MFU and memory, redrawn in place. When the
stream is not a terminal (a file, a pipe, CI), or CRAKEN_NO_PROGRESS=1 is set, nothing is redrawn:
one plain line every `steps_per_print` steps (and at the last step), with no escape sequences and
no carriage returns, so that logs stay greppable:

    step 20/200 loss 2.3456 lr 3.00e-04 tok/s 12,345 mfu 0.41 mem 35.2GiB eta 0:01:30
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable, Mapping, TextIO

NO_PROGRESS_ENV = "CRAKEN_NO_PROGRESS"

# (key in the metrics dict, label, format); the order of the plain line and of the bar's fields.
_FIELDS = (
    ("loss", "loss", "{:.4f}"),
    ("lr", "lr", "{:.2e}"),
    ("tokens_per_s", "tok/s", "{:,.0f}"),
    ("mfu", "mfu", "{:.2f}"),
    ("gpu_mem_gib", "mem", "{:.1f}GiB"),
)


def format_metrics(metrics: Mapping[str, Any], skip: tuple[str, ...] = ()) -> str:
    """`loss 2.3456 lr 3.00e-04 tok/s 12,345 mfu 0.41 mem 35.2GiB`; missing or null keys are left out."""
    parts = []
    for key, label, fmt in _FIELDS:
        value = None if key in skip else metrics.get(key)
        if value is None:
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        # A NaN loss is news the user must see, spelled the same whatever the format.
        parts.append(f"{label} {fmt.format(value) if math.isfinite(value) else str(value)}")
    return " ".join(parts)


def _clock_text(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_disabled() -> bool:
    return os.environ.get(NO_PROGRESS_ENV, "").strip().lower() not in ("", "0", "false", "no")


class ProgressReporter:
    """Progress of one training loop; create it on the main process only.

    `interactive=None` decides from the stream (a terminal, and TERM is not "dumb"); True or False
    forces it. CRAKEN_NO_PROGRESS=1 turns the bar off in every case. `clock` is for tests.
    """

    def __init__(self, total_steps: int, steps_per_print: int, stream: TextIO | None = None,
                 interactive: bool | None = None, *, clock: Callable[[], float] = time.monotonic):
        if total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}")
        self.total_steps = total_steps
        self.steps_per_print = max(1, int(steps_per_print))
        self.stream = stream if stream is not None else sys.stderr
        if interactive is None:
            interactive = _is_terminal(self.stream)
        self.interactive = bool(interactive) and not progress_disabled()
        self._clock = clock
        self._progress = None  # rich.progress.Progress, interactive mode only
        self._task = None
        self._started = False
        self._closed = False
        self._first: tuple[int, float] | None = None  # (step, time) of the first update: the ETA's origin
        self._last_printed: int | None = None
        self._stats = ""  # the bar's last numbers, kept through the steps that bring none

    # -- lifecycle

    def start(self) -> "ProgressReporter":
        if self._started:
            return self
        self._started = True
        if self.interactive:
            self._start_bar()
        return self

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._progress is not None:
            self._progress.stop()

    def __enter__(self) -> "ProgressReporter":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- reporting

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Called after every optimizer step (1-based) with whatever is known of loss, lr,
        tokens_per_s, mfu and gpu_mem_gib."""
        if self._closed:
            return
        if not self._started:
            self.start()
        metrics = metrics or {}
        now = self._clock()
        resumed_here = self._first is None
        if resumed_here:
            self._first = (step, now)
        if self._progress is not None:
            # the bar's line is short: lr goes to the log lines; a step without numbers keeps the last ones
            text = self._stats = format_metrics(metrics, skip=("lr",)) if metrics else self._stats
            if resumed_here:
                # Start the bar's speed estimate here, so a resume at step 500 is not counted as
                # 500 steps done in no time.
                self._progress.reset(self._task, completed=min(step, self.total_steps), stats=text)
            else:
                self._progress.update(self._task, completed=min(step, self.total_steps), stats=text)
            return
        if (step % self.steps_per_print == 0 or step == self.total_steps) and step != self._last_printed:
            self._last_printed = step
            line = f"step {step}/{self.total_steps}"
            text = format_metrics(metrics)
            if text:
                line += " " + text
            eta = self.eta_s(step, now)
            if eta is not None:
                line += f" eta {_clock_text(eta)}"
            self._write(line)

    def log(self, line: str) -> None:
        """A message (checkpoint saved, eval loss, ...) printed above the bar, or as a plain line."""
        if self._progress is not None and not self._closed:
            self._progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            self._write(line)

    def eta_s(self, step: int, now: float | None = None) -> float | None:
        """Seconds left at `step`, from the mean step time since the first update."""
        if self._first is None:
            return None
        first_step, first_time = self._first
        done = step - first_step
        if done <= 0:
            return None
        now = self._clock() if now is None else now
        return max(0.0, (now - first_time) / done * (self.total_steps - step))

    # -- internals

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        console = Console(file=self.stream, force_terminal=True, highlight=False)
        self._progress = Progress(
            TextColumn("step"),
            MofNCompleteColumn(),
            BarColumn(bar_width=24),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            console=console,
            transient=False,
            refresh_per_second=4,
        )
        self._task = self._progress.add_task("train", total=self.total_steps, stats="")
        self._progress.start()


def _is_terminal(stream: TextIO) -> bool:
    if os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed stream
        return False
