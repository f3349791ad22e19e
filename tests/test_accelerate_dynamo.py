"""accelerate's dynamo_config: imported as model.compile (with a note for each setting craken compiles
otherwise), and rendered back for a user's script only, in the form accelerate's own loader reads."""

from __future__ import annotations

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from craken_cli.config import importers, yamlio
from craken_cli.config.sources import Layer, build_spec
from craken_cli.launch import render

BASE = {"compute_environment": "LOCAL_MACHINE", "num_processes": 2, "mixed_precision": "bf16"}
KINDS = [{"distributed_type": "MULTI_GPU"},
         {"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 2}}]


def imported(dynamo: dict, kind: dict = KINDS[0]) -> importers.Imported:
    return importers.from_accelerate({**BASE, **kind, "dynamo_config": dynamo}, origin="acc.yaml").imported


@pytest.mark.parametrize("kind", KINDS, ids=["ddp", "deepspeed"])
def test_max_autotune_imports_as_compile_with_tuning(kind):
    out = imported({"dynamo_backend": "INDUCTOR", "dynamo_mode": "max-autotune",
                    "dynamo_use_regional_compilation": True}, kind)
    assert out.problems == []
    assert out.values["model.compile"] is True and out.values["model.compile_tuning"] is True
    [note] = out.notes
    assert note.startswith("acc.yaml: dynamo_config.dynamo_mode=max-autotune")
    assert "coordinate-descent" in note and "no GEMM autotuning, no CUDA graphs" in note


def test_no_backend_leaves_compile_to_craken():
    for dynamo in ({}, {"dynamo_backend": "NO"}):
        out = imported(dynamo)
        assert "model.compile" not in out.values and "model.compile_tuning" not in out.values
        assert out.notes == [] and out.problems == []


def test_the_old_top_level_backend_is_read_as_accelerate_reads_it():
    cfg = {**BASE, **KINDS[0], "dynamo_backend": "INDUCTOR"}
    out = importers.from_accelerate(cfg, origin="acc.yaml").imported
    assert out.values["model.compile"] is True and "model.compile_tuning" not in out.values


def test_settings_craken_does_not_compile_with_are_noted():
    out = imported({"dynamo_backend": "aot_eager", "dynamo_mode": "reduce-overhead",
                    "dynamo_use_fullgraph": True, "dynamo_use_dynamic": True})
    assert out.values["model.compile"] is True and "model.compile_tuning" not in out.values
    noted = {note.split(":")[1].strip().split("=")[0].split(" ")[0] for note in out.notes}
    assert noted == {"dynamo_config.dynamo_backend", "dynamo_config.dynamo_use_regional_compilation",
                     "dynamo_config.dynamo_mode", "dynamo_config.dynamo_use_fullgraph",
                     "dynamo_config.dynamo_use_dynamic"}
    assert any("dynamo_backend=AOT_EAGER is not used: craken compiles with inductor" in n for n in out.notes)
    assert any("reduce-overhead is not used" in n for n in out.notes)


def test_unknown_backend_or_mode_is_refused_with_the_fix():
    out = imported({"dynamo_backend": "TURBO", "dynamo_mode": "fast"})
    assert len(out.problems) == 2 and "model.compile" not in out.values
    assert "dynamo_backend 'TURBO'" in out.problems[0] and "INDUCTOR" in out.problems[0]
    assert "dynamo_mode 'fast'" in out.problems[1] and "max-autotune" in out.problems[1]


def spec_of(values: dict):
    return build_spec([Layer("file", "run.yaml", values)]).spec


@pytest.mark.parametrize("zero", [0, 2])
def test_script_launch_yaml_has_the_dynamo_config_and_train_none(zero, tmp_path):
    spec = spec_of({"model": {"compile": True, "compile_tuning": True}, "zero": {"stage": zero},
                    "cluster": {"num_processes": 2}})
    for script in (True, False):
        files = render.rendered_files(spec, {}, tmp_path, script=script)
        path = tmp_path / f"{script}.yaml"
        path.write_text(files[render.ACCELERATE_FILE])
        if spec.uses_deepspeed:
            (tmp_path / render.DS_FILE).write_text(files[render.DS_FILE])
        loaded = load_config_from_file(str(path))  # accelerate's own reading of the file
        if script:
            assert loaded.dynamo_config == {"dynamo_backend": "INDUCTOR", "dynamo_use_regional_compilation": True}
        else:
            assert loaded.dynamo_config == {}
            assert "dynamo" not in files[render.ACCELERATE_FILE]


def test_eager_and_cpu_runs_render_no_dynamo_config(tmp_path):
    for values in ({"model": {"compile": False}}, {"model": {"compile": True}, "cluster": {"use_cpu": True}}):
        accel = render.accelerate_config(spec_of(values), tmp_path / "ds.json", script=True)
        assert "dynamo_config" not in accel


def test_a_dynamo_yaml_round_trips_through_import_and_script_render(tmp_path):
    out = imported({"dynamo_backend": "INDUCTOR", "dynamo_use_regional_compilation": True})
    from craken_cli.config.sources import unflatten

    spec = spec_of({**unflatten(out.values), "cluster": {"num_processes": 2}})
    text = yamlio.dumps(render.accelerate_config(spec, tmp_path / "ds.json", script=True))
    back = importers.from_accelerate(yamlio.loads(text, origin="accelerate.yaml"), origin="accelerate.yaml")
    assert back.imported.values["model.compile"] is True and back.imported.notes == []
