"""`craken plan`: predicted per-GPU memory of every ZeRO strategy, the choice, and why faster ones lose.

Reads only the model's config (no weights, no torch for the Llama/Mistral/Qwen/GPT-2/NeoX families),
so it answers in well under two seconds, also for hardware you don't have (`--gpus 8 --gpu-memory 80GiB`).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Optional

import typer

from ..config.options import SpecArgs, spec_flags

_UNITS = {"": 1024**3, "g": 1024**3, "gib": 1024**3, "gb": 1000**3, "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
          "m": 1024**2, "mib": 1024**2, "mb": 1000**2}


def parse_size(text: str, flag: str) -> int:
    """'80GiB', '80G', '80' (GiB), '80GB' (10^9), '1.5TiB' -> bytes."""
    from ..errors import CrakenError

    parsed = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not parsed or parsed.group(2).lower() not in _UNITS:
        raise CrakenError(f"{flag} {text!r} is not a size: write e.g. 80GiB, 80GB or 80 (GiB)",
                          title="invalid argument")
    size = int(float(parsed.group(1)) * _UNITS[parsed.group(2).lower()])
    if size == 0:  # every strategy would print "no" and the plan exit 0, as if the model were too big
        raise CrakenError(f"{flag} {text!r} is no memory at all: give the size, e.g. 80GiB", title="invalid argument")
    return size


def hypothetical_hardware(gpus: int, gpu_memory: int, cpu_memory: int | None):
    """Hardware with `gpus` identical GPUs per machine (bf16-capable), through hardware.FakeProbe."""
    import dataclasses

    from ..plan.hardware import GPU, FakeProbe, detect

    gib = gpu_memory / 1024**3
    probe = FakeProbe(gpus=[GPU(i, f"hypothetical {gib:g} GiB GPU", gpu_memory, gpu_memory, (9, 0))
                            for i in range(gpus)])
    # RAM of a machine we don't have is unknown unless given: None means not checked.
    return dataclasses.replace(detect(probe), ram_total=cpu_memory or 0, ram_available=cpu_memory or 0)


@spec_flags
def plan(
    gpus: Annotated[Optional[int], typer.Option("--gpus", metavar="N", min=1,
        help="Plan for N GPUs per machine instead of "
                                                 "the detected ones (hypothetical hardware).")] = None,
    gpu_memory: Annotated[str, typer.Option("--gpu-memory", metavar="SIZE", help="Memory of each hypothetical GPU "
                                            "(80GiB, 80GB, 141GiB; used with --gpus).")] = "80GiB",
    cpu_memory: Annotated[Optional[str], typer.Option("--cpu-memory", metavar="SIZE",
        help="RAM per machine, for CPU offload "
                                                      "(default: detected; unchecked for --gpus).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help='Print {"strategies": [...], "choice": {...}}.')] = False,
    *,
    spec_args: SpecArgs,
) -> None:
    """Predict per-GPU memory for each ZeRO strategy and choose the fastest that fits."""
    import dataclasses

    from ..errors import CrakenError
    from ..plan.hardware import detect
    from ..plan.modelinfo import model_info
    from ..config.options import load_run
    from ..plan.memory import plan as make_plan
    from ..plan.memory import other_numerics, plan_by_default, smallest_changes, with_precision

    cpu_bytes = parse_size(cpu_memory, "--cpu-memory") if cpu_memory else None
    if gpus is not None:
        hw = hypothetical_hardware(gpus, parse_size(gpu_memory, "--gpu-memory"), cpu_bytes)
    else:
        hw = detect()
        if hw.gpu_count == 0:
            raise CrakenError("no GPU found here: plan for hardware you don't have with --gpus N --gpu-memory 80GiB",
                              title="nothing to plan")
        if cpu_bytes:
            hw = dataclasses.replace(hw, ram_total=cpu_bytes)
    resolved, _ = load_run(spec_args, hardware=hw)
    spec = resolved.spec
    info = model_info(spec.model.name_or_path, spec.model.trust_remote_code)
    # A micro-batch the user set is kept; the default one is searched.
    search = resolved.sources.get("batch.micro_batch", "default") == "default"
    # The same compilation default as `craken train --auto`, so the choice shown is the one it makes.
    by_default = not resolved.user_set("model.compile")
    planner = plan_by_default if by_default else make_plan
    result = planner(info, spec, hw, search_micro_batch=search)
    changes = [] if result.choice else smallest_changes(info, spec, hw, {}, search_micro_batch=search)
    other = other_numerics(spec, hw)
    beside = planner(info, with_precision(spec, other), hw, search_micro_batch=search) if other else None
    if as_json:
        typer.echo(json.dumps({**result.to_dict(), "smallest_changes": changes, "other_precision": None if beside is None
                               else {"precision": other, "choice": beside.choice.to_dict() if beside.choice else None}},
                              indent=2))
        return
    _print(result, changes)
    if beside is not None:
        _print_other(other, beside, result)


WHOLE_TABLE_COLUMNS = 93


def _print(result, changes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..console import out
    from ..plan.memory import GRADIENTS_IN_FREED_BLOCKS

    model = result.model
    out.print(f"{model.name}: {model.num_params / 1e9:.3f} B parameters ({model.counted_by}), "
              f"{result.world_size} GPU(s) of {result.gpu_memory_gib:.0f} GiB ({result.usable_gib:.1f} usable), "
              f"global batch {result.global_batch}, {'compiled layers (--no-compile: eager)' if result.compiled else 'eager'}",
              markup=False)
    # A pipe gets Rich's 80 columns: print the whole table there. A terminal narrower than the whole
    # table (about 93 columns) gets the totals only, so no column is cut.
    wide = out if out.is_terminal else Console(file=out.file, width=120, highlight=False)
    whole = wide.width >= WHOLE_TABLE_COLUMNS
    title = "GiB per GPU (CPU: per machine)" if whole else \
        f"GiB per GPU, totals (CPU: per machine; parts: {WHOLE_TABLE_COLUMNS} columns or --json)"
    table = Table(box=None, pad_edge=False, title=title, title_justify="left")
    parts = ("param", "grad", "optim", "activ", "other") if whole else ()
    for name in ("strategy", "mb", "ga", *parts, "total", "CPU", "speed", "fits"):
        table.add_column(name, no_wrap=True, justify="left" if name == "strategy" else "right")
    for s in result.strategies:
        style = "bold green" if s is result.choice else (None if s.fits else "dim")
        short = s.name.replace("offload_optimizer_", "opt:").replace("offload_param_", "param:")
        values = (s.params_gib, s.grads_gib, s.optimizer_gib, s.activations_gib, s.other_gib) if whole else ()
        table.add_row(short, str(s.micro_batch), str(s.grad_accum), *(f"{v:.1f}" for v in values),
                      f"{s.total_gib:.1f}", f"{s.cpu_memory_gib:.0f}", f"{s.speed:.2f}",
                      "yes" if s.fits else "no", style=style)
    wide.print(table)
    if whole and any(GRADIENTS_IN_FREED_BLOCKS in s.detail for s in result.strategies):
        out.print("zero0 rows: the gradients are made in the blocks the backward frees, so 'other' subtracts the "
                  "smaller of the gradients and what the backward starts with", markup=False)
    if result.choice is None:
        out.print("nothing fits; any one of these would:" if changes else "nothing fits", markup=False)
        for change in changes:
            out.print(f"  {change}", markup=False)
        return
    choice = result.choice
    out.print(f"choice: {choice.name}, micro-batch {choice.micro_batch}, grad-accum {choice.grad_accum} "
              f"({choice.total_gib:.1f} GiB per GPU)", markup=False)
    for line in result.rejected:
        out.print(f"  not {line}", markup=False)


def _print_other(precision: str, other, result) -> None:
    """One line: the choice in the other numerics (fp8 beside bf16, or bf16 beside fp8), its speed
    relative to the spec's own choice."""
    from ..console import out

    choice, own = other.choice, result.choice
    if choice is None:
        out.print(f"{precision} (--precision {precision}): nothing fits", markup=False)
        return
    relative = f", {choice.speed / own.speed:.2f}x the tokens/s of {own.name}" if own is not None else ""
    what = "torchao float8 matmuls, which --auto never turns on" if precision == "fp8" else "16-bit matmuls"
    out.print(f"beside it, {precision} (--precision {precision}: {what}): {choice.name}, micro-batch "
              f"{choice.micro_batch}, {choice.total_gib:.1f} GiB per GPU{relative}", markup=False)

