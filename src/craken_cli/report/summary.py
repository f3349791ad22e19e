"""The run summary `craken train` prints before launch: what is about to run, in a few lines.

    lines = summary_lines(spec, sources, run_dir, params)    # pure: the spec resolved, its sources
    lines = prepared_summary(prepared)                      # the same for a prepared run (train, launch)

Model and size, strategy with its offloads, precision and the master weights' dtype, the batch
arithmetic, sequence and steps, where the eval rows come from, the run folder, and every value that is
not a default with where it came from (a preset, craken.yaml, CRAKEN_*, a flag, the hardware, the planner).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Mapping

WIDTH = 80
LABEL = 12  # width of the label column (after two spaces)


def summary_lines(spec, sources: Mapping[str, str], run_dir: Path | str, params: int | None,
                  resume_from: Path | None = None, width: int = WIDTH, eval_from: str | None = None) -> list[str]:
    size = f" ({_count(params)} parameters)" if params else ""
    rows = [
        ("model", f"{spec.model.name_or_path}{size}"),
        ("strategy", _strategy(spec)),
        ("precision", _precision(spec.precision)),
        ("batch", f"micro-batch {spec.batch.micro_batch} x accumulation {spec.grad_accum} x {spec.world_size} "
                  f"processes = global batch {spec.train_batch_size}"),
        ("sequence", f"{spec.data.seq_len} tokens; {spec.train.max_steps} steps"),
        ("run folder", str(run_dir)),
    ]
    if eval_from is not None:
        rows.insert(-1, ("eval rows", eval_from))
    if resume_from is not None:
        rows.append(("resume", f"from {resume_from}"))
    rows += [(label, text) for label, text in _not_defaults(spec, sources)]
    lines = ["craken: about to train"]
    for label, text in rows:
        lines += textwrap.wrap(text, width, initial_indent=f"  {label:<{LABEL}}",
                               subsequent_indent=" " * (LABEL + 4), break_on_hyphens=False)
    return lines


def prepared_summary(prepared) -> list[str]:
    """`summary_lines` of a `prepare.Prepared` run; the parameter count read from the model's config."""
    import os

    from ..doctor.resources import model_params
    from ..train.data import DataError, eval_source

    spec = prepared.resolved.spec
    params, _ = model_params(spec.model.name_or_path, os.environ)
    try:
        script = prepared.request is not None and prepared.request.script is not None  # reads its own data
        eval_from = None if spec.data.streaming or script else eval_source(spec, look_up=False).describe()
    except DataError:  # the pre-launch check refused it already
        eval_from = None
    return summary_lines(spec, prepared.resolved.sources, prepared.run_dir, params, prepared.resume_from,
                         eval_from=eval_from)


def _count(number: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if number >= scale:
            return f"{number / scale:.1f}{unit}"
    return str(number)


def _strategy(spec) -> str:
    where = "CPU processes" if spec.cluster.use_cpu else "GPU processes"
    machines = f" over {spec.cluster.num_machines} machines" if spec.cluster.num_machines > 1 else ""
    if not spec.uses_deepspeed:
        text = "no ZeRO (plain Accelerate DDP, torch's fused AdamW)"
    else:
        text = f"DeepSpeed ZeRO-{spec.zero.stage}"
    offloads = [f"{what} offload {device}" for what, device in
                (("optimizer", spec.offload.optimizer.device), ("parameter", spec.offload.param.device))
                if device != "none"]
    text += ", " + ", ".join(offloads) if offloads else ", no offload"
    extras = [name for name, on in (("activation checkpointing", spec.model.activation_checkpointing),
                                    ("regional compilation", spec.model.compile)) if on]
    return f"{text}{', ' + ', '.join(extras) if extras else ''}; {spec.world_size} {where}{machines}"


def _precision(precision: str) -> str:
    if precision == "fp32":
        return "fp32 (weights, gradients and optimizer states)"
    compute = "float8 matmuls, the rest bf16" if precision == "fp8" else precision
    return f"{compute} compute, fp32 master weights and optimizer states"


def _not_defaults(spec, sources: Mapping[str, str]) -> list[tuple[str, str]]:
    """One row per source other than the defaults: 'set by flag: zero.stage=2, ...'."""
    from ..config.sources import flatten

    values = flatten(spec.model_dump(mode="json"))
    by_source: dict[str, list[str]] = {}
    for path, source in sources.items():
        if source != "default" and path in values:
            by_source.setdefault(source, []).append(f"{path}={_shown(values[path])}")
    return [("not default" if i == 0 else "", f"{source}: {', '.join(items)}")
            for i, (source, items) in enumerate(by_source.items())]


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def dry_run_text(prepared) -> list[str]:
    """`craken train --dry-run`: the command to copy (the variables craken sets, then argv; secrets
    redacted) and each rendered file as the text it would be written as."""
    import shlex

    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(prepared.env_shown.items())]
    argv = shlex.join(prepared.argv_shown)
    command = " ".join(["env", *env, argv]) if env else argv
    lines = ["# the launch command (run from this folder):", command]
    for name, text in prepared.files_shown.items():
        lines += ["", f"# {Path(prepared.run_dir) / name}", text.rstrip("\n")]
    return lines
