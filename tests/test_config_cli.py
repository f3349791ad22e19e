"""`craken config render|show|validate|schema` as users call them."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from craken_cli.launch import render
from craken_cli.app import LAZY_COMMANDS
from craken_cli.config.spec import RunSpec

FILES = {render.DS_FILE, render.ACCELERATE_FILE, render.RUN_FILE}


def test_render_writes_three_files(craken, workdir):
    result = craken("config", "render", "--out", "cfg")
    assert result.code == 0, result.output
    assert {p.name for p in (workdir / "cfg").iterdir()} == FILES
    assert [(workdir / p).resolve() for p in result.out.split()] == [
        workdir / "cfg" / name for name in (render.DS_FILE, render.ACCELERATE_FILE, render.RUN_FILE)]


def test_render_defaults_to_the_run_folder(craken, workdir):
    result = craken("config", "render", "--name", "exp1")
    assert result.code == 0, result.output
    assert {p.name for p in (workdir / "runs" / "exp1").iterdir()} == FILES


def test_render_never_overwrites_without_force(craken, workdir):
    assert craken("config", "render", "--out", "cfg", "--zero", "1").code == 0
    before = {p.name: p.read_text() for p in (workdir / "cfg").iterdir()}
    refused = craken("config", "render", "--out", "cfg", "--zero", "3")
    assert refused.code == 2 and "--force" in refused.err
    assert {p.name: p.read_text() for p in (workdir / "cfg").iterdir()} == before
    forced = craken("config", "render", "--out", "cfg", "--zero", "3", "--force")
    assert forced.code == 0
    assert json.loads((workdir / "cfg" / render.DS_FILE).read_text())["zero_optimization"]["stage"] == 3


def test_run_file_reloads_to_the_same_files(craken, workdir):
    assert craken("config", "render", "--out", "a", "--zero", "3", "--lr", "1e-3", "--micro-batch", "2").code == 0
    # run.yaml as a project file, nothing else: the same DeepSpeed JSON comes out
    assert craken("config", "render", "--out", "b", "--config", "a/run.yaml").code == 0
    assert (workdir / "a" / render.DS_FILE).read_text() == (workdir / "b" / render.DS_FILE).read_text()
    run_text = (workdir / "a" / render.RUN_FILE).read_text()
    assert "#   optimizer.lr: flag" in run_text and "#   zero.stage: flag" in run_text


def test_validate_accepts_rendered_pair(craken, workdir):
    assert craken("config", "render", "--out", "cfg", "--zero", "2", "--cpu", "--num-processes", "2").code == 0
    result = craken("config", "validate", "cfg/ds_config.json", "cfg/accelerate.yaml")
    assert result.code == 0, result.output
    assert result.out.startswith("ok: ")


def test_validate_craken_yaml(craken, workdir):
    (workdir / "craken.yaml").write_text("zero:\n  stage: 3\noffload:\n  param:\n    device: cpu\n")
    assert craken("config", "validate", "craken.yaml").code == 0


def test_validate_lists_every_problem(craken, workdir):
    (workdir / "ds.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "4", "gradient_accumulation_steps": 8, "bf16": {"enabled": True},
        "fp16": {"enabled": True}, "zero_optimization": {"stage": 2, "bogus": 1, "overlap_comm": "auto"}}))
    result = craken("config", "validate", "ds.json")
    assert result.code == 2
    # craken's own finding and DeepSpeed's parser's first one; "auto" is DeepSpeed's default, not a problem
    assert "(2 problems)" in result.err
    for needle in ("train_micro_batch_size_per_gpu is the string '4'", "zero_optimization.bogus = 1"):
        assert needle in result.err


def test_validate_user_pair_with_auto_batch(craken, workdir):
    """The seed's style of files: "auto" batch sizes (craken fills them) and a YAML pointing at the JSON."""
    (workdir / "ds.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": 8,
        "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    (workdir / "accelerate.yaml").write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED", "num_processes": 2,
        "deepspeed_config": {"deepspeed_config_file": "ds.json"}}))
    result = craken("config", "validate", "ds.json", "accelerate.yaml")
    assert result.code == 0, result.output


