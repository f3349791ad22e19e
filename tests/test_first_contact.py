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
    assert "micro-batch 2 x accumulation 8 x 2 processes = global batch 32" in flat
    assert "64 tokens; 7 steps" in flat and "run folder runs/default" in flat
    assert "file craken.yaml: train.max_steps=7" in flat
    assert "flag: " in flat and "optimizer.lr=0.001" in flat and "zero.stage=3" in flat
    assert "preset ds_zero3_config.json: " in flat and "offload.param.device=cpu" in flat
    assert "detected: optimizer.fused=false" in flat


def test_summary_is_a_pure_function_of_the_spec(cpu_only):
    """`craken launch` prints the same lines (summary.summary_lines, no I/O)."""
    from craken_cli.config.options import SpecArgs, load_run
    from craken_cli.config.sources import FLAGS
    from craken_cli.report.summary import summary_lines

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
        assert cause in message and "(hf download gpt2)" in message  # huggingface_hub 1.x has no huggingface-cli
        assert time.monotonic() - started < 20
        assert not (workdir / "runs").exists()


def test_hub_check_passes_a_cached_or_reachable_model(workdir, cpu_only):
    from craken_cli.launch.hubcheck import hub_problems
    from craken_cli.config.options import SpecArgs, load_run
    from craken_cli.config.sources import FLAGS

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


@pytest.mark.parametrize("env, cause", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ({"HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": "1"}, "HF_DATASETS_OFFLINE is set"),
    ({"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot be reached"),
])
def test_hub_dataset_without_hub_access_is_one_line_before_launch(craken, workdir, env, cause):
    """Found in a first-contact audit: `--dataset org/d` offline passed every check, was written into a run
    folder and launched, and every worker died in load_dataset with a traceback (45 s without HF_HUB_OFFLINE)."""
    result = craken("train", "--dataset", "org/d", "--max-steps", "1", "--num-processes", "2",
                    env={"HF_HUB_CACHE": str(workdir / "hub"), **env})
    assert result.code == 2 and "Traceback" not in result.output, result.output
    message = result.err.strip()
    assert len(message.splitlines()) == 1, message
    assert message.startswith("craken: cannot start this run: --dataset org/d: not in the local hub cache and ")
    assert cause in message and "(hf download org/d --repo-type dataset)" in message
    assert list(workdir.iterdir()) == []


def test_hub_check_passes_a_data_set_in_either_cache(workdir, cpu_only, monkeypatch):
    """A data set is loadable offline from the hub cache (a download) or datasets' own (a prepared version)."""
    import datasets.config

    from craken_cli.config.options import SpecArgs, load_run
    from craken_cli.config.sources import FLAGS
    from craken_cli.launch.hubcheck import hub_problems

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", workdir / "ds-cache")
    resolved, _ = load_run(SpecArgs(flags={f: None for f in FLAGS} | {"--dataset": "org/My_Data"}), hardware=cpu_only)
    env = {"HF_HUB_CACHE": str(workdir / "hub"), "HF_HUB_OFFLINE": "1"}
    assert hub_problems(resolved.spec, env)[0].startswith("--dataset org/My_Data: ")
    assert hub_problems(resolved.spec, {**env, "HF_DATASETS_OFFLINE": "0"}, reach=lambda endpoint: None) == []
    prepared = workdir / "ds-cache" / "org___my_data" / "default" / "0.0.0" / "abc"
    prepared.mkdir(parents=True)
    (prepared / "dataset_info.json").write_text("{}")
    assert hub_problems(resolved.spec, env) == []
    snapshot = workdir / "hub" / "datasets--org--My_Data" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "train.parquet").write_text("x")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", workdir / "elsewhere")
    assert hub_problems(resolved.spec, env) == []


def test_config_render_then_train_into_the_same_folder(craken, workdir):
    """`config render` then `train` was refused: "already holds a run"."""
    assert craken("config", "render", "--max-steps", "3").code == 0
    result = craken("train", "--dry-run", "--max-steps", "3")
    assert result.code == 0, result.err


def test_a_run_that_failed_before_step_1_names_force_and_force_works(craken, workdir):
    """A run that stopped before its first checkpoint: the rerun was refused with "--resume auto", which
    refused in turn with "drop --resume": neither named --force. Each suggested command is run."""
    import json

    from craken_cli import runfolder

    run = workdir / "runs" / "default"
    assert craken("config", "render").code == 0
    runfolder.write_marker(run)
    (run / "metrics.jsonl").write_text(json.dumps({"event": "start", "strategy": "zero1"}) + "\n")
    rerun = craken("train", "--max-steps", "3")
    assert rerun.code == 2 and "--force" in rerun.err and "--resume auto" not in rerun.err, rerun.err
    resume = craken("train", "--resume", "auto", "--max-steps", "3")
    assert resume.code == 2 and "--force" in resume.err and "drop --resume" not in resume.err, resume.err
    forced = craken("train", "--force", "--dry-run", "--max-steps", "3")
    assert forced.code == 0, forced.err


