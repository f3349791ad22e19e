"""`config validate`: check a craken.yaml, or a user's DeepSpeed JSON and/or accelerate YAML, and
collect every problem at once. Foreign files are read through `importers.import_files` (DeepSpeed's
and accelerate's own parsers judge them first), then the imported run meets craken's own rules."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CrakenError
from . import yamlio
from .importers import import_files, is_foreign
from .sources import Layer, build_spec, unflatten


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def validate_files(files: list[Path], num_processes: int | None = None) -> Report:
    report = Report()
    foreign = []
    for path in map(Path, files):
        try:
            data = yamlio.read_mapping(path)
        except CrakenError as exc:
            report.problems += exc.problems
            continue
        if is_foreign(path, data):
            foreign.append(path)
            continue
        try:
            build_spec([Layer("file", str(path), data)])
        except CrakenError as exc:
            report.problems += [f"{path.name}: {p}" for p in exc.problems]
    if not foreign:
        return report
    imported = import_files(foreign, num_processes=num_processes)
    report.problems += imported.problems
    report.notes += imported.notes
    if imported.problems:
        return report
    values = dict(imported.values)
    if num_processes is not None:
        values["cluster.num_processes"] = num_processes
    try:
        build_spec([Layer("file", " + ".join(p.name for p in foreign), unflatten(values))])
    except CrakenError as exc:
        report.problems += exc.problems
    return report
