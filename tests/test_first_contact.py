"""Issue 21, first contact: what a new user reads before the first checkpoint. The help at 80 columns
(flag names whole, defaults shown, no Python types, user text never Rich markup), `--version`,
"did you mean", shell completion of the choices."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
HELP_PAGES = [(), ("train",), ("config", "render"), ("config", "validate"), ("plan",), ("doctor",),
              ("ckpt", "export"), ("ckpt", "list"), ("report",), ("cluster", "slurm"), ("cluster", "hostfile")]


def cli(*args: str, env: dict[str, str] | None = None, columns: int = 80) -> subprocess.CompletedProcess:
    """craken in a subprocess, as a user's terminal of `columns` columns runs it."""
    environ = {**os.environ, "PYTHONPATH": SRC, "COLUMNS": str(columns), **(env or {})}
    return subprocess.run([sys.executable, "-m", "craken_cli", *args], capture_output=True, text=True,
                          env=environ, timeout=120)


def flags_of(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", help_text))


@pytest.mark.parametrize("page", HELP_PAGES, ids=lambda p: " ".join(p) or "craken")
def test_help_at_80_columns_is_whole_and_speaks_no_python(page):
    """At 80 columns Rich's table cut flag names (`--offload-optimiz…`) and every value was typed in
    Python (`<int>`, `<list[str]>`, `<bool>` on flags, `None: ...` in the text)."""
    result = cli(*page, "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert max(map(len, text.splitlines())) <= 80, text
    assert "…" not in text
    for python in ("<int>", "<str>", "<bool>", "<float>", "<path>", "list[", "None:", "(None"):
        assert python not in text, (python, text)
    wide = cli(*page, "--help", columns=200).stdout
    assert flags_of(text) == flags_of(wide)  # every flag named whole at 80 columns


def test_train_help_shows_defaults_and_distinct_offload_help():
    text = " ".join(cli("train", "--help").stdout.split())
    for flag, default in (("--lr", "0.0003; builtin:tiny: 0.003"), ("--max-steps", "200; builtin:tiny: 100"),
                          ("--seq-len", "128; builtin:tiny: 64"), ("--micro-batch", "4; builtin:tiny: 8"),
                          ("--zero", "1")):
        after = text.split(f" {flag} ", 1)[1]
        assert f"[default: {default}]" in after.split(" --", 1)[0], (flag, after[:300])
    optimizer = text.split(" --offload-optimizer ", 1)[1].split(" --", 1)[0]
    param = text.split(" --offload-param ", 1)[1].split(" --", 1)[0]
    assert "Optimizer states" in optimizer and "Parameters" in param and optimizer != param


def test_user_text_is_never_markup(craken, workdir):
    """Rich read `[tensorboard]` in the --report-to help and `[v2]` in a data path as markup and
    dropped them: `pip install 'craken'`, `data//train.jsonl`."""
    text = " ".join(cli("train", "--help").stdout.split())
    assert "pip install 'craken[tensorboard]'" in text and "'craken[fp8]'" in text
    (workdir / "data" / "[v2]").mkdir(parents=True)
    result = craken("config", "show", "--dataset", "data/[v2]/train.jsonl", "--sources")
    assert "data/[v2]/train.jsonl" in result.out, result.out


def test_version_and_did_you_mean():
    from craken_cli import __version__

    version = cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"craken {__version__}"
    for typo, meant in ((("trian",), "'train'"), (("confg",), "'config'"), (("ckpt", "lst"), "'list'")):
        result = cli(*typo)
        assert result.returncode == 2 and f"Did you mean {meant}?" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("words, expected", [
    ("train --zero ", ["0", "1", "2", "3"]),
    ("train --precision ", ["bf16", "fp16", "fp32", "fp8", "auto"]),
    ("train --offload-optimizer ", ["none", "cpu", "nvme"]),
    ("plan --offload-param n", ["none", "nvme"]),
    ("train --preset ", ["ds_zero1", "ds_zero2", "ds_zero3"]),
])
def test_shell_completion_offers_the_choices(words, expected):
    """Completion offered file names for --zero, --precision and --offload-*."""
    argv = ["craken", *words.split()] + ([""] if words.endswith(" ") else [])
    result = cli(env={"_CRAKEN_COMPLETE": "complete_bash", "COMP_WORDS": " ".join(argv),
                      "COMP_CWORD": str(len(argv) - 1)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == expected


def test_train_says_what_is_about_to_run(craken, workdir):
    """`craken train --zero 3 --model ./my-llama` printed nothing of craken's before `eval step 0`, yet
    ran with the preset's offloads: the summary names them, the batch arithmetic and every value that
    is not a default with its source."""
    (workdir / "craken.yaml").write_text("train:\n  max_steps: 7\n")
    result = craken("train", "--dry-run", "--preset", "ds_zero3", "--zero", "3", "--lr", "1e-3", "--cpu",
                    "--num-processes", "2", "--micro-batch", "2")
    assert result.code == 0, result.err
    lines = result.err.splitlines()
    start = lines.index("craken: about to train")
    text = "\n".join(lines[start:])
    assert max(map(len, lines[start:])) <= 80
    flat = " ".join(text.split())
    assert "builtin:tiny (123.2k parameters)" in flat
    assert "DeepSpeed ZeRO-3, optimizer offload cpu, parameter offload cpu; 2 CPU processes" in flat
    assert "bf16 compute, fp32 master weights" in flat
    assert "micro-batch 2 x accumulation 8 x 2 processes = 32 sequences per step" in flat
    assert "64 tokens; 7 steps" in flat and "run folder runs/default" in flat
    assert "file craken.yaml: train.max_steps=7" in flat
    assert "flag: " in flat and "optimizer.lr=0.001" in flat and "zero.stage=3" in flat
    assert "preset ds_zero3_config.json: " in flat and "offload.param.device=cpu" in flat
    assert "detected: optimizer.fused=false" in flat


def test_summary_is_a_pure_function_of_the_spec(cpu_only):
    """`craken launch` prints the same lines (summary.summary_lines, no I/O)."""
    from craken_cli.options import SpecArgs, load_run
    from craken_cli.sources import FLAGS
    from craken_cli.summary import summary_lines

    resolved, _ = load_run(SpecArgs(flags={f: None for f in FLAGS} | {"--zero": 0, "--precision": "fp32"}),
                           hardware=cpu_only)
    lines = summary_lines(resolved.spec, resolved.sources, "runs/x", 1_500_000_000, Path("runs/x/checkpoints/s"))
    text = "\n".join(lines)
    assert "builtin:tiny (1.5B parameters)" in text and "fp32 (weights, gradients and optimizer states)" in text
    assert "DeepSpeed ZeRO-0, no offload" in text and "resume      from runs/x/checkpoints/s" in text


def test_hub_model_without_hub_access_is_one_line_before_launch(craken, workdir):
    """`--model gpt2` without hub access: 215 lines and 20 "Retrying in 8s" from every worker; now one
    line before anything is written. The machine here has no network, so the real connect fails."""
    import time

    for env, cause in (({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
                       ({"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot be reached")):
        started = time.monotonic()
        result = craken("train", "--model", "gpt2", "--max-steps", "1", env={"HF_HUB_CACHE": str(workdir / "hub"),
                                                                            **env})
        assert result.code == 2 and "Traceback" not in result.output and "Retrying" not in result.output
        message = result.err.strip()
        assert len(message.splitlines()) == 1, message
        assert message.startswith("craken: cannot start this run: --model gpt2: not in the local hub cache and ")
        assert cause in message and "huggingface-cli download gpt2" in message
        assert time.monotonic() - started < 20
        assert not (workdir / "runs").exists()


def test_hub_check_passes_a_cached_or_reachable_model(workdir, cpu_only):
    from craken_cli.hubcheck import hub_problems
    from craken_cli.options import SpecArgs, load_run
    from craken_cli.sources import FLAGS

    resolved, _ = load_run(SpecArgs(flags={f: None for f in FLAGS} | {"--model": "org/m"}), hardware=cpu_only)
    env = {"HF_HUB_CACHE": str(workdir / "hub")}
    assert hub_problems(resolved.spec, env, reach=lambda endpoint: None) == []
    assert hub_problems(resolved.spec, env, reach=lambda endpoint: "refused")[0].startswith("--model org/m: ")
    snapshot = workdir / "hub" / "models--org--m" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (workdir / "hub" / "models--org--m" / "refs").mkdir()
    (workdir / "hub" / "models--org--m" / "refs" / "main").write_text("abc")
    assert hub_problems(resolved.spec, {**env, "HF_HUB_OFFLINE": "1"}, reach=lambda endpoint: "refused") == []