def test_doctor_reads_the_cuda_of_a_cuda13_torch():
    """torch 2.14's CUDA 13 wheels declare cuda-toolkit, not nvidia-cuda-runtime: "CUDA version unknown"."""
    from craken_cli.doctor import torch_build_of

    requires = ['cuda-toolkit[cublas,cudart,cufft]==13.0.3; platform_system == "Linux"']
    assert torch_build_of("2.14.1", requires) == "13.0"
    assert torch_build_of("2.14.1+cu130", []) == "13.0"
    assert torch_build_of("2.5.1", ["nvidia-cuda-runtime-cu12==12.4.127"]) == "12.4"


def test_dry_run_prints_readable_files_and_a_command_and_works_over_a_run(craken, workdir, monkeypatch):
    """--dry-run printed the files as escaped JSON strings, had no command to copy, and was refused
    when the run folder existed."""
    import shlex

    from craken_cli import runfolder

    # the command lists what craken sets beyond this environment: an earlier test's DS_ACCELERATOR would hide it
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    run = workdir / "runs" / "default"
    run.mkdir(parents=True)
    runfolder.write_marker(run)
    (run / "metrics.jsonl").write_text("{}\n")
    result = craken("train", "--dry-run", "--max-steps", "3")
    assert result.code == 0, result.err
    assert "without --dry-run: run folder" in result.err and "--force" in result.err
    lines = result.out.splitlines()
    command = shlex.split(lines[lines.index("# the launch command (run from this folder):") + 1])
    assert command[0] == "env" and "DS_ACCELERATOR=cpu" in command and "craken_cli.train.loop" in command
    assert f"# {run.relative_to(workdir)}/ds_config.json" in lines
    assert '  "gradient_accumulation_steps": 2,' in lines and "\\n" not in result.out
    assert "  max_steps: 3" in lines  # run.yaml as YAML text


def test_the_bar_moves_every_step_and_starts_at_the_resumed_step(monkeypatch):
    """The bar moved only every steps_per_print steps, and restarted at 0/300 after a resume."""
    import io

    from craken_cli.report.progress import ProgressReporter

    monkeypatch.delenv("CRAKEN_NO_PROGRESS", raising=False)
    monkeypatch.setenv("COLUMNS", "160")
    with ProgressReporter(total_steps=300, steps_per_print=10, stream=io.StringIO(), interactive=True) as bar:
        bar.update(201)  # the first step after resuming at 200: no numbers yet
        task = bar._progress.tasks[0]
        assert task.completed == 201
        for step in range(202, 211):
            bar.update(step, {"loss": 1.5} if step == 210 else None)
            assert task.completed == step
        bar.update(211)
        assert "loss 1.5000" in task.fields["stats"]  # the numbers stay between log steps
    plain = io.StringIO()
    with ProgressReporter(total_steps=300, steps_per_print=10, stream=plain, interactive=False) as lines:
        for step in range(201, 221):
            lines.update(step, {"loss": 1.0} if step % 10 == 0 else None)
    assert [line.split()[1] for line in plain.getvalue().splitlines()] == ["210/300", "220/300"]


def test_a_word_for_a_number_is_not_called_quoted(craken, workdir):
    wrong = craken("config", "show", "--set", "train.max_steps=abc")
    assert wrong.code == 2 and "train.max_steps = 'abc'" in wrong.err and "quoted" not in wrong.err, wrong.err
    (workdir / "craken.yaml").write_text("train:\n  max_steps: '30'\n")
    quoted = craken("config", "show")
    assert quoted.code == 2 and "must not be quoted" in quoted.err, quoted.err


