"""Checks of the run's own settings against this machine, and of a local model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .model import SETTINGS_FIX, Check, RunView


def check_run(view: RunView | None, spec_problems: Sequence[str] = ()) -> list[Check]:
    if view is None:  # one failure per problem of the settings
        return [Check("run", "settings", "fail", problem, SETTINGS_FIX)
                for problem in spec_problems or ["invalid settings"]]
    out = []
    where = "CPU processes" if view.use_cpu else "GPU processes"
    why = {k: w for k, _, w in view.decisions}
    detail = f"{view.processes} {where}" + (f" over {view.machines} machines" if view.machines > 1 else "")
    if "cluster.num_processes" in why:
        detail += f" (auto: {why['cluster.num_processes']})"
    out.append(Check("run", "processes", "ok", detail))
    pdetail = view.precision + (f" (auto: {why['precision']})" if "precision" in why else "")
    fp16_warning = [w for w in view.warnings if "fp16" in w]
    out.append(Check("run", "precision", "warn" if fp16_warning else "ok", pdetail,
                     "expected on GPUs older than Ampere; watch for skipped steps, or use --precision fp32"
                     if fp16_warning else ""))
    for w in view.warnings:
        if w not in fp16_warning:
            out.append(Check("run", "decision", "warn", w, ""))
    for p in view.problems:
        out.append(Check("run", "settings vs machine", "fail", p.what, p.fix))
    return out + check_model_folder(view.spec.model)


def check_model_folder(model) -> list[Check]:
    """A local model folder, as `craken train` checks it before launch (preflight); none for a hub id or built-in."""
    from ..launch import preflight

    problems = preflight.model_folder_problems(model)
    if problems:
        return [Check("run", "model files", "fail", p, "fix the file named, or choose another --model")
                for p in problems]
    folder = Path(model.name_or_path).expanduser()
    if not (folder / "config.json").is_file():
        return []
    return [Check("run", "model files", "ok", f"{folder}: config.json, tokenizer and weights headers read")]
