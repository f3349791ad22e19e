"""Fill what the user left to craken (None / "auto") from the hardware, and check the result.

Pure: `resolve(resolved, hardware)` returns a new `SourcedSpec` whose spec has no unresolved value, so
the renderers never emit an "auto" that DeepSpeed or Accelerate would have to guess.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config.sources import Layer, SourcedSpec, build_spec, merge
from ..config.spec import AUTO_BUCKETS, STAGE3_DEFAULTS, ZeroSection
from ..errors import CrakenError, Refusal
from .hardware import Hardware

CPU_PROCESSES = 2  # processes per machine on a machine without GPUs


@dataclass
class Decisions:
    """What resolution decided, for printing: dotted path -> (value, why)."""

    made: dict[str, tuple[object, str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def hardware_values(spec, hw: Hardware) -> tuple[dict, Decisions]:
    """Dotted path -> value for everything left to craken, with a reason for each."""
    decisions = Decisions()
    cluster = spec.cluster
    use_cpu = cluster.use_cpu
    if use_cpu is None:
        use_cpu = hw.gpu_count == 0
        decisions.made["cluster.use_cpu"] = (use_cpu, "no GPU found" if use_cpu else f"{hw.gpu_count} GPU(s) found")
    num = cluster.num_processes
    if num is None and not use_cpu and not hw.gpu_count:
        return {}, decisions  # GPUs asked for, none here: hardware_problems says so, nothing to fill from
    if num is None:
        per_machine = CPU_PROCESSES if use_cpu else hw.gpu_count
        num = per_machine * cluster.num_machines
        decisions.made["cluster.num_processes"] = (
            num, f"{per_machine} {'CPU process' if use_cpu else 'GPU'}(s) per machine x {cluster.num_machines} "
                 "machine(s)")
    precision = spec.precision
    if precision == "auto" and (use_cpu or hw.gpu_count):  # GPUs asked for, none here: hardware_problems says so
        if use_cpu:
            precision, why = "bf16", "CPU processes (DeepSpeed's CPU accelerator runs bf16)"
        elif hw.all_bf16:
            precision, why = "bf16", f"{hw.gpus[0].name} supports bf16 (compute capability >= 8.0)"
        else:
            old = next(g for g in hw.gpus if not g.bf16)
            precision, why = "fp16", f"{old.name} (compute capability {old.capability[0]}.{old.capability[1]}) has no bf16"
            decisions.warnings.append(f"precision auto -> fp16: {why}; fp16 uses loss scaling and can overflow, "
                              "watch for skipped steps")
        decisions.made["precision"] = (precision, why)
    if cluster.rdzv_backend is None:
        backend = "c10d" if cluster.max_restarts else "static"
        rendezvous = "restarts need c10d" if cluster.max_restarts else "one rendezvous"
        decisions.made["cluster.rdzv_backend"] = (backend, rendezvous)
    if spec.optimizer.fused is None:
        decisions.made["optimizer.fused"] = (False, "torch AdamW (fused kernel on GPU): no DeepSpeed op to build")
    if spec.zero.stage == 3:
        for key, value in STAGE3_DEFAULTS.items():
            if getattr(spec.zero, key) is None:
                decisions.made[f"zero.{key}"] = (value, "stage 3 default")
    decisions.made.update(_batch_values(spec.batch, num))
    decisions.made.update(bucket_values(spec))
    return {k: v for k, (v, _) in decisions.made.items()}, decisions


def _batch_values(batch, num: int) -> dict[str, tuple[object, str]]:
    made = {}
    micro = batch.micro_batch
    if micro is None and batch.global_batch is not None:
        # DeepSpeed's derivation for a file that states the global batch but no micro-batch
        micro = max(1, batch.global_batch // ((batch.grad_accum or 1) * num))
        made["batch.micro_batch"] = (micro, f"global batch {batch.global_batch} / {num} process(es), as DeepSpeed "
                                            "derives it")
    if micro is None:
        return made
    gb, per_step = batch.global_batch, micro * num
    # A global batch that no accumulation reaches stays unresolved: validation then names the fix.
    if batch.grad_accum is None and (gb is None or gb % per_step == 0):
        why = "from --global-batch" if gb is not None else "default"
        made["batch.grad_accum"] = (batch.model_copy(update={"micro_batch": micro}).accumulation(num), why)
    return made


def bucket_values(spec) -> dict[str, tuple[object, str]]:
    """ZeRO buckets given as "auto": from the model's hidden size, as the HF Trainer fills them."""
    from ..config.importers import hidden_size_buckets

    zero = spec.zero
    autos = [k for k in AUTO_BUCKETS if getattr(zero, k) == "auto"]
    if not autos:
        return {}
    from .modelinfo import model_info

    try:
        hidden = model_info(spec.model.name_or_path, spec.model.trust_remote_code).hidden_size
    except CrakenError:
        hidden = None
    buckets = hidden_size_buckets(hidden) if hidden else {}
    made = {}
    for key in autos:
        value = buckets.get(f"zero_optimization.{key}", STAGE3_DEFAULTS.get(key, ZeroSection.model_fields[key].default))
        why = f"auto: from hidden size {hidden}" if hidden else "auto: the model's hidden size is unknown, " \
            "DeepSpeed's default"
        made[f"zero.{key}"] = (value, why)
    return made


