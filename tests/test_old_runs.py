"""A run.yaml written by an older craken still loads, renders and means what it meant then.

tests/fixtures/run-e271467.yaml is main's run file of commit e271467 (a ZeRO-3 run with CPU offload on two
CPU processes), kept as written. A field added since must default to what the old file meant; a field
renamed or removed must still read (accelerate keeps tests/test_configs/0_11_0.yaml for the same reason).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from craken_cli.launch import render

FIXTURE = Path(__file__).parent / "fixtures" / "run-e271467.yaml"


def test_old_run_file_renders_what_it_said(craken, workdir):
    shutil.copy(FIXTURE, workdir / "old.yaml")
    result = craken("config", "render", "--config", "old.yaml", "--out", "cfg")
    assert result.code == 0, result.output
    ds = json.loads((workdir / "cfg" / render.DS_FILE).read_text())
    old = yaml.safe_load(FIXTURE.read_text())
    zero = ds["zero_optimization"]
    assert zero["stage"] == old["zero"]["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert ds["train_micro_batch_size_per_gpu"] == old["batch"]["micro_batch"]
    assert ds["gradient_accumulation_steps"] == old["batch"]["grad_accum"]
    assert ds["train_batch_size"] == 8 * 8 * old["cluster"]["num_processes"]
    assert ds["gradient_clipping"] == old["optimizer"]["clip"]
    assert ds["steps_per_print"] == old["logging"]["steps_per_print"]
    assert ds["bf16"]["enabled"] is True
    assert zero["stage3_prefetch_bucket_size"] == old["zero"]["stage3_prefetch_bucket_size"]


def test_old_run_file_shows_its_values_as_from_the_file(craken, workdir):
    shutil.copy(FIXTURE, workdir / "old.yaml")
    result = craken("config", "show", "--config", "old.yaml", "--json")
    assert result.code == 0, result.output
    shown = json.loads(result.out)
    old = yaml.safe_load(FIXTURE.read_text())
    for section in ("optimizer", "batch", "schedule"):
        for key, value in old[section].items():
            assert shown["spec"][section][key] == value, (section, key)


def test_old_run_file_validates(craken, workdir):
    shutil.copy(FIXTURE, workdir / "old.yaml")
    result = craken("config", "validate", "old.yaml")
    assert result.code == 0, result.output
