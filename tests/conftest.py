"""Shared fixtures.

`craken` runs the CLI in this process (as `craken_cli.app.main`, the console script's entry point) in
an empty working folder with no `CRAKEN_*` variables, and returns exit code, stdout and stderr.
`cpu_only` is a machine without GPUs, for pure functions that take the hardware as an argument.
`free_port` is a TCP port nobody listens on, for real multi-process launches.
A test that takes `zero_case` runs once per ZeRO stage / offload combination of `ZERO_CASES`.
"""

from __future__ import annotations

import io
import os
import socket
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "templates"


class ZeroCase(NamedTuple):
    stage: int
    offload_optimizer: str = "none"
    offload_param: str = "none"

    def flags(self) -> list[str]:
        return ["--zero", str(self.stage), "--offload-optimizer", self.offload_optimizer,
                "--offload-param", self.offload_param]


# Every ZeRO stage with and without the offloads it allows (nvme needs a disk path: see test_render).
ZERO_CASES = {
    "zero0": ZeroCase(0),
    "zero1": ZeroCase(1),
    "zero1-offload-opt": ZeroCase(1, "cpu"),
    "zero2": ZeroCase(2),
    "zero2-offload-opt": ZeroCase(2, "cpu"),
    "zero3": ZeroCase(3),
    "zero3-offload-opt": ZeroCase(3, "cpu"),
    "zero3-offload-opt-param": ZeroCase(3, "cpu", "cpu"),
}


def pytest_generate_tests(metafunc):
    if "zero_case" in metafunc.fixturenames:
        metafunc.parametrize("zero_case", list(ZERO_CASES.values()), ids=list(ZERO_CASES))


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def output(self) -> str:
        return self.out + self.err


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty current folder (no craken.yaml) and an environment without CRAKEN_* variables."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    for name in list(os.environ):
        if name.startswith("CRAKEN_"):
            monkeypatch.delenv(name)
    return folder


@pytest.fixture
def craken(workdir, monkeypatch):
    """`craken(*args, env={...})` -> CliResult; env applies to that call only."""
    from craken_cli.app import main

    def run(*args, env: dict[str, str] | None = None) -> CliResult:
        out, err = io.StringIO(), io.StringIO()
        with monkeypatch.context() as m:
            for key, value in (env or {}).items():
                m.setenv(key, value)
            with redirect_stdout(out), redirect_stderr(err):
                try:
                    main([str(a) for a in args])
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return CliResult(code, out.getvalue(), err.getvalue())

    return run


@pytest.fixture
def cpu_only():
    """A machine with no GPU (what CI has), so resolution is deterministic everywhere."""
    from craken_cli.plan.hardware import Hardware

    return Hardware(cpu_count=2)


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A local model folder written by save_pretrained: a small Llama and a locally trained tokenizer."""
    from transformers import AutoModelForCausalLM

    from craken_cli.train import builtin

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = builtin.build_tokenizer()
    cfg = builtin.model_config(tok)
    cfg.hidden_size, cfg.intermediate_size = 48, 96
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