def hardware_problems(spec, hw: Hardware) -> list[Refusal]:
    """What the resolved spec asks of this machine that it cannot give."""
    from ..train import fp8

    cluster = spec.cluster
    out = fp8.problems(spec.precision, bool(cluster.use_cpu), hw.gpus)
    if not cluster.use_cpu:
        if hw.gpu_count == 0:
            out.append(Refusal("GPU training was asked for (--cpu false) but no GPU was found",
                               "drop it to train on CPU"))
        else:
            per_machine = cluster.num_processes // cluster.num_machines
            if per_machine > hw.gpu_count:
                out.append(Refusal(f"{per_machine} processes per machine but only {hw.gpu_count} GPU(s) here",
                                   f"set --num-processes {hw.gpu_count * cluster.num_machines} or fewer"))
            if spec.precision == "bf16" and not hw.all_bf16:
                old = next(g for g in hw.gpus if not g.bf16)
                out.append(Refusal(f"bf16 was asked for but {old.name} (compute capability "
                                   f"{old.capability[0]}.{old.capability[1]}) has no bf16",
                                   "use --precision fp16 or auto"))
    return out


def fill(resolved: SourcedSpec, hw: Hardware, extra_layers: tuple[Layer, ...] = ()) -> tuple[SourcedSpec, Decisions]:
    """Fill the spec's open values from `hw` and revalidate (CrakenError where a filled value breaks a
    cross-field rule); what the machine cannot give is `hardware_problems`' to say."""
    from ..config.sources import unflatten

    values, decisions = hardware_values(resolved.spec, hw)
    base = Layer("default", "resolved", resolved.spec.model_dump(mode="json"))
    detected = Layer("detected", "detected", unflatten(values))
    out = build_spec([base, detected, *extra_layers])
    _, origin = merge([detected, *extra_layers])
    sources = dict(resolved.sources)
    for path in values:
        sources[path] = "detected"
    for path, label in origin.items():
        if path not in values:
            sources[path] = label
    return SourcedSpec(out.spec, sources), decisions


def resolve(resolved: SourcedSpec, hw: Hardware, extra_layers: tuple[Layer, ...] = ()) -> tuple[SourcedSpec, Decisions]:
    """Fill the spec's open values from `hw`, revalidate, and check it against the machine."""
    out, decisions = fill(resolved, hw, extra_layers)
    problems = hardware_problems(out.spec, hw)
    if problems:
        raise CrakenError(problems, title="this machine cannot run that")
    return out, decisions