def test_plot_titles_carry_the_run_name(tmp_path):
    import json

    from craken_cli.report.report import _subtitle, read_metrics

    run = tmp_path / "runs" / "llama-lr3e-4"
    run.mkdir(parents=True)
    lines = [{"event": "start", "strategy": "zero2", "precision": "bf16", "device": "cpu", "num_processes": 2},
             {"step": 1, "loss": 2.0, "lr": 1e-4}, {"step": 2, "loss": 1.9, "lr": 2e-4}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert _subtitle(read_metrics(run)) == "run llama-lr3e-4: zero2, bf16, cpu x 2"


def test_known_noise_is_dropped_by_exact_message_only():
    import logging

    from craken_cli.noise import quiet_known_noise

    quiet_known_noise(cpu_processes=True)
    logger = logging.getLogger("torch.utils.cpp_extension")
    # earlier tests' libraries may have silenced this logger; what is checked here is the filter alone
    was = logger.disabled, logger.level, logging.root.manager.disable
    logger.disabled = False
    logger.setLevel(logging.WARNING)
    logging.disable(logging.NOTSET)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        logger.warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
        logger.warning("Error building extension 'cpu_adam'")
    finally:
        logger.removeHandler(handler)
        logger.disabled, _, _ = was
        logger.setLevel(was[1])
        logging.disable(was[2])
    assert seen == ["Error building extension 'cpu_adam'"]


def test_an_op_build_is_announced_before_launch(craken, workdir):
    """cpu_adam's first build is about 70 s of silence inside the workers."""
    env = {"TORCH_EXTENSIONS_DIR": str(workdir / "ext")}  # an empty JIT cache
    result = craken("train", "--dry-run", "--zero", "2", "--offload-optimizer", "cpu", env=env)
    assert result.code == 0, result.err
    assert "craken: DeepSpeed's cpu_adam op is built on first use (about 70 s" in " ".join(result.err.split())
    assert max(map(len, result.err.splitlines())) <= 80  # wrapped as the summary above it
    (workdir / "ext" / "cpu_adam").mkdir(parents=True)
    (workdir / "ext" / "cpu_adam" / "cpu_adam.so").write_bytes(b"")
    cached = craken("train", "--dry-run", "--zero", "2", "--offload-optimizer", "cpu", env=env)
    assert "cpu_adam op is built" not in cached.err
    plain = craken("train", "--dry-run", "--zero", "2", env=env)
    assert "op is built" not in plain.err


def test_rendered_files_follow_the_umask(craken, workdir):
    """Rendered configs (and every atomic write: exports, final/'s extras) were 0600: teammates on a
    shared file system could not read them."""
    old = os.umask(0o022)
    try:
        assert craken("config", "render", "--out", "cfg").code == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (workdir / "cfg").iterdir()}
    assert modes == {"ds_config.json": 0o644, "accelerate.yaml": 0o644, "run.yaml": 0o644}, modes


def test_the_report_after_a_resume_counts_every_step_and_segment(tmp_path):
    """After a resume the report said `steps 300 / 3000` and timed only the last segment."""
    import json

    from craken_cli.report.report import read_metrics, summarize, summary_rows

    run = tmp_path / "r"
    run.mkdir()
    lines = [{"event": "start", "max_steps": 4}, {"step": 2, "loss": 2.0, "time_s": 9.0},
             {"event": "end", "steps": 2, "wall_s": 10.0},
             {"event": "start", "max_steps": 4}, {"event": "resume", "step": 2}, {"step": 4, "loss": 1.5, "time_s": 4.0},
             {"event": "end", "steps": 4, "wall_s": 5.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = summarize(read_metrics(run))
    assert summary["steps"] == 4 and summary["wall_s"] == 15.0 and summary["segments"] == 2
    rows = dict(summary_rows(summary))
    assert rows["steps"] == "4 / 4" and "2 segments" in rows["wall time"]


def test_plan_table_fits_an_80_column_terminal(tmp_path):
    """At 80 columns the table cut every column (`tot…`, `sp…`); a terminal that narrow gets the totals."""
    (tmp_path / "config.json").write_text((Path(__file__).resolve().parents[1] / "benchmarks" / "model_configs" /
                                           "llama-3.2-1b.json").read_text())
    args = ("plan", "--model", str(tmp_path), "--gpus", "8", "--gpu-memory", "80GiB")
    narrow = cli(*args, env={"FORCE_COLOR": "1"})
    assert narrow.returncode == 0, narrow.stderr
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in narrow.stdout.splitlines()]
    table = lines[1:next(i for i, line in enumerate(lines) if line.startswith("choice:"))]  # prose wraps itself
    assert table and "…" not in narrow.stdout and max(map(len, table)) <= 80, narrow.stdout
    assert table[1].split() == ["strategy", "mb", "ga", "total", "CPU", "speed", "fits"]
    wide = cli(*args, env={"FORCE_COLOR": "1"}, columns=120).stdout
    assert "param" in wide and "activ" in wide
