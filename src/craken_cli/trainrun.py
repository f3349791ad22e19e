"""What `craken train` does between parsing and printing, as plain functions:

    prepare(request)  -> spec resolved against the hardware (and the planner under --auto),
                         inputs checked, files rendered into the run folder, (argv, env) built
    execute(prepared) -> launch, then check health (--test) and write the report
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
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
    oom_fallback: bool = True  # under --auto: relaunch with the next strategy after an out-of-memory
    exclude: tuple[tuple[str, int], ...] = ()  # (planner strategy, micro-batch) that ran out of memory


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
    request: TrainRequest | None = None
    auto_choice: str | None = None  # the planner's strategy name under --auto

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
    choice = None
    if request.auto:
        first, _ = resolve(resolved, hw)
        planned, notes, choice = auto_layer(first, hw, exclude=request.exclude)
        resolved, decisions = resolve(resolved, hw, extra_layers=planned)
    else:
        resolved, decisions = resolve(resolved, hw)
    return resolved, decisions.warnings + notes, hw, choice


# What --auto may choose where the user did not set it (Resolved.user_set); model.compile: auto_compile.
AUTO_PATHS = ("zero.stage", "offload.optimizer.device", "offload.param.device", "model.activation_checkpointing",
              "batch.micro_batch", "batch.grad_accum")


def auto_compile(resolved: Resolved, info, hw) -> bool:
    """--auto turns on regional compilation unless the user set it: it is the largest measured speed
    lever (1.1B on one H100: 70,307 tokens/s against 40,101 eager, docs/performance.md), and the
    planner predicts its memory (where: planner.compiles_by_default)."""
    from .planner import compiles_by_default

    return not resolved.user_set("model.compile") and compiles_by_default(info, hw)


def auto_layer(resolved: Resolved, hw, exclude: tuple[tuple[str, int], ...] = ()
               ) -> tuple[tuple[Layer, ...], list[str], str | None]:
    """--auto: the fastest strategy the planner predicts to fit, among those that keep every
    setting the user gave explicitly (file, env or flag); presets and defaults may be changed."""
    from .datasize import micro_batch_cap
    from .modelinfo import model_info
    from .planner import compatible, compiled_where_measured, plan, refusal, smallest_changes, with_compile
    from .sources import unflatten

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
        values.update({f"zero.{k}": None for k in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                                                   "stage3_max_live_parameters", "stage3_max_reuse_distance",
                                                   "gather_16bit_weights_on_save")
                       if not resolved.user_set(f"zero.{k}")})
    note = (f"--auto chose {choice.name}{' + compile' if compile_chosen else ''}, micro-batch {choice.micro_batch} "
            f"x accumulation {choice.grad_accum} (predicted {choice.total_gib:.1f} GiB of "
            f"{result.gpu_memory_gib:.0f} GiB per GPU)")
    return (Layer("auto", "planner", unflatten(values)),), [note], choice.name


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
    if checkpoint.checkpoint_dir(path).is_dir():  # a run folder: its latest good checkpoint
        found, warnings = checkpoint.latest_checkpoint(path)
        if found is None:
            raise CrakenError(f"--resume {resume}: this run folder has no complete checkpoint")
        return found, warnings
    why = checkpoint.problems(path)
    if why:
        raise CrakenError(f"--resume {resume}: this checkpoint is partial or corrupt ({'; '.join(why[:3])}); "
                          "use an earlier one from `craken ckpt list RUN_DIR`")
    return path, []


def prepare(request: TrainRequest, environ: Mapping[str, str], hardware=None) -> Prepared:
    resolved, warnings, hw, choice = resolve_spec(request, environ, hardware)
    spec = resolved.spec
    run_dir = Path(spec.output.run_dir())
    force = request.force or request.test
    problems = (preflight.model_problems(spec) + preflight.data_problems(spec) + preflight.precision_problems(spec)
                + preflight.tracker_problems(spec)
                + preflight.output_problems(run_dir, request.resume, force, spec.cluster.machine_rank)
                + preflight.op_problems(spec, environ) + preflight.nvme_problems(spec, environ))
    if problems:
        raise CrakenError(problems, title="cannot start this run")
    resume_from, resume_warnings = resume_checkpoint(run_dir, request.resume)
    warnings += resume_warnings
    if resume_from is not None:
        resume_from = convert_if_world_changed(resume_from, spec, warnings, run_dir, convert=not request.dry_run)
    files = rendered_files(spec, resolved.sources, run_dir, spec.cluster.machine_rank)
    if resume_from is not None and is_universal(resume_from):
        files = with_universal_load(files, spec.cluster.machine_rank)
    argv, env = launch.build(spec, run_dir, environ, hw.cpu_count, request.launcher_args, resume_from)
    if launch.uses_pdsh(spec):
        held_back = sorted(k for k in environ if launch.is_secret(k))
        if held_back:
            warnings.append(f"--launcher deepspeed: {', '.join(held_back)} not passed to the other machines (DeepSpeed "
                            "would write them into its env file): set them in each machine's own environment")
    prepared = Prepared(resolved, run_dir, argv, env, files, resume_from, warnings, request.test, request, choice)
    if not request.dry_run:
        if force and not request.resume:
            clear_previous_run(run_dir, spec.cluster.machine_rank)
        write_files(files, run_dir, force=True)
        if launch.uses_pdsh(spec):
            launch.seed_deepspeed_env(run_dir / launch.DS_ENV_FILE, Path.home(), Path.cwd())
    return prepared


def convert_if_world_changed(ckpt: Path, spec, warnings: list[str], run_dir: Path, convert: bool = True) -> Path:
    """A checkpoint from another process count, or from the other ZeRO-1 optimizer (fp32 or 16-bit
    gradient accumulation: each reads only its own files): its universal copy (DeepSpeed's
    ds_to_universal), made now unless one exists. With `convert` off (--dry-run) only the path it would have."""
    from . import ckpt_ops
    from .train import checkpoint

    state = checkpoint.read_state(ckpt)
    engine_problem = engine_mismatch(ckpt, state, spec)
    if engine_problem:
        raise CrakenError(f"--resume {ckpt}: {engine_problem}", title="cannot resume")
    if state.universal or not state.world_size or checkpoint.is_plain(ckpt):
        # a run without DeepSpeed holds the whole model and optimizer state in every process: any
        # process count loads it as it is
        return ckpt
    why, fix = [], []
    if state.world_size != spec.world_size:
        why.append(f"was saved by {state.world_size} processes, this run has {spec.world_size}")
        fix.append(f"--num-processes {state.world_size}")
    saved_fp32 = state.fp32_grad_accum
    if spec.uses_deepspeed and saved_fp32 != spec.fp32_grad_accum:
        why.append("was saved with gradients accumulated in " + ("fp32, this run accumulates in 16 bits" if saved_fp32
                                                                 else "16 bits, this run accumulates in fp32"))
        fix.append(f"--set zero.fp32_grad_accum={str(saved_fp32).lower()}")
    if not why:
        return ckpt
    reason = " and ".join(why)
    own = ckpt.parent.resolve() == checkpoint.checkpoint_dir(run_dir).resolve()
    # Into this run's folder, never into another run's.
    out = (ckpt_ops.default_universal_out(ckpt) if own
           else checkpoint.checkpoint_dir(run_dir) / ckpt_ops.UNIVERSAL_DIR / ckpt.name)
    if checkpoint.is_complete(out) and checkpoint.read_state(out).step == state.step:
        warnings.append(f"{ckpt} {reason}: resuming from its universal copy {out}")
        return out
    warnings.append(f"{ckpt} {reason}: converting it to a universal checkpoint in {out}")
    if not convert:
        return out
    try:
        return ckpt_ops.convert(ckpt, out, force=True)
    except CrakenError as exc:
        raise CrakenError(f"{ckpt} {reason}; converting it failed: {exc.problems[0]}; convert it by hand with "
                          f"`craken ckpt convert {ckpt} --out DIR` and resume with --resume DIR, or resume with "
                          f"{' '.join(fix)}", title="cannot resume") from None


def layout(stage: int, deepspeed: bool, offload_optimizer: str) -> str:
    """The layout of a checkpoint's optimizer state. ZeRO-1 and -2 share DeepSpeed's one ZeRO
    optimizer and its shard files (checked: ZeRO-1 resumes at ZeRO-2); ZeRO-3 and stage 0 each
    write their own; optimizer offload steps with DeepSpeed's CPU Adam, whose state keys differ from
    torch's AdamW (ZeRO-1 -> ZeRO-2 with offload fails on 'bias_correction'); no DeepSpeed: Accelerate's."""
    if not deepspeed:
        return "without DeepSpeed (ZeRO stage 0 on GPUs)"
    where = {0: "by DeepSpeed at ZeRO stage 0", 3: "at ZeRO-3"}.get(stage, "at ZeRO-1/2")
    return where + (" with optimizer offload" if offload_optimizer != "none" else " without optimizer offload")


def engine_mismatch(ckpt: Path, state, spec) -> str | None:
    """Why this run cannot load the checkpoint's optimizer shards at all (DeepSpeed fails after the
    launch otherwise), with what to change; None when it can."""
    from .train import checkpoint

    plain = checkpoint.is_plain(ckpt)
    if state.zero_stage is None and not plain:
        return None  # written by an older craken: not recorded
    saved_offload = state.offload_optimizer or "none"
    saved = layout(state.zero_stage or 0, not plain, saved_offload)
    wanted = layout(spec.zero.stage, spec.uses_deepspeed, spec.offload.optimizer.device)
    if saved == wanted:
        return None
    return (f"it was saved {saved}, this run trains {wanted}, whose optimizer state is laid out differently: "
            f"resume with --zero {state.zero_stage or 0} --offload-optimizer {saved_offload}, or start a new run "
            f"from its weights (craken ckpt export {ckpt} --out DIR, then --model DIR)")


def is_universal(ckpt: Path) -> bool:
    from .train import checkpoint

    return checkpoint.is_complete(ckpt) and checkpoint.read_state(ckpt).universal or not ckpt.exists()


def with_universal_load(files: dict[str, str], machine_rank: int = 0) -> dict[str, str]:
    """The DeepSpeed JSON of a launch that resumes from a universal checkpoint. Only that launch:
    the checkpoints it writes are ordinary ones again."""
    from .render import DS_FILE, machine_file

    name = machine_file(DS_FILE, machine_rank)
    cfg = json.loads(files[name])
    cfg["checkpoint"] = {**cfg.get("checkpoint", {}), "load_universal": True}
    return {**files, name: json.dumps(cfg, indent=2) + "\n"}


def clear_previous_run(run_dir: Path, machine_rank: int = 0) -> None:
    """--force: the outputs of the earlier run. A machine of rank > 0 shares machine 0's run folder
    and removes only its own log; machine 0 clears the rest for the whole job."""
    import shutil

    from .train.loop import OOM_MARKER_PREFIX, TENSORBOARD_DIR, metrics_file

    if machine_rank > 0:
        (run_dir / metrics_file(machine_rank)).unlink(missing_ok=True)
        return
    for name in (metrics_file(0), "final_check.pt"):
        (run_dir / name).unlink(missing_ok=True)
    for marker in run_dir.glob(f"{OOM_MARKER_PREFIX}*.json"):
        marker.unlink()
    for name in ("checkpoints", "final", "report", TENSORBOARD_DIR):
        shutil.rmtree(run_dir / name, ignore_errors=True)


def execute(prepared: Prepared) -> int:
    from .console import err

    from .render import RUN_FILE, machine_file
    from .train.loop import metrics_file

    machine_rank = prepared.resolved.spec.cluster.machine_rank
    metrics = prepared.run_dir / metrics_file(machine_rank)
    offset = metrics.stat().st_size if metrics.exists() else 0
    code = launch.run(prepared.argv, prepared.env)
    while code != 0 and (step := oom_step(prepared)) is not None:
        # The existing troubleshooting advice, made automatic: the next strategy in speed order.
        req = prepared.request
        micro_batch = prepared.resolved.spec.batch.micro_batch
        excluded = (*req.exclude, (prepared.auto_choice, micro_batch))
        err.print(f"craken: out of GPU memory with {prepared.auto_choice} at micro-batch {micro_batch}, step {step}; "
                  "relaunching with the next fastest setting the planner predicts to fit: a smaller micro-batch "
                  "or the next strategy (--no-oom-fallback turns this off)", markup=False)
        prepared = prepare(replace(req, exclude=excluded, force=True), environ=os.environ)
        for warning in prepared.warnings:
            err.print(f"warning: {warning}", markup=False)
        code = launch.run(prepared.argv, prepared.env)
    if code == 0 and metrics.exists() and machine_rank == 0:  # one report per job, from machine 0's log
        write_report(prepared.run_dir)
    if prepared.test:
        healthy, message = test_health(metrics) if code == 0 else (False, f"the run exited with code {code}")
        err.print(("[green]test training healthy:[/] " if healthy else "[red]test training failed:[/] ") + message)
        return 0 if healthy else (code or 1)
    from .train.loop import NONFINITE_EXIT

    # torchrun reports any worker exit as 1; the workers' own code is in the metrics' end line.
    end = last_end_event(metrics, offset) if code != 0 else {}
    if end.get("exit_code") in (130, 143):
        # A signal (torchrun adds a SignalException traceback); the workers finished their step and
        # saved a checkpoint: say so, and exit 143 (SIGTERM) / 130 (SIGINT).
        code = end["exit_code"]
        err.print(f"craken: stopped by a signal at step {end.get('steps')}; its checkpoint is saved. Resume with: "
                  f"craken train --config {prepared.run_dir / machine_file(RUN_FILE, machine_rank)} --resume auto",
                  markup=False)
    elif end.get("exit_code") == NONFINITE_EXIT:
        code = NONFINITE_EXIT
        err.print(f"craken: stopped at step {end.get('steps')} on a non-finite loss or gradient norm (advice above); "
                  "no checkpoint was written after it", markup=False)
    elif code != 0:
        err.print(f"[red]craken: training exited with code {code}[/]; run folder: {prepared.run_dir}")
    return code


def last_end_event(metrics: Path, offset: int = 0) -> dict:
    """The end line of this launch (metrics written after `offset`), or {} when it wrote none."""
    try:
        with open(metrics, "rb") as fh:
            fh.seek(offset)
            last = json.loads(fh.read().decode().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return {}
    return last if last.get("event") == "end" else {}


def oom_step(prepared: Prepared) -> int | None:
    """The step at which a process of an --auto run ran out of memory (its marker), if it did."""
    from .train.loop import OOM_MARKER_PREFIX

    req = prepared.request
    if req is None or not req.auto or not req.oom_fallback or prepared.auto_choice is None:
        return None
    steps = []
    for marker in prepared.run_dir.glob(f"{OOM_MARKER_PREFIX}*.json"):
        try:
            steps.append(int(json.loads(marker.read_text())["step"]))
        except (OSError, ValueError, KeyError, TypeError):
            steps.append(0)
    return min(steps) if steps else None


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
