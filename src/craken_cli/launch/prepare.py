"""What `craken train` does between parsing and launching, as plain functions shared with
`craken launch`:

    resolve_spec(request)  -> spec resolved against the hardware (and the planner under --auto)
    prepare(request)       -> inputs checked, resume point found, files rendered into the run
                              folder, (argv, env) built

process.execute(prepared) then launches it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..ckpt.resume import convert_if_world_changed, is_universal, resume_checkpoint, with_universal_load
from ..ckpt.startover import claim_run_folder, clear_previous_run, drop_metrics_after_resume
from ..config.options import SpecArgs, layers
from ..config.sources import SourcedSpec, build_spec
from ..errors import CrakenError
from ..plan.auto import auto_layer
from ..report.verdict import smoke_test_layer
from ..runfolder import DS_ENV_FILE
from ..train import fp8
from . import command, preflight, userscript
from .hubcheck import hub_problems
from .render import rendered_files, write_files
from .userscript import Target

@dataclass
class TrainRequest:
    spec_args: SpecArgs
    auto: bool = False
    test: bool = False
    dry_run: bool = False
    resume: str | None = None
    force: bool = False
    launcher_args: list[str] = field(default_factory=list)
    oom_fallback: bool = True  # under --auto: relaunch with the next strategy after an out-of-memory
    exclude: tuple[tuple[str, int], ...] = ()  # (planner strategy, micro-batch) that ran out of memory
    script: Target | None = None  # craken launch: the user's script instead of craken's loop
    ds_optimizer: bool | None = None  # craken launch: keep DeepSpeed's optimizer in the JSON (None: under offload)


@dataclass
class Prepared:
    resolved: SourcedSpec
    run_dir: Path
    argv: list[str]
    env: dict[str, str]
    files: dict[str, str]
    resume_from: Path | None
    warnings: list[str]
    test: bool
    request: TrainRequest | None = None
    auto_choice: str | None = None  # the planner's strategy name under --auto
    lock_fd: int | None = None  # the run folder's lock, held by this process and the launcher

    @property
    def env_shown(self) -> dict[str, str]:
        """The variables craken sets or changes, secrets redacted."""
        base = os.environ
        changed = {k: v for k, v in self.env.items() if base.get(k) != v}
        return command.redact_env(changed)

    @property
    def argv_shown(self) -> list[str]:
        """The command as --dry-run prints it: a script's own arguments may carry a token or a URL's password."""
        return [command.redact_text(arg) for arg in self.argv]

    @property
    def files_shown(self) -> dict[str, str]:
        return self.files



def resolve_spec(request: TrainRequest, environ: Mapping[str, str], hardware=None):
    from ..plan import hardware as hw_mod
    from ..plan.resolve import resolve

    source_layers = layers(request.spec_args, environ)
    sourced = build_spec(source_layers, nvme_path=request.spec_args.nvme_path)
    if request.test:
        sourced = build_spec([*source_layers, smoke_test_layer(sourced.spec)], nvme_path=request.spec_args.nvme_path)
    hw = hardware if hardware is not None else hw_mod.detect()
    notes: list[str] = []
    choice = None
    model_unknown = sourced.sources.get("model.name_or_path", "default") == "default"
    if request.auto and request.script is not None and model_unknown:
        raise CrakenError("--auto plans for the model your script trains, and craken does not know it: pass --model "
                          "PATH_OR_HUB_ID (or set model.name_or_path in craken.yaml)", title="cannot plan this run")
    if request.auto:
        first, _ = resolve(sourced, hw)
        planned, notes, choice = auto_layer(first, hw, exclude=request.exclude)
        resolved, decisions = resolve(sourced, hw, extra_layers=planned)
    else:
        resolved, decisions = resolve(sourced, hw)
    return resolved, decisions.warnings + notes, hw, choice


def kept_ds_blocks(spec, request: TrainRequest) -> tuple[bool, bool, userscript.DummyUse]:
    """(optimizer kept, scheduler kept, the script's DummyOptim/DummyScheduler) for a user script's JSON."""
    source = userscript.script_source(request.script)
    raw, dummy = userscript.engine_without_optimizer(source), userscript.dummy_use(source)
    return (userscript.keeps_ds_optimizer(spec, request.ds_optimizer, engine_without_optimizer=raw, dummy=dummy),
            userscript.keeps_ds_scheduler(spec, request.ds_optimizer, engine_without_optimizer=raw, dummy=dummy),
            dummy)


def script_problems(spec, run_dir: Path, request: TrainRequest, kept) -> list[str]:
    """`kept`: kept_ds_blocks of the script (None without one)."""
    if request.script is None:
        return command.launcher_arg_problems(request.launcher_args)
    keep, keep_scheduler, dummy = kept
    return (userscript.target_problems(request.script)
            + userscript.dummy_problems(spec, request.ds_optimizer, dummy)
            + userscript.arg_problems(spec, run_dir, request.script, keep, keep_scheduler))


def prepare(request: TrainRequest, environ: Mapping[str, str], hardware=None) -> Prepared:
    resolved, warnings, hw, choice = resolve_spec(request, environ, hardware)
    spec = resolved.spec
    run_dir = Path(spec.output.run_dir())
    force = request.force or request.test
    folder_problems = preflight.output_problems(run_dir, request.resume, force, spec.cluster.machine_rank)
    if request.dry_run and run_dir.is_dir():  # writes nothing: shows the run, and what the real one would meet
        warnings += [f"without --dry-run: {problem}" for problem in folder_problems]
        folder_problems = []
    kept = kept_ds_blocks(spec, request) if request.script is not None else None
    problems = (preflight.model_problems(spec) + hub_problems(spec, environ) + preflight.data_problems(spec)
                + preflight.precision_problems(spec) + preflight.schedule_problems(spec)
                + preflight.tracker_problems(spec) + preflight.output_name_problems(spec)
                + folder_problems
                + preflight.deepspeed_extra_problems(spec) + preflight.cpu_optimizer_problems(spec)
                + preflight.op_problems(spec, environ) + preflight.nvme_problems(spec, environ)
                + fp8.install_problems(spec.precision) + script_problems(spec, run_dir, request, kept))
    if problems:
        raise CrakenError(problems, title="cannot start this run")
    resume_from, resume_warnings = resume_checkpoint(run_dir, request.resume)
    warnings += resume_warnings
    if resume_from is not None:
        resume_from = convert_if_world_changed(resume_from, spec, warnings, run_dir, convert=not request.dry_run)
    files = rendered_files(spec, resolved.sources, run_dir, spec.cluster.machine_rank,
                           script=request.script is not None)
    if resume_from is not None and is_universal(resume_from):
        files = with_universal_load(files, spec.cluster.machine_rank)
    script_args = None
    if request.script is not None:
        keep, keep_scheduler, _ = kept
        files = userscript.script_files(files, spec.cluster.machine_rank, keep, keep_scheduler)
        script_args = request.script.host_args
    argv, env = command.build(spec, run_dir, environ, hw.cpu_count, request.launcher_args, resume_from, script_args)
    if request.script is not None:
        env.update(userscript.plan_env(spec, run_dir, keep, keep_scheduler))
    if command.uses_pdsh(spec):
        held_back = sorted(k for k, v in environ.items() if command.is_secret(k, v))
        if held_back:
            warnings.append(f"--launcher deepspeed: {', '.join(held_back)} not passed to the other machines (DeepSpeed "
                            "would write them into its env file): set them in each machine's own environment")
    prepared = Prepared(resolved, run_dir, argv, env, files, resume_from, warnings, request.test, request, choice)
    if not request.dry_run:
        prepared.lock_fd = claim_run_folder(run_dir, spec.cluster.machine_rank)
        if force and not request.resume:
            clear_previous_run(run_dir, spec.cluster.machine_rank)
        if resume_from is not None:
            drop_metrics_after_resume(run_dir, spec.cluster.machine_rank, resume_from)
        write_files(files, run_dir, force=True)
        if command.uses_pdsh(spec):
            command.seed_deepspeed_env(run_dir / DS_ENV_FILE, Path.home(), Path.cwd())
    return prepared
