"""What `craken train` does between parsing and printing, as plain functions:

    prepare(request)  -> spec resolved against the hardware (and the planner under --auto),
                         inputs checked, files rendered into the run folder, (argv, env) built
    execute(prepared) -> launch, then check health (--test) and write the report
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from . import launch, preflight
from .errors import CrakenError
from .options import SpecArgs, layers
from .render import rendered_files, write_files
from .sources import Layer, Resolved, build_spec

TEST_STEPS = 20


@dataclass
class TrainRequest:
    spec_args: SpecArgs
    auto: bool = False
    test: bool = False
    dry_run: bool = False
    resume: str | None = None
    force: bool = False
    launcher_args: list[str] = field(default_factory=list)


@dataclass
class Prepared:
    resolved: Resolved
    run_dir: Path
    argv: list[str]
    env: dict[str, str]
    files: dict[str, str]
    resume_from: Path | None
    warnings: list[str]
    test: bool

    @property
    def env_shown(self) -> dict[str, str]:
        """The variables craken sets or changes, secrets redacted."""
        base = os.environ
        changed = {k: v for k, v in self.env.items() if base.get(k) != v}
        return launch.redact_env(changed)

    @property
    def files_shown(self) -> dict[str, str]:
        return self.files


def test_layer(spec) -> Layer:
    """--test: the same run, 20 steps, into its own folder."""
    every = max(1, TEST_STEPS // 2)
    return Layer("flag", "--test", {
        "train": {"max_steps": min(TEST_STEPS, spec.train.max_steps), "eval_every": every, "save_every": 0},
        "logging": {"steps_per_print": min(spec.logging.steps_per_print, 5)},
        "output": {"name": f"{spec.output.name}-test",
                   "dir": f"{spec.output.dir.rstrip('/')}-test" if spec.output.dir else None},
    })


def resolve_spec(request: TrainRequest, environ: Mapping[str, str], hardware=None):
    from . import hardware as hw_mod
    from .resolve import resolve

    source_layers = layers(request.spec_args, environ)
    resolved = build_spec(source_layers, nvme_path=request.spec_args.nvme_path)
    if request.test:
        resolved = build_spec([*source_layers, test_layer(resolved.spec)], nvme_path=request.spec_args.nvme_path)
    hw = hardware if hardware is not None else hw_mod.detect()
    notes: list[str] = []
    if request.auto:
        first, _ = resolve(resolved, hw)
        planned, notes = auto_layer(first, hw)
        resolved, decisions = resolve(resolved, hw, extra_layers=planned)
    else:
        resolved, decisions = resolve(resolved, hw)
    return resolved, decisions.warnings + notes, hw


# What --auto may choose, and the source labels that mean "the user did not set this".
AUTO_PATHS = ("zero.stage", "offload.optimizer.device", "offload.param.device", "model.activation_checkpointing",
              "batch.micro_batch", "batch.grad_accum")


def user_set(sources: Mapping[str, str], path: str) -> bool:
    label = sources.get(path, "default")
    return not (label == "default" or label.startswith("preset") or label == "detected")


def auto_layer(resolved: Resolved, hw) -> tuple[tuple[Layer, ...], list[str]]:
    """--auto: the fastest strategy the planner predicts to fit, among those that keep every
    setting the user gave explicitly (file, env or flag); presets and defaults may be changed."""
    from .modelinfo import model_info
    from .planner import plan
    from .sources import unflatten

    spec = resolved.spec
    if hw.gpu_count == 0:
        return (), ["--auto: no GPU found, so the configured strategy runs on CPU processes as it is"]
    fixed = {p: v for p, v in resolved.flat().items() if p in AUTO_PATHS and user_set(resolved.sources, p)}
    search = not ({"batch.micro_batch", "batch.grad_accum"} & set(fixed))
    try:
        info = model_info(spec.model.name_or_path, spec.model.trust_remote_code)
    except Exception as exc:  # an unreadable config is reported by preflight with a fix
        return (), [f"--auto: cannot read the model's config ({exc}); keeping the configured strategy"]
    result = plan(info, spec, hw, search_micro_batch=search)
    allowed = [s for s in result.strategies if s.fits and all(
        {"zero.stage": s.stage, "offload.optimizer.device": s.offload_optimizer,
         "offload.param.device": s.offload_param, "model.activation_checkpointing": s.activation_checkpointing,
         "batch.micro_batch": s.micro_batch}.get(p, v) == v for p, v in fixed.items())]
    if not allowed:
        return (), [f"--auto: no strategy compatible with your settings ({', '.join(fixed) or 'none'}) is predicted "
                    f"to fit in {result.gpu_memory_gib:.0f} GiB; keeping the configured one (see `craken plan`)"]
    choice = allowed[0]
    values = {"zero.stage": choice.stage, "offload.optimizer.device": choice.offload_optimizer,
              "offload.param.device": choice.offload_param,
              "model.activation_checkpointing": choice.activation_checkpointing,
              "batch.micro_batch": choice.micro_batch, "batch.grad_accum": choice.grad_accum}
    values = {p: v for p, v in values.items() if p not in fixed}
    if values.get("offload.optimizer.device") == "none":
        values["offload.optimizer.nvme_path"] = None
    if values.get("zero.stage", spec.zero.stage) != 3:
        values.update({f"zero.{k}": None for k in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                                                   "stage3_max_live_parameters", "stage3_max_reuse_distance",
                                                   "gather_16bit_weights_on_save")
                       if not user_set(resolved.sources, f"zero.{k}")})
    note = (f"--auto chose {choice.name}, micro-batch {choice.micro_batch} x accumulation {choice.grad_accum} "
            f"(predicted {choice.total_gib:.1f} GiB of {result.gpu_memory_gib:.0f} GiB per GPU)")
    return (Layer("auto", "planner", unflatten(values)),), [note]


def resume_checkpoint(run_dir: Path, resume: str | None) -> tuple[Path | None, list[str]]:
    from .train import checkpoint

    if not resume:
        return None, []
    if resume == "auto":
        found, warnings = checkpoint.latest_checkpoint(run_dir)
        if found is None:
            raise CrakenError(f"--resume auto: no complete checkpoint in {run_dir / 'checkpoints'}: "
                              "drop --resume to start a new run, or name a checkpoint folder")
        return found, warnings
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise CrakenError(f"--resume {resume}: no such checkpoint folder; use --resume auto or a path "
                          "from `craken ckpt list RUN_DIR`")
    if not checkpoint.is_complete(path):
        raise CrakenError(f"--resume {resume}: this checkpoint is partial or corrupt (no {checkpoint.STATE_FILE}); "
                          "use an earlier one from `craken ckpt list RUN_DIR`")
    return path, []


def prepare(request: TrainRequest, environ: Mapping[str, str], hardware=None) -> Prepared:
    resolved, warnings, hw = resolve_spec(request, environ, hardware)
    spec = resolved.spec
    run_dir = Path(spec.output.run_dir())
    force = request.force or request.test
    problems = (preflight.model_problems(spec) + preflight.data_problems(spec)
                + preflight.output_problems(run_dir, request.resume, force))
    if problems:
        raise CrakenError(problems, title="cannot start this run")
    resume_from, resume_warnings = resume_checkpoint(run_dir, request.resume)
    warnings += resume_warnings
    if resume_from is not None:
        resume_from = convert_if_world_changed(resume_from, spec, warnings)
    files = rendered_files(spec, resolved.sources, run_dir)
    argv, env = launch.build(spec, run_dir, environ, hw.cpu_count, request.launcher_args, resume_from)
    prepared = Prepared(resolved, run_dir, argv, env, files, resume_from, warnings, request.test)
    if not request.dry_run:
        if force and not request.resume:
            clear_previous_run(run_dir)
        write_files(files, run_dir, force=True)
    return prepared


def convert_if_world_changed(ckpt: Path, spec, warnings: list[str]) -> Path:
    """A checkpoint from another process count: convert it to DeepSpeed's universal format."""
    from .train import checkpoint

    saved = checkpoint.read_state(ckpt).world_size
    if not saved or saved == spec.world_size:
        return ckpt
    raise CrakenError(
        f"{ckpt} was saved by {saved} processes and this run has {spec.world_size}: convert it first with "
        f"`craken ckpt convert {ckpt}` and resume from the converted folder", title="cannot resume")


