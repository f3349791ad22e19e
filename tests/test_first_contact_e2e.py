"""Issue 21 point 4, end to end: a command craken suggests is a command that works. A refused resume
suggested `craken ckpt export RUN/checkpoints/step_N --out DIR`; here it is run as printed."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
SRC = str(Path(__file__).resolve().parents[1] / "src")


def craken(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CRAKEN_")}, "PYTHONPATH": SRC,
           "CRAKEN_NO_PROGRESS": "1", "CRAKEN_CLUSTER__MAIN_PROCESS_PORT": str(port)}
    return subprocess.run([sys.executable, "-m", "craken_cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_export_a_refused_resume_suggests_runs(tmp_path):
    common = ["--name", "s", "--max-steps", "2", "--save-every", "2", "--eval-every", "0", "--steps-per-print", "1"]
    first = craken("train", *common, "--seq-len", "32", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    for noise in ("Attempting to get learning rate from scheduler before it has started", "No CUDA runtime is found",
                  "Failed to load", "is an Enum subclass"):  # the last two: torchao's import, where it is installed
        assert noise not in first.stdout + first.stderr  # issue 21 point 7: once per process before
    refused = craken("train", *common, "--seq-len", "16", "--resume", "auto", cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    suggested = re.search(r"\((craken ckpt export [^)]*?--out DIR)", refused.stderr)
    assert suggested, refused.stderr
    argv = shlex.split(suggested.group(1).replace("DIR", "exported"))
    export = craken(*argv[1:], cwd=tmp_path)
    assert export.returncode == 0, export.stderr[-3000:]
    assert (tmp_path / "exported" / "config.json").is_file()
    then = re.search(r"then (--model DIR)", refused.stderr)
    assert then, refused.stderr
    reused = craken("train", "--dry-run", "--name", "t", "--model", "exported", "--seq-len", "16", cwd=tmp_path)
    assert reused.returncode == 0, reused.stderr[-3000:]
