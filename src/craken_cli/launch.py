"""Build the launch command of a run: a pure function from spec to (argv, env), run in one place.

The child processes re-enter craken through a module (`-m craken_cli.train.loop RUN/run.yaml`),
so they read the very run file the configs were rendered from. No shell is involved anywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

from .render import ACCELERATE_FILE, RUN_FILE

LOOP_MODULE = "craken_cli.train.loop"
# Environment variables whose values must never be printed or written by craken.
SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "CREDENTIAL")


def is_secret(name: str) -> bool:
    upper = name.upper()
    return any(m in upper for m in SECRET_MARKERS)


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: ("***" if is_secret(k) else v) for k, v in env.items()}


def build(spec, run_dir: str | os.PathLike, base_env: Mapping[str, str], cpu_count: int,
          extra_args: Sequence[str] = (), resume_from: str | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, env) that start every process of this machine."""
    run = Path(run_dir).absolute()
    c = spec.cluster
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(run / ACCELERATE_FILE)]
    if c.max_restarts:
        argv += ["--max_restarts", str(c.max_restarts), "--monitor_interval", "1"]
    argv += list(extra_args)
    argv += ["-m", LOOP_MODULE, str(run / RUN_FILE)]

    env = dict(base_env)
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               # accelerate's and transformers' own nags that say nothing about this run
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    if c.use_cpu:
        env["DS_ACCELERATOR"] = "cpu"
        per_machine = max(1, c.num_processes // c.num_machines)
        # Share the cores between the processes instead of each grabbing all of them.
        env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count // per_machine)))
    if resume_from:
        env["CRAKEN_RESUME_FROM"] = str(resume_from)
    else:
        env.pop("CRAKEN_RESUME_FROM", None)
    return argv, env


def run(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """Start the launcher, stream its output, return its exit code; Ctrl-C reaches the children."""
    proc = subprocess.Popen(list(argv), env=dict(env))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # The children got the SIGINT too (same process group): let them checkpoint and exit.
        return proc.wait()
