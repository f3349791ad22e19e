"""Layered sources: default < preset < project file < CRAKEN_* environment < flags, and where each
value came from (`config show --sources`)."""

from __future__ import annotations

import json

import pytest

from craken_cli.config import sources
from craken_cli.errors import CrakenError
from craken_cli.config.options import SpecArgs, layers, load_run, load_spec
from craken_cli.config.sources import FLAGS, Layer, build_spec, env_layer, flag_layer, flatten, unflatten

# A model that is not the built-in one, so only the layers under test set the batch numbers.
MODEL = "my-org/my-model"


def args(config=None, sets=(), preset=None, **flags) -> SpecArgs:
    given = {"--model": MODEL, **{f"--{k.replace('_', '-')}": v for k, v in flags.items()}}
    return SpecArgs(flags={f: given.get(f) for f in FLAGS}, config=config, sets=list(sets), preset=preset)


def test_flatten_unflatten_round_trip():
    nested = {"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}
    assert flatten(nested) == {"a.b": 1, "a.c.d": [1, 2], "e": None}
    assert unflatten(flatten(nested)) == nested


def test_every_flag_names_a_real_field():
    paths = sources.field_paths()
    assert set(FLAGS.values()) <= set(paths)
    assert len(set(FLAGS.values())) == len(FLAGS)  # one flag per field, no field set by two flags
    for flag, path in FLAGS.items():
        assert sources.flag_for(path) == flag
        assert sources.describe(path)


@pytest.mark.parametrize("top", ["default", "preset", "file", "env", "flag"])
def test_each_layer_overrides_the_ones_below(workdir, monkeypatch, top):
    """grad_accum set by every layer up to `top`: the value and its source are `top`'s."""
    order = ["default", "preset", "file", "env", "flag"]
    upto = order[: order.index(top) + 1]
    value = {"default": None, "preset": 8, "file": 4, "env": 3, "flag": 2}
    if "file" in upto:
        (workdir / "craken.yaml").write_text("batch:\n  grad_accum: 4\n")
    if "env" in upto:
        monkeypatch.setenv("CRAKEN_BATCH__GRAD_ACCUM", "3")
    a = args(preset="ds_zero1" if "preset" in upto else None, grad_accum=2 if "flag" in upto else None)
    resolved = load_spec(a)
    assert resolved.spec.batch.grad_accum == value[top]
    expected_source = {"default": "default", "preset": "preset ds_zero1_config.json",
                       "file": "file craken.yaml", "env": "env", "flag": "flag"}[top]
    assert resolved.sources["batch.grad_accum"] == expected_source


def test_layer_order(workdir, monkeypatch):
    (workdir / "craken.yaml").write_text("zero:\n  stage: 2\n")
    kinds = [layer.kind for layer in layers(args(preset="ds_zero3"), environ={})]
    assert kinds == ["default", "preset", "file", "env", "flag"]


def test_explicit_config_file_replaces_craken_yaml(workdir):
    (workdir / "craken.yaml").write_text("train:\n  max_steps: 7\n")
    (workdir / "other.yaml").write_text("train:\n  max_steps: 9\n")
    assert load_spec(args()).spec.train.max_steps == 7
    resolved = load_spec(args(config=workdir / "other.yaml"))
    assert resolved.spec.train.max_steps == 9
    assert resolved.sources["train.max_steps"].endswith("other.yaml")


def test_preset_is_below_the_project_file(workdir):
    (workdir / "craken.yaml").write_text("offload:\n  optimizer:\n    device: none\n")
    resolved = load_spec(args(preset="ds_zero2"))
    assert resolved.spec.offload.optimizer.device == "none"
    assert resolved.sources["offload.optimizer.device"] == "file craken.yaml"
    assert resolved.sources["optimizer.clip"] == "preset ds_zero2_config.json"


def test_env_values_are_read_as_yaml_scalars():
    layer = env_layer({"CRAKEN_ZERO__STAGE": "3", "CRAKEN_OPTIMIZER__LR": "3e-4", "CRAKEN_CLUSTER__USE_CPU": "true",
                       "CRAKEN_MODEL__NAME_OR_PATH": "gpt2", "PATH": "/bin", "CRAKEN_NO_PROGRESS": "1"})
    assert layer.values == {"zero": {"stage": 3}, "optimizer": {"lr": 3e-4}, "cluster": {"use_cpu": True},
                            "model": {"name_or_path": "gpt2"}}


def test_set_overrides_any_field_and_beats_typed_flags():
    layer = flag_layer({"--zero": 2, "--lr": None}, ["zero.stage=3", "zero.reduce_bucket_size=2e8"])
    assert layer.values == {"zero": {"stage": 3, "reduce_bucket_size": 2e8}}
    assert build_spec([layer]).spec.zero.reduce_bucket_size == 200_000_000


def test_nvme_path_fills_the_nvme_targets(tmp_path):
    flags = {"--zero": 3, "--offload-optimizer": "nvme", "--offload-param": "cpu"}
    resolved = build_spec([flag_layer(flags)], nvme_path=str(tmp_path))
    assert resolved.spec.offload.optimizer.nvme_path == str(tmp_path)
    assert resolved.spec.offload.param.nvme_path is None
    assert resolved.sources["offload.optimizer.nvme_path"] == "flag"


def test_all_problems_are_reported_together():
    layer = Layer("file", "craken.yaml", {"batch": {"micro_batch": 0, "grad_accum": "8"}, "zero": {"stgae": 1}})
    with pytest.raises(CrakenError) as exc:
        build_spec([layer])
    problems = exc.value.problems
    assert len(problems) == 3
    assert any("--micro-batch" in p for p in problems)
    assert any("must not be quoted" in p for p in problems)
    assert any("did you mean 'zero.stage'" in p for p in problems)


def test_detected_values_are_labelled(workdir, cpu_only):
    resolved, decisions = load_run(args(), hardware=cpu_only)
    assert resolved.sources["cluster.num_processes"] == "detected"
    assert resolved.sources["precision"] == "detected"
    assert resolved.spec.cluster.num_processes == 2 and resolved.spec.cluster.use_cpu is True
    assert "cluster.num_processes" in decisions.made


def test_config_show_sources_json(craken, workdir):
    (workdir / "craken.yaml").write_text("train:\n  max_steps: 11\nbatch:\n  micro_batch: 2\n")
    result = craken("config", "show", "--sources", "--json", "--preset", "ds_zero2", "--zero", "2", "--model", MODEL, "--lr", "1e-3",
                    env={"CRAKEN_BATCH__GRAD_ACCUM": "5"})
    assert result.code == 0, result.err
    payload = json.loads(result.out)
    spec, src = payload["spec"], payload["sources"]
    assert spec["train"]["max_steps"] == 11 and src["train.max_steps"] == "file craken.yaml"
    assert spec["batch"]["grad_accum"] == 5 and src["batch.grad_accum"] == "env"
    assert spec["optimizer"]["lr"] == 1e-3 and src["optimizer.lr"] == "flag"
    assert spec["offload"]["optimizer"]["device"] == "cpu"
    assert src["offload.optimizer.device"] == "preset ds_zero2_config.json"
    assert src["zero.stage"] == "flag"
    assert src["optimizer.eps"] == "default"
    assert src["cluster.num_processes"] == "detected"
    assert set(src) == set(flatten(spec))  # every value has a source


def test_config_show_json_without_sources(craken):
    result = craken("config", "show", "--json")
    assert result.code == 0
    assert set(json.loads(result.out)) == {"spec"}


def test_config_show_table_lists_sources(craken):
    result = craken("config", "show", "--sources", "--preset", "ds_zero3")
    assert result.code == 0
    line = next(ln for ln in result.out.splitlines() if ln.startswith("offload.param.device"))
    assert '"cpu"' in line and "preset ds_zero3_config.json" in line


def test_global_batch_above_a_preset_derives_the_accumulation(workdir, cpu_only):
    # the ZeRO preset says accumulation 8; a global batch given on the command line wins over it
    resolved, _ = load_run(args(preset="ds_zero2", global_batch=128, micro_batch=4), hardware=cpu_only)
    assert resolved.spec.batch.grad_accum == 16  # 128 / (4 x 2 processes)
    assert resolved.spec.train_batch_size == 128
    # both given by the user, and inconsistent: an error that names both flags
    with pytest.raises(CrakenError, match="--global-batch/--grad-accum"):
        load_run(args(global_batch=128, micro_batch=4, grad_accum=3), hardware=cpu_only)


def test_builtin_model_preset_is_below_the_zero_preset(workdir):
    resolved = load_spec(SpecArgs(flags={f: None for f in FLAGS}, preset="ds_zero2"))
    assert resolved.spec.model.name_or_path == "builtin:tiny"
    assert resolved.spec.batch.grad_accum == 8
    assert resolved.sources["batch.grad_accum"] == "preset ds_zero2_config.json"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_flag_sets_only_the_stage_as_set_and_the_project_file_do(workdir, stage):
    """Issue 21: `--zero N` used to load the whole ds_zeroN template (CPU offload, accumulation 8) while
    `--set zero.stage=N` and craken.yaml set only the stage: one flag, two meanings."""
    by_flag = load_spec(args(zero=stage))
    by_set = load_spec(args(sets=[f"zero.stage={stage}"]))
    (workdir / "craken.yaml").write_text(f"zero:\n  stage: {stage}\n")
    by_file = load_spec(args())
    assert by_flag.spec == by_set.spec == by_file.spec
    assert by_flag.spec.zero.stage == stage and by_flag.spec.offload.optimizer.device == "none"
    assert not any(src.startswith("preset ds_zero") for src in by_flag.sources.values())
    (workdir / "craken.yaml").unlink()
    templated = load_spec(args(preset=f"ds_zero{stage}"))
    assert templated.sources["zero.stage"] == f"preset ds_zero{stage}_config.json"
    assert templated.spec.batch.grad_accum == 8


def test_preset_flag_takes_only_the_shipped_names(craken):
    result = craken("config", "show", "--preset", "ds_zero4")
    assert result.code == 2 and "ds_zero1" in result.output and "Traceback" not in result.output


def test_a_cross_field_problem_with_a_semicolon_stays_one_problem():
    """Cross-field problems travel as a list (spec.CrossFieldProblems); they were joined with "; " and split
    again, so this one message printed as two problems."""
    from craken_cli.errors import CrakenError
    from craken_cli.config.sources import Layer, build_spec

    with pytest.raises(CrakenError) as caught:
        build_spec([Layer("file", "f", {"cluster": {"max_restarts": 1, "rdzv_backend": "static"},
                                         "zero": {"stage": 2}, "offload": {"param": {"device": "cpu"}}})])
    problems = caught.value.problems
    assert len(problems) == 2, problems
    assert any("stale addresses of its dead workers; use --rdzv-backend c10d" in p for p in problems)
