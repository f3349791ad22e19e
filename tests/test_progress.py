"""The live progress reporter: plain, control-character-free lines off a terminal; a bar on one."""

from __future__ import annotations

import io
import re

import pytest

from craken_cli.report.progress import ProgressReporter, format_metrics


class FakeClock:
    def __init__(self, step_s: float = 0.5):
        self.now = 100.0
        self.step_s = step_s

    def __call__(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += self.step_s


def _metrics(step: int) -> dict:
    return {"loss": 10.0 / step, "lr": 3e-4, "tokens_per_s": 12345.4, "mfu": 0.4123, "gpu_mem_gib": 35.24}


def test_plain_lines_every_steps_per_print_without_control_characters(monkeypatch):
    monkeypatch.delenv("CRAKEN_NO_PROGRESS", raising=False)
    stream, clock = io.StringIO(), FakeClock()
    with ProgressReporter(total_steps=200, steps_per_print=20, stream=stream, clock=clock) as progress:
        assert progress.interactive is False  # StringIO is not a terminal
        for step in range(1, 201):
            clock.tick()
            progress.update(step, _metrics(step))
            if step == 100:
                progress.log("saved checkpoint runs/x/step-100")
    text = stream.getvalue()
    assert "\x1b" not in text and "\r" not in text
    lines = text.splitlines()
    step_lines = [line for line in lines if line.startswith("step ")]
    assert [int(re.match(r"step (\d+)/200", line).group(1)) for line in step_lines] == list(range(20, 201, 20))
    assert step_lines[0] == "step 20/200 loss 0.5000 lr 3.00e-04 tok/s 12,345 mfu 0.41 mem 35.2GiB eta 0:01:30"
    assert step_lines[-1].endswith("eta 0:00:00")
    assert lines[lines.index(step_lines[4]) + 1] == "saved checkpoint runs/x/step-100"


def test_missing_and_null_metrics_are_left_out():
    stream = io.StringIO()
    progress = ProgressReporter(total_steps=7, steps_per_print=5, stream=stream, interactive=False)
    for step in range(1, 8):
        progress.update(step, {"loss": 2.0, "mfu": None, "gpu_mem_gib": None})
    progress.close()
    progress.close()  # idempotent
    progress.update(8, {"loss": 1.0})  # after close: ignored
    lines = stream.getvalue().splitlines()
    # every 5 steps, and the last step even off the interval
    assert [line.split(" eta")[0] for line in lines] == ["step 5/7 loss 2.0000", "step 7/7 loss 2.0000"]


def test_nan_loss_is_shown():
    assert format_metrics({"loss": float("nan"), "tokens_per_s": 10}) == "loss nan tok/s 10"


def test_resume_eta_counts_from_the_first_update():
    stream, clock = io.StringIO(), FakeClock(step_s=2.0)
    with ProgressReporter(100, 10, stream=stream, interactive=False, clock=clock) as progress:
        for step in range(51, 101):  # resumed at step 51
            clock.tick()
            progress.update(step, {"loss": 1.0})
    first = stream.getvalue().splitlines()[0]
    assert first == "step 60/100 loss 1.0000 eta 0:01:20"  # 2 s a step, 40 left


def test_env_turns_the_bar_off_even_when_asked(monkeypatch):
    monkeypatch.setenv("CRAKEN_NO_PROGRESS", "1")
    stream = io.StringIO()
    with ProgressReporter(10, 5, stream=stream, interactive=True) as progress:
        for step in range(1, 11):
            progress.update(step, {"loss": 1.5})
    text = stream.getvalue()
    assert progress.interactive is False
    assert "\x1b" not in text and "\r" not in text
    assert len(text.splitlines()) == 2


def test_terminal_mode_draws_a_rich_bar(monkeypatch):
    monkeypatch.delenv("CRAKEN_NO_PROGRESS", raising=False)
    monkeypatch.setenv("COLUMNS", "160")  # Rich's width for a stream that has none
    stream = io.StringIO()
    with ProgressReporter(total_steps=50, steps_per_print=10, stream=stream, interactive=True) as progress:
        for step in range(1, 51):
            progress.update(step, _metrics(step))
        progress.log("eval loss 2.1")
    text = stream.getvalue()
    assert "\x1b" in text  # a live, redrawn display
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert "50/50" in plain
    assert "loss 0.2000" in plain and "tok/s 12,345" in plain and "mfu 0.41" in plain and "mem 35.2GiB" in plain
    assert "eval loss 2.1" in plain
    assert not re.search(r"^step \d+/50 loss", plain, re.M)  # no plain lines in bar mode


def test_rejects_nonsense_total():
    with pytest.raises(ValueError):
        ProgressReporter(0, 10, stream=io.StringIO())
