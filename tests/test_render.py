"""Rendered files against their real consumers: DeepSpeed's own `DeepSpeedConfig` and accelerate's
`load_config_from_file`, for every ZeRO stage and offload; each value written once; no "auto"; the
shipped presets reproduced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from craken_cli.config import importers, yamlio
from craken_cli.launch import render
from craken_cli.config.dscheck import parse_deepspeed_config
from craken_cli.config.options import SpecArgs, load_run
from craken_cli.config.sources import FLAGS, Layer, build_spec

from conftest import TEMPLATES  # noqa: E402  (tests/ is on sys.path under pytest)

# Keys accelerate refuses beside a deepspeed_config_file, and the values that must live only in the JSON.
ACCELERATE_MUST_NOT_REPEAT = {"gradient_accumulation_steps", "gradient_clipping", "zero_stage",
                              "offload_optimizer_device", "offload_param_device", "mixed_precision",
                              "train_micro_batch_size_per_gpu", "train_batch_size", "bf16", "fp16"}


def render_cli(craken, out: Path, *flags: str) -> tuple[dict, dict, str]:
    result = craken("config", "render", "--out", out, "--cpu", "--num-processes", "2", *flags)
    assert result.code == 0, result.output
    ds = json.loads((out / render.DS_FILE).read_text())
    accel = yaml.safe_load((out / render.ACCELERATE_FILE).read_text())
    return ds, accel, (out / render.RUN_FILE).read_text()


def all_keys(node) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in all_keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in all_keys(v)}
    return set()


def all_values(node) -> list:
    if isinstance(node, dict):
        return [v for x in node.values() for v in all_values(x)]
    if isinstance(node, list):
        return [v for x in node for v in all_values(x)]
    return [node]


def check_consumers(out: Path, ds: dict, accel: dict, world: int):
    """Both files pass their consumers; each batch/precision value is written once and they agree."""
    parsed = parse_deepspeed_config(ds, world)
    cluster = load_config_from_file(str(out / render.ACCELERATE_FILE))
    assert cluster.distributed_type == "DEEPSPEED"
    assert Path(cluster.deepspeed_config["deepspeed_config_file"]) == (out / render.DS_FILE).absolute()
    assert cluster.num_processes == world
    assert not ACCELERATE_MUST_NOT_REPEAT & all_keys(accel)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (
        ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
    assert not [v for v in all_values(ds) + all_values(accel) if isinstance(v, str) and v.lower() == "auto"]
    return parsed


def test_zero_offload_matrix(craken, workdir, zero_case):
    out = workdir / "out"
    ds, accel, run_text = render_cli(craken, out, *zero_case.flags())
    parsed = check_consumers(out, ds, accel, world=2)
    assert parsed.zero_optimization_stage == zero_case.stage
    assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled
    if zero_case.stage >= 1:
        assert parsed.zero_config.offload_optimizer.device == zero_case.offload_optimizer
    else:
        assert "offload_optimizer" not in ds["zero_optimization"]
    if zero_case.stage == 3:
        assert parsed.zero_config.offload_param.device == zero_case.offload_param
        assert accel["deepspeed_config"]["zero3_init_flag"] is True
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    else:
        assert not [k for k in ds["zero_optimization"] if k.startswith("stage3") or k == "offload_param"]
    if zero_case.offload_optimizer != "none":
        # DeepSpeed's CPU Adam steps offloaded states; torch_adam would be refused there.
        assert "torch_adam" not in ds["optimizer"]["params"]
    # run.yaml is the resolved spec: loading it again gives the same files.
    spec = build_spec([Layer("file", "run.yaml", yamlio.loads(run_text))]).spec
    assert render.deepspeed_config(spec) == ds


@pytest.mark.parametrize("flags", [
    ["--zero", "2", "--offload-optimizer", "nvme"],
    ["--zero", "3", "--offload-optimizer", "nvme", "--offload-param", "nvme"],
    ["--zero", "3", "--offload-optimizer", "cpu", "--offload-param", "nvme"],
], ids=["zero2-nvme-opt", "zero3-nvme-all", "zero3-cpu-opt-nvme-param"])
def test_nvme_offload(craken, workdir, tmp_path, flags):
    nvme = tmp_path / "nvme"
    out = workdir / "out"
    ds, accel, _ = render_cli(craken, out, *flags, "--nvme-path", nvme)
    parsed = check_consumers(out, ds, accel, world=2)
    z = ds["zero_optimization"]
    for target in ("offload_optimizer", "offload_param"):
        if z.get(target, {}).get("device") == "nvme":
            assert z[target]["nvme_path"] == str(nvme)
            assert getattr(parsed.zero_config, target).device == "nvme"
    assert not nvme.exists()  # rendering creates nothing there


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_precision_is_written_once(craken, workdir, precision):
    out = workdir / "out"
    ds, accel, _ = render_cli(craken, out, "--precision", precision, "--zero", "2")
    parsed = check_consumers(out, ds, accel, world=2)
    assert parsed.bfloat16_config.enabled == (precision == "bf16")
    assert parsed.float16_config.enabled == (precision == "fp16")
    assert "mixed_precision" not in accel


def test_deepspeed_throughput_timer_syncs_only_when_profiling(craken, workdir):
    """DeepSpeed's throughput timer defaults to on and synchronized: two GPU syncs per micro-step."""
    ds, accel, _ = render_cli(craken, workdir / "plain", "--zero", "2")
    timers = check_consumers(workdir / "plain", ds, accel, 2).timers_config
    assert (timers.enabled, timers.synchronized) == (False, False)
    ds, accel, _ = render_cli(craken, workdir / "profiled", "--zero", "2", "--set", "logging.wall_clock_breakdown=true")
    parsed = check_consumers(workdir / "profiled", ds, accel, 2)
    assert parsed.wall_clock_breakdown and parsed.timers_config.enabled and parsed.timers_config.synchronized


