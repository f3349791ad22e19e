"""--auto: the fastest strategy the planner predicts to fit, as a layer of settings over the user's.

Shared by `craken train` and `craken launch` (through prepare.resolve_spec).
"""

from __future__ import annotations

from ..config.sources import Layer, SourcedSpec
from ..config.spec import STAGE3_DEFAULTS
from ..errors import CrakenError
from ..train import fp8

# What --auto may choose where the user did not set it (SourcedSpec.user_set); model.compile: auto_compile.
AUTO_PATHS = ("zero.stage", "offload.optimizer.device", "offload.param.device", "model.activation_checkpointing",
              "batch.micro_batch", "batch.grad_accum")


def auto_compile(resolved: SourcedSpec, info, hw) -> bool:
    """--auto turns on regional compilation unless the user set it: it is the largest measured speed
    lever (docs/performance.md), and the planner predicts its memory (where: memory.compiles_by_default)."""
    from .memory import compiles_by_default

    return not resolved.user_set("model.compile") and compiles_by_default(info, hw)


def auto_layer(resolved: SourcedSpec, hw, exclude: tuple[tuple[str, int], ...] = ()
               ) -> tuple[tuple[Layer, ...], list[str], str | None]:
    """--auto: the fastest strategy the planner predicts to fit, among those that keep every
    setting the user gave explicitly (file, env or flag); presets and defaults may be changed."""
    from .datasize import micro_batch_cap
    from .modelinfo import model_info
    from .memory import compatible, compiled_where_measured, plan, refusal, smallest_changes, with_compile
    from ..config.sources import unflatten

    spec = resolved.spec
    if hw.gpu_count == 0:
        return (), ["--auto: no GPU found, so the configured strategy runs on CPU processes as it is"], None
    fixed = {p: v for p, v in resolved.flat().items() if p in AUTO_PATHS and resolved.user_set(p)}
    search = not ({"batch.micro_batch", "batch.grad_accum"} & set(fixed))
    try:
        info = model_info(spec.model.name_or_path, spec.model.trust_remote_code)
    except Exception as exc:  # an unreadable config is reported by preflight with a fix
        return (), [f"--auto: cannot read the model's config ({exc}); keeping the configured strategy"], None
    cap = micro_batch_cap(spec, fixed.get("batch.micro_batch"))

    # What ran out of memory is tried again only at a smaller micro-batch (the smallest failure counts).
    oom: dict[str, int] = {}
    for name, micro_batch in exclude:
        oom[name] = min(micro_batch, oom.get(name, micro_batch))

    def candidates(planned_spec):
        result = plan(info, planned_spec, hw, search_micro_batch=search, out_of_memory_at=oom, max_micro_batch=cap)
        return result, compatible(result, fixed)

    compile_chosen = auto_compile(resolved, info, hw)
    if compile_chosen:
        result, allowed = candidates(with_compile(spec))
        compile_chosen = bool(allowed) and compiled_where_measured(allowed[0])
    if not compile_chosen:
        result, allowed = candidates(spec)
    if not allowed and exclude:
        tried = ", ".join(f"{name} at micro-batch {mb}" for name, mb in exclude)
        raise CrakenError(f"out of memory with {tried}, and no slower strategy compatible with your "
                          "settings is predicted to fit: lower --micro-batch or --seq-len, or use "
                          "--activation-checkpointing; see `craken plan`", title="no strategy left")
    if not allowed:
        changes = smallest_changes(info, spec, hw, fixed, search_micro_batch=search, max_micro_batch=cap)
        raise CrakenError(refusal(info, result, changes, fixed), title="predicted not to fit")
    choice = allowed[0]
    values = {p: v for p, v in choice.settings().items() if p not in fixed}
    if compile_chosen:
        values["model.compile"] = True
    if values.get("offload.optimizer.device") == "none":
        values["offload.optimizer.nvme_path"] = None
    if values.get("zero.stage", spec.zero.stage) != 3:
        values.update({f"zero.{k}": None for k in STAGE3_DEFAULTS if not resolved.user_set(f"zero.{k}")})
    note = (f"--auto chose {choice.name}{' + compile' if compile_chosen else ''}, micro-batch {choice.micro_batch} "
            f"x accumulation {choice.grad_accum} (predicted {choice.total_gib:.1f} GiB of "
            f"{result.gpu_memory_gib:.0f} GiB per GPU)")
    notes = [note, *fp8.recommendation(spec.precision, hw.gpus, choice, info, spec.data.seq_len)]
    return (Layer("auto", "planner", unflatten(values)),), notes, choice.name
