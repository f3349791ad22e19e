"""`config validate`: check a craken.yaml, or a user's DeepSpeed JSON and/or accelerate YAML, and
collect every problem at once. Files are read through `importers` into one spec, so the same rules
that guard craken's own runs judge imported files, and the DeepSpeed JSON is finally handed to
DeepSpeed's own parser (the real consumer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import yamlio
from .errors import CrakenError
from .importers import from_accelerate, from_deepspeed
from .sources import Layer, build_spec, unflatten

_ACCEL_MARKERS = {"distributed_type", "compute_environment", "deepspeed_config"}


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _read(path: Path, report: Report) -> dict | None:
    try:
        return yamlio.read_mapping(path)
    except CrakenError as exc:
        report.problems.extend(exc.problems)
        return None


def validate_files(files: list[Path], num_processes: int | None = None) -> Report:
    report = Report()
    ds_values: dict = {}
    for_parser: list[tuple[dict, str]] = []  # DeepSpeed JSONs for DeepSpeed's own parser, once craken finds no problem
    accel_values: dict = {}
    ds_name = accel_name = None
    for path in files:
        data = _read(Path(path), report)
        if data is None:
            continue
        if Path(path).suffix == ".json":
            imported = from_deepspeed(data, origin=Path(path).name)
            report.problems += imported.problems
            report.notes += imported.notes
            ds_values, ds_name = imported.values, Path(path).name
            if not imported.problems:
                for_parser.append((data, ds_name))
        elif _ACCEL_MARKERS & set(data):
            imported, _ = from_accelerate(data, origin=Path(path).name)
            report.problems += imported.problems
            accel_values, accel_name = imported.values, Path(path).name
        else:
            try:
                build_spec([Layer("file", str(path), data)])
            except CrakenError as exc:
                report.problems += [f"{Path(path).name}: {p}" for p in exc.problems]
    if ds_name is None and accel_name is None:
        return report
    # The two files must agree where they both speak, then form one valid spec.
    for key in sorted(set(ds_values) & set(accel_values)):
        if ds_values[key] != accel_values[key]:
            report.problems.append(f"{key} disagrees: {ds_values[key]!r} in {ds_name} but {accel_values[key]!r} in "
                                   f"{accel_name}: write it once, in the DeepSpeed JSON")
    # Where they disagree (reported above) the JSON's value stands, so one mistake is reported once.
    merged = {**accel_values, **ds_values}
    if num_processes is not None:
        merged["cluster.num_processes"] = num_processes
    world = merged.get("cluster.num_processes")
    gb, mb, ga = (merged.get(k) for k in ("batch.global_batch", "batch.micro_batch", "batch.grad_accum"))
    if world is None and all(isinstance(v, int) for v in (gb, mb, ga)) and gb % (mb * ga):
        report.problems.append(f"{ds_name}: train_batch_size {gb} is not a multiple of "
                               f"train_micro_batch_size_per_gpu {mb} x gradient_accumulation_steps {ga}: "
                               "no process count makes this triple consistent")
    try:
        build_spec([Layer("file", " + ".join(n for n in (ds_name, accel_name) if n), unflatten(merged))])
    except CrakenError as exc:
        report.problems += exc.problems
    if not report.problems:
        # Last, the real consumer; only on its own, so that one mistake is not reported twice.
        for data, name in for_parser:
            report.problems += deepspeed_parser_problems(data, name, num_processes)
    return report


def deepspeed_parser_problems(data: dict, name: str, num_processes: int | None) -> list[str]:
    """Hand the JSON to DeepSpeed's own parser (imports deepspeed: slow, so only here)."""
    try:
        from .dscheck import parse_deepspeed_config
    except Exception as exc:  # deepspeed missing or broken: say so, do not crash
        return [f"{name}: DeepSpeed could not be imported to check it ({exc.__class__.__name__}): run craken doctor"]
    # "auto" batch sizes are craken's to fill: check with craken's default micro-batch.
    cfg = {k: v for k, v in data.items() if v != "auto"}
    if data.get("train_micro_batch_size_per_gpu") == "auto":
        from .spec import BatchSection

        cfg["train_micro_batch_size_per_gpu"] = BatchSection().micro_batch
    try:
        parse_deepspeed_config(cfg, num_processes or _implied_world(cfg))
    except Exception as exc:  # DeepSpeed raises assorted types; its message is what the user needs
        return [f"{name}: DeepSpeed rejects it: {' '.join(str(exc).split())[:300]}"]
    return []


def _implied_world(cfg: dict) -> int:
    gb, mb, ga = (cfg.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                       "gradient_accumulation_steps"))
    if all(isinstance(v, int) and v > 0 for v in (gb, mb, ga)) and gb % (mb * ga) == 0:
        return gb // (mb * ga)
    return 1
