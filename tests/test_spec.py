"""The run model on its own: strict types, unknown keys, derived batch numbers, cross-field rules."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from craken_cli.config.spec import STAGE3_FIELDS, BatchSection, RunSpec, cross_field_problems


def spec(**sections) -> RunSpec:
    return RunSpec.model_validate(sections)


def messages(exc: pytest.ExceptionInfo) -> str:
    return " | ".join(e["msg"] for e in exc.value.errors())


def test_defaults_are_valid_and_left_open_for_the_hardware():
    s = RunSpec()
    assert s.precision == "auto"
    assert s.cluster.num_processes is None and s.cluster.use_cpu is None
    assert s.zero.stage == 1
    assert s.offload.optimizer.device == s.offload.param.device == "none"
    with pytest.raises(RuntimeError, match="resolve"):
        _ = s.world_size


def test_every_field_has_a_description():
    from craken_cli.config.sources import field_paths

    missing = [path for path, info in field_paths().items() if not (info.description or "").strip()]
    assert not missing


@pytest.mark.parametrize("data", [
    {"zero": {"stgae": 2}},
    {"bogus": 1},
    {"offload": {"optimizer": {"devcie": "cpu"}}},
])
def test_unknown_keys_are_rejected(data):
    with pytest.raises(ValidationError) as exc:
        RunSpec.model_validate(data)
    assert {e["type"] for e in exc.value.errors()} == {"extra_forbidden"}


@pytest.mark.parametrize("data", [
    {"batch": {"micro_batch": "8"}},
    {"zero": {"overlap_comm": "yes"}},
    {"optimizer": {"lr": "3e-4"}},
    {"cluster": {"main_process_port": 29500.5}},
])
def test_types_are_strict(data):
    with pytest.raises(ValidationError):
        RunSpec.model_validate(data)


def test_integral_floats_are_sizes():
    # DeepSpeed JSONs write 5e8, which JSON reads as a float.
    s = spec(zero={"reduce_bucket_size": 5e8})
    assert s.zero.reduce_bucket_size == 500_000_000 and isinstance(s.zero.reduce_bucket_size, int)
    with pytest.raises(ValidationError):
        spec(zero={"reduce_bucket_size": 5.5})


@pytest.mark.parametrize("section,key,value", [
    ("batch", "micro_batch", 0), ("batch", "micro_batch", -1), ("batch", "grad_accum", 0),
    ("batch", "global_batch", -8), ("optimizer", "lr", 0.0), ("optimizer", "clip", -1.0),
    ("zero", "reduce_bucket_size", 0), ("cluster", "num_processes", 0), ("cluster", "main_process_port", 70000),
    ("data", "seq_len", 0), ("train", "max_steps", 0),
])
def test_sizes_must_be_positive(section, key, value):
    with pytest.raises(ValidationError):
        spec(**{section: {key: value}})


def test_betas_in_range():
    with pytest.raises(ValidationError, match="betas"):
        spec(optimizer={"betas": [0.9, 1.0]})


@pytest.mark.parametrize("batch,world,expected", [
    ({"micro_batch": 4, "grad_accum": 3}, 2, 3),
    ({"micro_batch": 4, "global_batch": 64}, 2, 8),
    ({"micro_batch": 4}, 2, 8),
])
def test_accumulation(batch, world, expected):
    assert BatchSection(**batch).accumulation(world) == expected


def test_batch_triple_is_derived_from_world_size():
    s = spec(batch={"micro_batch": 3, "grad_accum": 5}, cluster={"num_processes": 4})
    assert (s.world_size, s.grad_accum, s.train_batch_size) == (4, 5, 60)


@pytest.mark.parametrize("sections,needle", [
    ({"zero": {"stage": 2}, "offload": {"optimizer": {"device": "nvme"}}}, "--nvme-path"),
    ({"offload": {"optimizer": {"nvme_path": "/x"}}}, "--offload-optimizer nvme"),
    ({"zero": {"stage": 2}, "offload": {"param": {"device": "cpu"}}}, "--zero 3"),
    ({"zero": {"stage": 0}, "offload": {"optimizer": {"device": "cpu"}}}, "--offload-optimizer none"),
    ({"zero": {"stage": 2, "stage3_max_live_parameters": 10}}, "zero.stage3_max_live_parameters"),
    ({"zero": {"stage": 1, "gather_16bit_weights_on_save": True}}, "--zero 3"),
    ({"cluster": {"num_machines": 2, "machine_rank": 2, "main_process_ip": "10.0.0.1"}}, "--machine-rank"),
    ({"cluster": {"num_machines": 2}}, "--main-process-ip"),
    ({"cluster": {"num_processes": 3, "num_machines": 2, "main_process_ip": "h"}}, "--num-processes"),
    ({"batch": {"micro_batch": 4, "global_batch": 60}, "cluster": {"num_processes": 2}}, "--global-batch"),
    ({"batch": {"micro_batch": 4, "grad_accum": 8, "global_batch": 100}, "cluster": {"num_processes": 2}},
     "--grad-accum"),
])
def test_cross_field_rules_name_the_flag_to_change(sections, needle):
    with pytest.raises(ValidationError) as exc:
        RunSpec.model_validate(sections)
    assert needle in messages(exc)


def test_all_cross_field_problems_are_collected():
    s = RunSpec.model_construct(**spec().__dict__)
    s.zero = s.zero.model_copy(update={"stage": 2, "stage3_max_live_parameters": 1})
    s.offload = s.offload.model_copy(update={
        "param": s.offload.param.model_copy(update={"device": "cpu"})})
    s.cluster = s.cluster.model_copy(update={"machine_rank": 3})
    assert len(cross_field_problems(s)) == 3


def test_stage3_fields_are_stage3_only_at_every_lower_stage():
    for stage in (0, 1, 2):
        for key in STAGE3_FIELDS:
            with pytest.raises(ValidationError, match="only apply at ZeRO stage 3"):
                spec(zero={"stage": stage, key: 1})
    assert spec(zero={"stage": 3, **{k: 1 for k in STAGE3_FIELDS}}).zero.stage == 3


def test_json_schema_carries_the_descriptions():
    schema = RunSpec.model_json_schema()
    batch = schema["$defs"]["BatchSection"]["properties"]["micro_batch"]
    assert batch["description"] == BatchSection.model_fields["micro_batch"].description
    assert schema["additionalProperties"] is False


def test_configuration_doc_is_up_to_date():
    """docs/configuration.md is generated from the models: regenerate it with tools/gen_config_docs.py."""
    import importlib.util
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "gen_config_docs.py"
    module_spec = importlib.util.spec_from_file_location("gen_config_docs", tool)
    gen = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(gen)
    assert gen.DOC.read_text(encoding="utf-8") == gen.render_markdown(), "run: python tools/gen_config_docs.py"
    from craken_cli.config.sources import field_paths

    for path in field_paths():
        assert f"| `{path}` |" in gen.DOC.read_text(encoding="utf-8")


def test_the_stage3_help_states_the_defaults_resolve_fills():
    """STAGE3_DEFAULTS is the one place of the stage-3 defaults; the help text (unset: ...) must agree with it."""
    from craken_cli.config.spec import STAGE3_DEFAULTS, ZeroSection

    def stated(description: str):
        text = description.split("unset: ", 1)[1].split(";")[0].split(")")[0]
        if text.startswith("on"):
            return True
        return int(float(text.rstrip("kM")) * {"k": 1e3, "M": 1e6}.get(text[-1], 1))

    for key, default in STAGE3_DEFAULTS.items():
        assert stated(ZeroSection.model_fields[key].description) == default, key
