"""Read DeepSpeed JSONs and accelerate YAMLs into partial run specs.

The presets in templates/ are DeepSpeed JSONs read through here, so they are data and never a
second source of truth. `craken config validate` uses the same code on a user's existing files
and reports every problem at once: unknown keys, "auto" nothing fills, numbers written as
strings, bf16 and fp16 both on, files that disagree with each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import CrakenError
from .spec import fp32_grad_accum_possible

PRESETS = {1: "ds_zero1_config.json", 2: "ds_zero2_config.json", 3: "ds_zero3_config.json"}

# DeepSpeed key -> spec path, for keys whose value maps one to one.
_TOP = {
    "train_micro_batch_size_per_gpu": "batch.micro_batch",
    "gradient_accumulation_steps": "batch.grad_accum",
    "train_batch_size": "batch.global_batch",
    "gradient_clipping": "optimizer.clip",
    "steps_per_print": "logging.steps_per_print",
    "wall_clock_breakdown": "logging.wall_clock_breakdown",
}
_ZERO = {
    "stage": "zero.stage",
    "overlap_comm": "zero.overlap_comm",
    "contiguous_gradients": "zero.contiguous_gradients",
    "reduce_bucket_size": "zero.reduce_bucket_size",
    "allgather_bucket_size": "zero.allgather_bucket_size",
    "stage3_prefetch_bucket_size": "zero.stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold": "zero.stage3_param_persistence_threshold",
    "stage3_max_live_parameters": "zero.stage3_max_live_parameters",
    "stage3_max_reuse_distance": "zero.stage3_max_reuse_distance",
    "stage3_gather_16bit_weights_on_model_save": "zero.gather_16bit_weights_on_save",
}
# Keys DeepSpeed knows that craken sets itself or leaves at DeepSpeed's default: accepted, not imported.
_ZERO_IGNORED = {"reduce_scatter", "allgather_partitions", "round_robin_gradients", "sub_group_size",
                 "load_from_fp32_weights", "elastic_checkpoint", "ignore_unused_parameters"}
_OFFLOAD = {"device", "nvme_path", "pin_memory", "buffer_count", "buffer_size", "max_in_cpu", "fast_init",
            "pipeline_read", "pipeline_write", "ratio"}
_OPT_PARAMS = {"lr": "optimizer.lr", "betas": "optimizer.betas", "eps": "optimizer.eps",
               "weight_decay": "optimizer.weight_decay"}
_SCHEDULERS = {"WarmupCosineLR": "cosine", "WarmupDecayLR": "linear", "WarmupLR": "constant"}
# "auto" that accelerate fills by itself when it prepares the model and data loader.
_AUTO_FILLED_BY_CRAKEN = set(_TOP) | {"zero_optimization.reduce_bucket_size",
                                      "zero_optimization.stage3_prefetch_bucket_size",
                                      "zero_optimization.stage3_param_persistence_threshold"}
_KNOWN_TOP = set(_TOP) | {"bf16", "fp16", "zero_optimization", "optimizer", "scheduler", "zero_allow_untested_optimizer",
                          "prescale_gradients", "gradient_predivide_factor", "communication_data_type", "seed",
                          "zero_force_ds_cpu_optimizer", "checkpoint", "data_types",
                          "timers"}  # rendered from logging.wall_clock_breakdown


@dataclass
class Imported:
    values: dict = field(default_factory=dict)  # dotted spec path -> value
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def template_path(name: str) -> Path:
    """A shipped template file (inside the wheel, or the checkout's templates/)."""
    packaged = resources.files("craken_cli").joinpath("templates", name)
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "templates" / name


def preset_path(stage: int) -> Path:
    """The shipped preset file for a ZeRO stage."""
    return template_path(PRESETS[stage])


def preset_values(stage: int) -> dict:
    """Nested partial spec for `--zero N`. A broken shipped preset is a bug, reported as such."""
    from . import yamlio
    from .sources import unflatten

    imported = from_deepspeed(yamlio.read_mapping(preset_path(stage)), origin=PRESETS[stage])
    if imported.problems:
        raise CrakenError(imported.problems, title=f"shipped preset {PRESETS[stage]} is broken")
    return unflatten(imported.values)


def _is_number_string(v: Any) -> bool:
    if not isinstance(v, str):
        return False
    try:
        float(v)
    except ValueError:
        return v.strip().lower() in ("true", "false")
    return True


def from_deepspeed(cfg: dict, origin: str = "ds_config.json") -> Imported:
    out = Imported()

    def take(key_path: str, value: Any, spec_path: str) -> None:
        if value == "auto":
            if key_path not in _AUTO_FILLED_BY_CRAKEN:
                out.problems.append(f"{origin}: {key_path} is \"auto\" but nothing fills it outside the HF "
                                    "Trainer, and DeepSpeed will crash on it: write a number")
            return
        if _is_number_string(value):
            out.problems.append(f"{origin}: {key_path} is the string {value!r}: write it without quotes")
            return
        out.values[spec_path] = value

    for key, value in cfg.items():
        if key in _TOP:
            take(key, value, _TOP[key])
        elif key not in _KNOWN_TOP:
            out.problems.append(f"{origin}: unknown key '{key}': remove it (craken and DeepSpeed do not use it)")

    enabled = {}
    for prec in ("bf16", "fp16"):
        section = cfg.get(prec)
        if section is None:
            continue
        if not isinstance(section, dict):
            out.problems.append(f"{origin}: {prec} must be a mapping like {{\"enabled\": true}}")
            continue
        flag = section.get("enabled", False)
        if _is_number_string(flag) or flag == "auto":
            out.problems.append(f"{origin}: {prec}.enabled is {flag!r}: write true or false")
            continue
        enabled[prec] = bool(flag)
    bf16 = cfg.get("bf16") if isinstance(cfg.get("bf16"), dict) else {}
    if bf16.get("check_grad_overflow") is True:
        out.notes.append(f"{origin}: bf16.check_grad_overflow is not imported: craken renders it off (its loop "
                         "checks the loss and gradient norm before every checkpoint, 4% faster ZeRO-2) and on only "
                         "with --set train.on_nonfinite=skip, where DeepSpeed must drop non-finite steps")
    if bf16.get("immediate_grad_update") is True:
        out.notes.append(f"{origin}: bf16.immediate_grad_update is not imported: it saved no time on one H200 "
                         "(docs/performance.md), and craken leaves it at DeepSpeed's default (off)")
    if enabled.get("bf16") and enabled.get("fp16"):
        out.problems.append(f"{origin}: bf16.enabled and fp16.enabled are both true: keep one")
    elif enabled.get("bf16"):
        out.values["precision"] = "bf16"
    elif enabled.get("fp16"):
        out.values["precision"] = "fp16"
    elif enabled:
        out.values["precision"] = "fp32"

    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        out.problems.append(f"{origin}: zero_optimization must be a mapping")
        zero = {}
    for key, value in zero.items():
        kp = f"zero_optimization.{key}"
        if key in _ZERO:
            take(kp, value, _ZERO[key])
        elif key in ("offload_optimizer", "offload_param"):
            target = key.removeprefix("offload_")
            if not isinstance(value, dict):
                out.problems.append(f"{origin}: {kp} must be a mapping like {{\"device\": \"cpu\"}}")
                continue
            for sub, v in value.items():
                if sub not in _OFFLOAD:
                    out.problems.append(f"{origin}: unknown key '{kp}.{sub}': use one of device, nvme_path, pin_memory")
                elif sub in ("device", "nvme_path", "pin_memory"):
                    take(f"{kp}.{sub}", v, f"offload.{target}.{sub}")
        elif key not in _ZERO_IGNORED:
            out.problems.append(f"{origin}: unknown key '{kp}': remove it")

    data_types = cfg.get("data_types")
    accum = data_types.get("grad_accum_dtype") if isinstance(data_types, dict) else None
    if accum is not None and accum not in ("fp32", "bf16", "fp16"):
        out.problems.append(f"{origin}: data_types.grad_accum_dtype {accum!r}: use fp32, bf16 or fp16")
    elif accum == "fp32" and not fp32_grad_accum_possible(out.values.get("zero.stage"), "bf16",
                                                          out.values.get("offload.optimizer.device", "none")):
        # DeepSpeed would accumulate in fp32 there too, through a path craken has not measured: not refused
        # (a working hand-kept JSON stays valid), not imported, and said so.
        out.notes.append(f"{origin}: data_types.grad_accum_dtype fp32 is not imported: craken accumulates in fp32 "
                         "only with ZeRO-1 and no optimizer offload (DeepSpeed's BF16 optimizer); this run's "
                         "gradients accumulate in 16 bits")
    elif accum is not None:
        out.values["zero.fp32_grad_accum"] = accum == "fp32"

    opt = cfg.get("optimizer")
    if isinstance(opt, dict):
        if str(opt.get("type", "")).lower() not in ("adamw", "adam"):
            out.problems.append(f"{origin}: optimizer.type {opt.get('type')!r}: craken trains with AdamW; "
                                "set \"type\": \"AdamW\"")
        for k, v in (opt.get("params") or {}).items():
            if k in _OPT_PARAMS:
                take(f"optimizer.params.{k}", v, _OPT_PARAMS[k])
            elif k == "torch_adam":
                out.values["optimizer.fused"] = not bool(v)
    sched = cfg.get("scheduler")
    if isinstance(sched, dict):
        kind = _SCHEDULERS.get(sched.get("type"))
        if kind is None:
            out.problems.append(f"{origin}: scheduler.type {sched.get('type')!r}: use one of {', '.join(_SCHEDULERS)}")
        else:
            out.values["schedule.kind"] = kind
            params = sched.get("params") or {}
            if "warmup_num_steps" in params:
                take("scheduler.params.warmup_num_steps", params["warmup_num_steps"], "schedule.warmup_steps")
            if "total_num_steps" in params:
                take("scheduler.params.total_num_steps", params["total_num_steps"], "train.max_steps")
            if "cos_min_ratio" in params:
                take("scheduler.params.cos_min_ratio", params["cos_min_ratio"], "schedule.min_lr_ratio")
    return out


# accelerate YAML keys that mirror a spec field.
_ACCEL_TOP = {"num_processes": "cluster.num_processes", "num_machines": "cluster.num_machines",
              "machine_rank": "cluster.machine_rank", "main_process_ip": "cluster.main_process_ip",
              "main_process_port": "cluster.main_process_port", "rdzv_backend": "cluster.rdzv_backend",
              "use_cpu": "cluster.use_cpu"}
# accelerate YAML keys that accelerate refuses beside a deepspeed_config_file.
_ACCEL_DS_DUPLICATES = {"gradient_accumulation_steps": "batch.grad_accum", "gradient_clipping": "optimizer.clip",
                        "zero_stage": "zero.stage", "offload_optimizer_device": "offload.optimizer.device",
                        "offload_param_device": "offload.param.device"}
_ACCEL_KNOWN = set(_ACCEL_TOP) | {"compute_environment", "debug", "distributed_type", "deepspeed_config",
                                  "downcast_bf16", "enable_cpu_affinity", "gpu_ids", "mixed_precision",
                                  "same_network", "tpu_env", "tpu_use_cluster", "tpu_use_sudo", "dynamo_config",
                                  # written by `accelerate config`, meaningless for a DeepSpeed run: accepted
                                  "main_training_function", "tpu_name", "tpu_zone", "tpu_vm", "command_file",
                                  "commands", "fsdp_config", "megatron_lm_config", "mpirun_config", "fp8_config",
                                  "parallelism_config", "ipex_config"}
_MP = {"bf16": "bf16", "fp16": "fp16", "no": "fp32", "fp8": None}


def from_accelerate(cfg: dict, origin: str = "accelerate.yaml") -> tuple[Imported, str | None]:
    """Partial spec from an accelerate YAML, and the deepspeed_config_file it names (if any)."""
    out = Imported()
    for key, value in cfg.items():
        if key in _ACCEL_TOP:
            if _is_number_string(value) and key != "main_process_ip":
                out.problems.append(f"{origin}: {key} is the string {value!r}: write it without quotes")
            elif value is not None:
                out.values[_ACCEL_TOP[key]] = value
        elif key not in _ACCEL_KNOWN:
            out.problems.append(f"{origin}: unknown key '{key}': remove it (accelerate does not read it)")
    if cfg.get("distributed_type") not in (None, "DEEPSPEED"):
        out.problems.append(f"{origin}: distributed_type is {cfg.get('distributed_type')!r}: set DEEPSPEED")
    ds = cfg.get("deepspeed_config") or {}
    ds_file = ds.get("deepspeed_config_file") if isinstance(ds, dict) else None
    mp = cfg.get("mixed_precision")
    if mp is not None:
        if mp not in _MP:
            out.problems.append(f"{origin}: mixed_precision {mp!r}: use no, bf16 or fp16")
        elif ds_file:
            out.problems.append(f"{origin}: mixed_precision beside deepspeed_config_file is refused by accelerate: "
                                "remove it and keep bf16/fp16 in the DeepSpeed JSON")
        elif _MP[mp]:
            out.values["precision"] = _MP[mp]
    for key, path in _ACCEL_DS_DUPLICATES.items():
        if key in ds:
            if ds_file:
                out.problems.append(f"{origin}: deepspeed_config.{key} beside deepspeed_config_file is refused by "
                                    "accelerate: remove it and keep the value in the DeepSpeed JSON")
            else:
                out.values[path] = ds[key]
    return out, ds_file