def clear_previous_run(run_dir: Path) -> None:
    import shutil

    for name in ("metrics.jsonl", "final_check.pt"):
        (run_dir / name).unlink(missing_ok=True)
    for name in ("checkpoints", "final", "report"):
        shutil.rmtree(run_dir / name, ignore_errors=True)


def execute(prepared: Prepared) -> int:
    from .console import err

    code = launch.run(prepared.argv, prepared.env)
    metrics = prepared.run_dir / "metrics.jsonl"
    if code == 0 and metrics.exists():
        write_report(prepared.run_dir)
    if prepared.test:
        healthy, message = test_health(metrics) if code == 0 else (False, f"the run exited with code {code}")
        err.print(("[green]test training healthy:[/] " if healthy else "[red]test training failed:[/] ") + message)
        return 0 if healthy else (code or 1)
    if code != 0:
        err.print(f"[red]craken: training exited with code {code}[/]; run folder: {prepared.run_dir}")
    return code


def write_report(run_dir: Path) -> None:
    from .console import err

    try:
        from .report import read_metrics, summarize, write_plots
    except ImportError:
        return
    try:
        metrics = read_metrics(run_dir)
        write_plots(metrics, run_dir / "report")
        summary = summarize(metrics)
        err.print(f"report: {run_dir / 'report'} ({summary.get('steps')} steps)")
    except Exception as exc:  # a plotting failure must not fail a finished training
        err.print(f"[yellow]warning:[/] report not written: {exc}")


def test_health(metrics: Path) -> tuple[bool, str]:
    losses = []
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "loss" in rec:
            losses.append(rec["loss"])
    if not losses:
        return False, "no training loss was logged"
    if not all(math.isfinite(x) for x in losses):
        return False, f"non-finite loss: {losses}"
    return True, f"{len(losses)} log lines, loss {losses[0]:.4f} -> {losses[-1]:.4f}, all finite"
