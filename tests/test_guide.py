"""docs/guide.md cannot rot: every command it shows is run here, in guide order, in one folder.

The guide holds three kinds of blocks this test reads:

- `<!-- file: PATH -->` followed by a fenced block: the test writes that block to PATH first
  (the model config, the old DeepSpeed JSON + accelerate YAML pair, the run file, ...);
- ```console blocks: every line starting with `$ craken` or `$ make` is a command. It is split with
  shlex (no shell) and run as a subprocess; a trailing `# exit N` states the expected exit code
  (0 when absent);
- `<!-- excerpt: PATH -->` followed by a fenced block: every line of the block other than `...`
  must appear in PATH (after the commands above it ran), so rendered-file excerpts stay true.

Commands run in the order the guide shows them, in one shared temporary folder, because later ones
use what earlier ones wrote (`craken ckpt list runs/guide` needs the training above it). The guide
holds two short trainings (a few steps each on the built-in tiny model), hence `e2e`.

`GUIDE_CAPTURE=DIR` also writes each command's output to DIR/NN.txt, to refresh the guide's pasted
output after a change.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide.md"

FENCE = re.compile(r"^```")
MARKER = re.compile(r"^<!--\s*(file|excerpt):\s*(\S+)\s*-->\s*$")
EXIT = re.compile(r"\s+#\s*exit\s+(\d+)\s*$")


@dataclass
class Step:
    kind: str  # "file", "excerpt" or "command"
    line: int  # 1-based line in the guide, for messages
    path: str = ""
    text: str = ""
    argv: tuple[str, ...] = ()
    expect: int = 0


def parse(text: str) -> list[Step]:
    """The guide's steps in order: files to write, commands to run, excerpts to check."""
    lines = text.splitlines()
    steps: list[Step] = []
    i = 0
    while i < len(lines):
        marker = MARKER.match(lines[i])
        if marker:
            start = i + 1
            assert start < len(lines) and FENCE.match(lines[start]), \
                f"guide line {i + 1}: a {marker.group(1)} marker must be followed by a fenced block"
            end = next(j for j in range(start + 1, len(lines)) if FENCE.match(lines[j]))
            body = "\n".join(lines[start + 1:end]) + "\n"
            steps.append(Step(marker.group(1), i + 1, path=marker.group(2), text=body))
            i = end + 1
            continue
        if lines[i].strip() == "```console":
            j = i + 1
            while j < len(lines) and not FENCE.match(lines[j]):
                line = lines[j]
                if line.startswith("$ craken") or line.startswith("$ make"):
                    command = line[2:]
                    expect = 0
                    m = EXIT.search(command)
                    if m:
                        expect = int(m.group(1))
                        command = command[:m.start()]
                    steps.append(Step("command", j + 1, argv=tuple(shlex.split(command)), expect=expect))
                j += 1
            i = j + 1
            continue
        i += 1
    return steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def argv_for(argv: tuple[str, ...]) -> list[str]:
    """`craken ...` through this interpreter (the installed package), `make` as it is."""
    if argv[0] == "craken":
        return [sys.executable, "-m", "craken_cli", *argv[1:]]
    return list(argv)


def test_parse_reads_files_commands_and_exit_codes():
    steps = parse("\n".join([
        "<!-- file: a/b.json -->", "```json", '{"x": 1}', "```",
        "```console", "$ craken plan --gpus 8", "out", "$ craken config validate x.json   # exit 2",
        "$ make -n craken_ds2", "not a command", "```",
        "<!-- excerpt: a/b.json -->", "```json", "...", '{"x": 1}', "```",
    ]))
    assert [s.kind for s in steps] == ["file", "command", "command", "command", "excerpt"]
    assert steps[0].path == "a/b.json" and steps[0].text == '{"x": 1}\n'
    assert steps[1].argv == ("craken", "plan", "--gpus", "8") and steps[1].expect == 0
    assert steps[2].argv == ("craken", "config", "validate", "x.json") and steps[2].expect == 2
    assert steps[3].argv == ("make", "-n", "craken_ds2")


def test_guide_commands_run_as_shown(tmp_path):
    steps = parse(GUIDE.read_text())
    commands = [s for s in steps if s.kind == "command"]
    assert len(commands) >= 20, "the guide lost its commands?"
    trainings = [s for s in commands if s.argv[:2] == ("craken", "train") and "--dry-run" not in s.argv]
    assert len(trainings) <= 2, "CI budget: at most 2 real trainings in the guide"
    for s in trainings:
        assert "--max-steps" in s.argv, f"guide line {s.line}: trainings in the guide must be short"

    work = tmp_path / "guide"
    work.mkdir()
    shutil.copy(ROOT / "Makefile", work / "Makefile")  # `make` examples run in a checkout of craken
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRAKEN_")}
    env["CRAKEN_NO_PROGRESS"] = "1"
    capture = os.environ.get("GUIDE_CAPTURE")
    timings = []
    for n, step in enumerate(steps):
        if step.kind == "file":
            target = work / step.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(step.text)
            continue
        if step.kind == "excerpt":
            target = work / step.path
            assert target.is_file(), f"guide line {step.line}: {step.path} was not written"
            content = {line.strip().rstrip(",") for line in target.read_text().splitlines()}
            for line in step.text.splitlines():
                want = line.strip().rstrip(",")
                if want and want != "...":
                    assert want in content, f"guide line {step.line}: {line!r} is not in {step.path}"
            continue
        if step.argv[0] == "make" and shutil.which("make") is None:
            continue  # make is not installed here; the craken commands it wraps are tested on their own
        run_env = dict(env)
        if step.argv[:2] in (("craken", "train"), ("craken", "launch")):
            # a fresh rendezvous port, in case something else holds the default one
            run_env["CRAKEN_CLUSTER__MAIN_PROCESS_PORT"] = str(free_port())
        start = time.monotonic()
        result = subprocess.run(argv_for(step.argv), cwd=work, env=run_env, capture_output=True, text=True,
                                timeout=600)
        timings.append((time.monotonic() - start, shlex.join(step.argv)))
        if capture:
            Path(capture).mkdir(parents=True, exist_ok=True)
            (Path(capture) / f"{n:03d}.txt").write_text(
                f"$ {shlex.join(step.argv)}  (line {step.line}, exit {result.returncode})\n"
                f"--- stdout\n{result.stdout}--- stderr\n{result.stderr}")
        assert result.returncode == step.expect, (
            f"guide line {step.line}: `{shlex.join(step.argv)}` exited {result.returncode}, "
            f"the guide says {step.expect}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}")
    slowest = sorted(timings, reverse=True)[:5]
    print("slowest guide commands:", "; ".join(f"{t:.1f}s {c}" for t, c in slowest))
