"""Render a resolved spec into the files its consumers read.

`deepspeed_config` and `accelerate_config` are pure (spec -> dict). Each value lives in exactly
one file: the accelerate YAML only points at the DeepSpeed JSON and carries the launch shape,
because accelerate refuses grad-accum, clipping, ZeRO stage, offload or mixed precision beside a
`deepspeed_config_file`. `write_run_files` writes all three files or none.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..config import yamlio
from ..config.spec import ADAM_TYPES, STAGE3_FIELDS, RunSpec
from ..errors import CrakenError
from ..runfolder import ACCELERATE_FILE, DS_FILE, RUN_FILE, atomic_write, disk_message, is_disk_full, machine_file
from ..train import schedule

SOURCE_ORDER = "default < preset < file < env < flag; detected = filled from the hardware, auto = chosen by the planner"


def _offload(target) -> dict:
    out = {"device": target.device, "pin_memory": target.pin_memory}
    if target.device == "nvme":
        out["nvme_path"] = target.nvme_path
    return out


def deepspeed_config(spec: RunSpec) -> dict:
    """The DeepSpeed JSON. Every batch number is written out; nothing is left "auto"."""
    zero_spec, optimizer = spec.zero, spec.optimizer
    zero: dict = {"stage": zero_spec.stage}
    if zero_spec.stage >= 1:
        zero["offload_optimizer"] = _offload(spec.offload.optimizer)
    if zero_spec.stage == 3:
        zero["offload_param"] = _offload(spec.offload.param)
    zero.update(overlap_comm=zero_spec.overlap_comm, contiguous_gradients=zero_spec.contiguous_gradients,
                reduce_bucket_size=zero_spec.reduce_bucket_size)
    zero["allgather_bucket_size"] = zero_spec.allgather_bucket_size  # DeepSpeed reads it at every stage
    if zero_spec.stage == 3:
        for key in STAGE3_FIELDS:
            zero[key] = getattr(zero_spec, key)
        zero["stage3_gather_16bit_weights_on_model_save"] = zero_spec.gather_16bit_weights_on_save
    cfg = {
        "train_batch_size": spec.train_batch_size,
        "train_micro_batch_size_per_gpu": spec.batch.micro_batch,
        "gradient_accumulation_steps": spec.grad_accum,
        "gradient_clipping": optimizer.clip,
        "steps_per_print": spec.logging.steps_per_print,
        "wall_clock_breakdown": spec.logging.wall_clock_breakdown,
        # DeepSpeed's throughput timer is on by default and synchronizes the GPU when each forward
        # starts and each step ends: two host syncs per micro-step, only to log samples/s, which
        # craken's metrics report without a sync. Kept only with the profiling breakdown.
        "timers": {"throughput": {"enabled": spec.logging.wall_clock_breakdown,
                                  "synchronized": spec.logging.wall_clock_breakdown}},
        # DeepSpeed's bf16 overflow check (amax and amin of every gradient, a host sync per step) costs
        # ZeRO-2 4% on one H200 (zero_lab.py); craken's loop checks the loss and the gradient norm itself
        # before every checkpoint. Kept where DeepSpeed must skip a non-finite step (on_nonfinite=skip).
        "bf16": {"enabled": spec.base_precision == "bf16"},
        "fp16": {"enabled": spec.precision == "fp16"},
        "optimizer": {"type": "AdamW", "params": {
            "lr": optimizer.lr, "betas": list(optimizer.betas), "eps": optimizer.eps,
            "weight_decay": optimizer.weight_decay,
            "torch_adam": not optimizer.fused}},
        "scheduler": schedule.run_block(spec),  # the block the plain engine steps too (train/schedule.py)
        "zero_optimization": zero,
    }
    if spec.fp32_grad_accum:
        # ZeRO-1 + bf16 then runs DeepSpeed's BF16 optimizer: one flat fp32 gradient buffer, without the
        # ZeRO optimizer's per-parameter bucket copies, inf checks and device syncs (1.07x on one H200).
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if spec.base_precision == "bf16":
        cfg["bf16"]["check_grad_overflow"] = spec.train.on_nonfinite == "skip"
    if spec.precision == "fp16":
        cfg["fp16"].update(loss_scale=0, initial_scale_power=16, loss_scale_window=1000, hysteresis=2,
                           min_loss_scale=1)
    if not optimizer.fused and not spec.cluster.use_cpu:
        # DeepSpeed hands the remaining params to torch.optim.AdamW: its fused CUDA kernel, no JIT build.
        cfg["optimizer"]["params"]["fused"] = True
    if spec.offload.optimizer.device != "none" and not optimizer.fused:
        # Offloaded states are stepped by DeepSpeed's CPU Adam; torch_adam would be refused there.
        del cfg["optimizer"]["params"]["torch_adam"]
        cfg["optimizer"]["params"].pop("fused", None)
    return with_extra(for_optimizer_type(cfg, spec.deepspeed.optimizer_type(raw=True)), spec)


# What DeepSpeed's own non-Adam optimizers take of craken's Adam params (FusedLamb; FusedLion and
# DeepSpeedCPULion; torch.optim.Adagrad and DeepSpeedCPUAdagrad; mup's MuAdam(W) and MuSGD, which pass
# them on to torch's Adam(W) and SGD): the engine passes the whole params block as keyword arguments, and
# each rejects the rest (torch_adam, fused, betas, eps) in every process.
OWN_OPTIMIZER_PARAMS = {"lamb": ("lr", "betas", "eps", "weight_decay"), "lion": ("lr", "betas", "weight_decay"),
                        "adagrad": ("lr", "eps", "weight_decay"), "muadam": ("lr", "betas", "eps", "weight_decay"),
                        "muadamw": ("lr", "betas", "eps", "weight_decay"), "musgd": ("lr", "weight_decay")}


def for_optimizer_type(cfg: dict, name: str | None) -> dict:
    """craken's optimizer params cut to what optimizer type `name` takes: DeepSpeed's own (matched
    lower-cased), or the torch.optim class DeepSpeed builds for a type it does not know; Adam, AdamW and
    other types: unchanged."""
    taken = OWN_OPTIMIZER_PARAMS.get((name or "").lower()) or torch_optimizer_keywords(name)
    if taken is None:
        return cfg
    params = {k: v for k, v in cfg["optimizer"]["params"].items() if k in taken}
    return {**cfg, "optimizer": {**cfg["optimizer"], "params": params}}


def torch_optimizer_keywords(name: str | None) -> tuple[str, ...] | None:
    """The keyword arguments of torch.optim's class `name` (SGD, RMSprop, Adamax, ...), which DeepSpeed's
    engine builds with the whole params block for a type it does not know; None for DeepSpeed's own Adam
    and AdamW (every param craken writes is theirs) and for a name that is no torch.optim class."""
    if not name or name.lower() in ADAM_TYPES:
        return None
    import inspect

    from ..config.dscheck import torch_optimizer_class

    found = torch_optimizer_class(name)
    if found is None:
        return None
    return tuple(p for p in inspect.signature(found.__init__).parameters if p not in ("self", "params"))


def with_extra(cfg: dict, spec: RunSpec) -> dict:
    """The rendered config with the spec's deepspeed.extra keys merged in, their "auto" filled from the
    run; an extra scheduler block is already in place, whole (schedule.run_block: never mixed with craken's)."""
    extra = spec.deepspeed.extra
    if not extra:
        return cfg
    from ..config.importers import AutoFill, fill_auto

    filled = fill_auto(extra, AutoFill.of(spec))
    filled.pop("scheduler", None)
    return _merge(cfg, filled)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _launch_shape(spec: RunSpec) -> dict:
    """The keys both kinds of accelerate YAML share: processes, machines, rendezvous."""
    cluster = spec.cluster
    shape = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "downcast_bf16": "no",
        "machine_rank": cluster.machine_rank,
        "num_machines": cluster.num_machines,
        "num_processes": cluster.num_processes,
        "main_process_port": cluster.main_process_port,
        "rdzv_backend": cluster.rdzv_backend,
        "same_network": True,
        # Always false: accelerate's use_cpu switches DeepSpeed off. CPU processes are selected by
        # DS_ACCELERATOR=cpu (command.build) and the gloo backend (train.loop) instead.
        "use_cpu": False,
    }
    if cluster.num_machines > 1:
        shape["main_process_ip"] = cluster.main_process_ip
    return shape