@pytest.mark.parametrize("micro,accum,world", [(1, 1, 1), (3, 5, 2), (8, 2, 4)])
def test_batch_triple(craken, workdir, micro, accum, world):
    out = workdir / "out"
    result = craken("config", "render", "--out", out, "--cpu", "--num-processes", world, "--micro-batch", micro,
                    "--grad-accum", accum)
    assert result.code == 0, result.output
    ds = json.loads((out / render.DS_FILE).read_text())
    accel = yaml.safe_load((out / render.ACCELERATE_FILE).read_text())
    check_consumers(out, ds, accel, world)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        micro, accum, micro * accum * world)


def test_global_batch_derives_accumulation(craken, workdir):
    out = workdir / "out"
    ds, accel, _ = render_cli(craken, out, "--micro-batch", "4", "--global-batch", "64")
    check_consumers(out, ds, accel, world=2)
    assert ds["gradient_accumulation_steps"] == 8 and ds["train_batch_size"] == 64


def test_zero2_reproduces_the_preset(craken, workdir):
    """`craken config render --preset ds_zero2`: bf16, accumulation 8, clipping 0.3, optimizer CPU offload,
    steps_per_print 10, wall_clock_breakdown false, in the JSON that accelerate.yaml points at."""
    out = workdir / "out"
    result = craken("config", "render", "--preset", "ds_zero2", "--out", out)
    assert result.code == 0, result.output
    ds = json.loads((out / render.DS_FILE).read_text())
    cluster = load_config_from_file(str(out / render.ACCELERATE_FILE))
    assert Path(cluster.deepspeed_config["deepspeed_config_file"]) == (out / render.DS_FILE).absolute()
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": False} and ds["fp16"] == {"enabled": False}
    assert ds["gradient_accumulation_steps"] == 8
    assert ds["gradient_clipping"] == 0.3
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert ds["steps_per_print"] == 10
    assert ds["wall_clock_breakdown"] is False
    parse_deepspeed_config(ds, cluster.num_processes)