def test_schema_is_the_models(craken):
    result = craken("config", "schema")
    assert result.code == 0
    assert json.loads(result.out) == RunSpec.model_json_schema()


def test_help_texts_are_the_field_descriptions(craken):
    result = craken("config", "render", "--help", env={"COLUMNS": "200"})
    assert result.code == 0
    for flag in ("--micro-batch", "--offload-optimizer", "--main-process-port", "--set", "--force"):
        assert flag in result.out
    assert "Sequences per GPU (process) per forward pass." in " ".join(result.out.split())


def test_top_level_help_lists_the_commands(craken):
    result = craken("--help")
    assert result.code == 0
    assert "config" in result.out and "Render, show, validate" in result.out


@pytest.mark.parametrize("name", list(LAZY_COMMANDS))
def test_lazy_commands_resolve(craken, name):
    """Commands imported only when they run (app.LAZY_COMMANDS) still build and answer --help."""
    result = craken(name, "--help", env={"COLUMNS": "200"})
    assert result.code == 0, result.output
    assert f"craken {name}" in result.out


def test_no_arguments_shows_help(craken):
    result = craken("config")
    assert "render" in result.output and "validate" in result.output


def test_real_process_render(tmp_path, python):
    proc = subprocess.run([python, "-m", "craken_cli", "config", "render", "--zero", "2", "--out", "cfg"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in (tmp_path / "cfg").iterdir()} == FILES


# --- start-up: `craken --help` and `craken config render` stay light (docs/performance.md) -------------

START_UP = {"help": ["--help"], "render": ["config", "render", "--out", "cfg", "--force"]}
HEAVY = ("torch", "deepspeed", "transformers", "accelerate")
_PROBE = ("import atexit, sys\n"
          "atexit.register(lambda: print('HEAVY=' + ','.join(m for m in %r if m in sys.modules), file=sys.stderr))\n"
          "from craken_cli.app import main\n"
          "main(sys.argv[1:])\n") % (HEAVY,)


@pytest.mark.parametrize("command", list(START_UP))
def test_start_up_imports_no_heavy_library(command, tmp_path, python):
    proc = subprocess.run([python, "-c", _PROBE, *START_UP[command]], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY=\n" in proc.stderr, proc.stderr.splitlines()[-1]


# Start-up speed is a benchmark (benchmarks/startup.py -> docs/performance.md), not a timed unit test.


def test_validate_says_which_deepspeed_bf16_keys_craken_sets_itself(craken, workdir):
    (workdir / "ds.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2},
        "bf16": {"enabled": True, "check_grad_overflow": True, "immediate_grad_update": True}}))
    result = craken("config", "validate", "ds.json", "--num-processes", "2")
    assert result.code == 0, result.output
    # the file's own bf16 keys are kept as written (they were dropped), and the note says so
    assert "bf16.check_grad_overflow=True" in result.out and "bf16.immediate_grad_update=True" in result.out
    # craken's own rendered file says nothing of the kind
    assert craken("config", "render", "--out", "cfg", "--zero", "2", "--cpu", "--num-processes", "2").code == 0
    assert "note:" not in craken("config", "validate", "cfg/ds_config.json").out


def test_render_on_gpus_without_gpus_is_one_clear_error(craken, workdir):
    """`--no-cpu` on a machine without GPUs ended in a StopIteration traceback (precision auto looked for the
    first GPU without bf16), then in `num_processes = 0`."""
    result = craken("config", "render", "--no-cpu", "--out", "out", env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.code == 2, result.output
    assert "no GPU was found" in result.err and "--cpu false" in result.err and "Traceback" not in result.output
    assert not (workdir / "out").exists()