def plain_accelerate_config(spec: RunSpec) -> dict:
    """The accelerate YAML of a run without DeepSpeed (stage 0 on GPUs): DDP and mixed precision."""
    return {
        **_launch_shape(spec),
        "distributed_type": "MULTI_GPU" if spec.cluster.num_processes > 1 else "NO",
        "mixed_precision": {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[spec.base_precision],
        "gpu_ids": "all",
    }


def dynamo_config(spec: RunSpec) -> dict:
    """The dynamo_config of a user script's accelerate YAML: under model.compile, accelerate's `prepare`
    compiles the script's model as craken's loop compiles its own, each repeated block on its own with
    inductor. compile_tuning has no accelerate setting (its dynamo_mode max-autotune is GEMM autotuning
    and CUDA graphs, not coordinate-descent tuning): it stays craken's loop's."""
    if not spec.model.compile or spec.cluster.use_cpu:
        return {}
    return {"dynamo_config": {"dynamo_backend": "INDUCTOR", "dynamo_use_regional_compilation": True}}


def accelerate_config(spec: RunSpec, ds_config_path: str | os.PathLike, script: bool = False) -> dict:
    """The accelerate YAML: launch shape plus a pointer to the DeepSpeed JSON, nothing it repeats.
    `script`: for a user's script (`craken launch`), which accelerate compiles under model.compile;
    craken's own loop compiles its layers itself, and a dynamo_config would compile the model again."""
    compiled = dynamo_config(spec) if script else {}
    if not spec.uses_deepspeed:
        return {**plain_accelerate_config(spec), **compiled}
    cluster = spec.cluster
    ds: dict = {"deepspeed_config_file": str(Path(ds_config_path).absolute()),
                "zero3_init_flag": spec.zero.stage == 3}
    if cluster.num_machines > 1:
        # "standard" = torchrun on each machine; pdsh (DeepSpeed's default) needs ssh everywhere.
        ds["deepspeed_multinode_launcher"] = "standard" if cluster.launcher == "accelerate" else "pdsh"
    return {**_launch_shape(spec), "distributed_type": "DEEPSPEED", "deepspeed_config": ds, **compiled}


def run_file_text(spec: RunSpec, sources: dict[str, str]) -> str:
    """run.yaml: the resolved spec (loadable again with --config) and, as comments, each value's source."""
    lines = ["# craken run file: the resolved spec of this run. Reuse it with `craken train --config run.yaml`.",
             yamlio.dumps(spec.model_dump(mode="json")).rstrip(),
             "", f"# where each value came from ({SOURCE_ORDER}):"]
    lines += [f"#   {path}: {label}" for path, label in sorted(sources.items()) if label != "default"]
    return "\n".join(lines) + "\n"


def rendered_files(spec: RunSpec, sources: dict[str, str], out_dir: str | os.PathLike,
                   machine_rank: int = 0, script: bool = False) -> dict[str, str]:
    """File name -> text, for everything `config render` writes (`craken train` passes the machine
    rank: its run folder may be shared by the machines of a job; `craken launch` passes script=True,
    see accelerate_config)."""
    out = Path(out_dir)
    ds_name, accelerate_name, run_name = (machine_file(n, machine_rank) for n in (DS_FILE, ACCELERATE_FILE, RUN_FILE))
    files = {
        ds_name: json.dumps(deepspeed_config(spec), indent=2, allow_nan=False) + "\n",
        accelerate_name: yamlio.dumps(accelerate_config(spec, out / ds_name, script)),
        run_name: run_file_text(spec, sources),
    }
    if not spec.uses_deepspeed:
        del files[ds_name]  # nothing reads it: a file that looks in use but is not would mislead
    return files


def write_files(files: dict[str, str], out_dir: str | os.PathLike, force: bool = False) -> list[Path]:
    """Write all files or none: existing files are refused without `force`, each write is atomic."""
    out = Path(out_dir)
    targets = [out / name for name in files]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not force:
        raise CrakenError(f"{', '.join(existing)} already exist(s): pass --force to overwrite, or choose --out DIR",
                          title="refusing to overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".craken-", delete=True)
        probe.close()
    except OSError as exc:
        raise CrakenError(f"cannot write into {out} ({exc.strerror or exc}): choose a writable --out DIR",
                          title="cannot write") from None
    for target, text in zip(targets, files.values()):
        try:
            atomic_write(target, text)
        except OSError as exc:
            why = disk_message(out, sum(len(t.encode()) for t in files.values()), "the run files") \
                if is_disk_full(exc) else f"{exc.strerror or exc}: choose a writable --out DIR"
            raise CrakenError(f"cannot write {target}: {why}", title="cannot write") from None
    return targets