def subset_mismatches(expected, actual, path="") -> list[str]:
    """Where `actual` differs from `expected` (a preset), ignoring the "auto" craken fills."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: {actual!r} is not a mapping"]
        return [m for k, v in expected.items() for m in subset_mismatches(v, actual.get(k), f"{path}.{k}")]
    if expected == "auto":
        return [] if isinstance(actual, int) else [f"{path}: auto was not filled ({actual!r})"]
    return [] if expected == actual else [f"{path}: preset {expected!r}, rendered {actual!r}"]


SHIPPED = sorted(p.name for p in TEMPLATES.iterdir() if p.suffix in (".json", ".yaml"))


def test_presets_are_all_known():
    assert {name for name in SHIPPED if name.endswith(".json")} == set(importers.PRESETS.values())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_preset(name, craken, workdir, cpu_only):
    path = TEMPLATES / name
    data = yamlio.read_mapping(path)
    if name in importers.PRESETS.values():
        stage = next(s for s, n in importers.PRESETS.items() if n == name)
        imported = importers.from_deepspeed(data, origin=name)
        assert imported.problems == []
        assert importers.preset_path(stage).read_bytes() == path.read_bytes()
        flags = {f: None for f in FLAGS} | {"--model": "my-org/model"}
        resolved, _ = load_run(SpecArgs(flags=flags, preset=f"ds_zero{stage}"), hardware=cpu_only)
        ds = render.deepspeed_config(resolved.spec)
        assert subset_mismatches(data, ds) == []
        parse_deepspeed_config(ds, resolved.spec.world_size)
        # the preset file itself, as a user's existing DeepSpeed JSON
        result = craken("config", "validate", path)
        assert result.code == 0, result.output
    else:
        # a spec preset (run-file format)
        spec = build_spec([Layer("preset", name, data)]).spec
        assert spec.model_dump(exclude_unset=False)


def test_restarts_reach_torchrun_with_c10d_and_a_fresh_store(workdir, cpu_only):
    """accelerate ignores `rdzv_backend` in its YAML (the flag's default wins), torch shares one store
    across restarts unless told not to, and one machine's c10d would meet at localhost:29400."""
    from craken_cli.launch import command as launch

    flags = {f: None for f in FLAGS} | {"--max-restarts": 1, "--main-process-port": 29612}
    resolved, _ = load_run(SpecArgs(flags=flags), hardware=cpu_only)
    argv, env = launch.build(resolved.spec, "run", {}, cpu_count=2)
    assert argv[argv.index("--rdzv_backend") + 1] == "c10d"
    assert argv.index("--rdzv_backend") < argv.index("-m", argv.index("--config_file"))
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert env["PET_RDZV_ENDPOINT"] == "127.0.0.1:29612"

    plain, _ = load_run(SpecArgs(flags={f: None for f in FLAGS}), hardware=cpu_only)
    argv, env = launch.build(plain.spec, "run", {}, cpu_count=2)
    assert "--rdzv_backend" not in argv and "PET_RDZV_ENDPOINT" not in env


@pytest.mark.parametrize("world,flags,fp32", [
    (1, [], True),  # one process: DeepSpeed's BF16 optimizer, measured faster
    (2, [], False),  # several: its fp32 all-reduce was never measured on GPUs, so the ZeRO optimizer
    (2, ["--set", "zero.fp32_grad_accum=true"], True),
    (1, ["--set", "zero.fp32_grad_accum=false"], False),
    (1, ["--offload-optimizer", "cpu"], False),  # DeepSpeed keeps its ZeRO optimizer with offload
])
def test_zero1_accumulates_in_fp32_with_one_process(craken, workdir, world, flags, fp32):
    out = workdir / "out"
    result = craken("config", "render", "--out", out, "--cpu", "--num-processes", world, "--zero", "1", *flags)
    assert result.code == 0, result.output
    ds = json.loads((out / render.DS_FILE).read_text())
    parsed = check_consumers(out, ds, yaml.safe_load((out / render.ACCELERATE_FILE).read_text()), world)
    assert parsed.grad_accum_dtype == ("fp32" if fp32 else None)
    assert ("data_types" in ds) is fp32


def test_fp32_grad_accum_elsewhere_is_refused_and_writes_nothing(craken, workdir):
    out = workdir / "out"
    result = craken("config", "render", "--out", out, "--cpu", "--zero", "2", "--set", "zero.fp32_grad_accum=true")
    assert result.code == 2 and "zero.fp32_grad_accum needs ZeRO-1" in result.output and "--zero 1" in result.output
    assert not out.exists()


def test_imported_grad_accum_dtype_round_trips():
    # a whole file (DeepSpeed refuses one without a batch size), read as DeepSpeed reads it
    zero1 = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}
    values = importers.from_deepspeed({**zero1, "data_types": {"grad_accum_dtype": "fp32"}}).values
    assert (values["zero.stage"], values["zero.fp32_grad_accum"]) == (1, True)
    assert importers.from_deepspeed({**zero1, "data_types": {"grad_accum_dtype": "bf16"}}).values[
        "zero.fp32_grad_accum"] is False
    # left out, DeepSpeed accumulates in the weights' dtype: off, not craken's one-process default
    assert importers.from_deepspeed(zero1).values["zero.fp32_grad_accum"] is False
    # fp32 at another stage: a working hand-kept JSON stays valid, and the note says what craken renders
    zero2 = importers.from_deepspeed({**zero1, "zero_optimization": {"stage": 2},
                                      "data_types": {"grad_accum_dtype": "fp32"}})
    assert "zero.fp32_grad_accum" not in zero2.values and not zero2.problems
    assert any("data_types.grad_accum_dtype=fp32 is not imported" in note and "--zero 1" in note
               for note in zero2.notes)
    # DeepSpeed's own spellings are its dtypes; what its engine cannot read is refused
    assert importers.from_deepspeed({**zero1, "data_types": {"grad_accum_dtype": "float"}}).values[
        "zero.fp32_grad_accum"] is True
    problems = importers.from_deepspeed({**zero1, "data_types": {"grad_accum_dtype": "double"}}).problems
    assert problems and "grad_accum_dtype='double'" in problems[0] and "fp32, bf16 or fp16" in problems[0]


def test_deepspeed_bf16_overflow_check_only_where_deepspeed_must_skip(craken, workdir):
    """Its amax/amin of every gradient and host sync cost ZeRO-2 4% on one H200; craken's loop checks the
    loss and gradient norm itself, so DeepSpeed's check stays only for on_nonfinite=skip."""
    ds, accel, _ = render_cli(craken, workdir / "stop", "--zero", "2")
    assert check_consumers(workdir / "stop", ds, accel, 2).bfloat16_config.check_grad_overflow is False
    ds, accel, _ = render_cli(craken, workdir / "skip", "--zero", "2", "--set", "train.on_nonfinite=skip")
    assert check_consumers(workdir / "skip", ds, accel, 2).bfloat16_config.check_grad_overflow is True
