"""--resume: which checkpoint a run continues from, whether this run can load its optimizer state,
and its universal copy when the process count or the ZeRO-1 optimizer changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from ..errors import CrakenError
from ..launch import preflight

def resume_checkpoint(run_dir: Path, resume: str | None) -> tuple[Path | None, list[str]]:
    from ..train import checkpoint

    if not resume:
        return None, []
    if resume == "auto":
        found, warnings = checkpoint.latest_checkpoint(run_dir)
        if found is None:
            # the newest broken one says why (skipped: its warning)
            why = f" ({warnings[0].removeprefix('skipping ')})" if warnings else ""
            raise CrakenError(f"--resume auto: no complete checkpoint in {run_dir / 'checkpoints'}{why}: "
                              "nothing to continue: run again with --force instead of --resume to start over in this "
                              "folder, or name a checkpoint folder with --resume", title="cannot resume")
        return found, warnings
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise CrakenError(f"--resume {resume}: no such checkpoint folder; use --resume auto or a path "
                          "from `craken ckpt list RUN_DIR`", title="cannot resume")
    if checkpoint.checkpoint_dir(path).is_dir():  # a run folder: its latest good checkpoint
        found, warnings = checkpoint.latest_checkpoint(path)
        if found is None:
            raise CrakenError(f"--resume {resume}: this run folder has no complete checkpoint (`craken ckpt list "
                              f"{resume}` says why): name another checkpoint, or drop --resume", title="cannot resume")
        return found, warnings
    why = checkpoint.problems(path, verify=True)
    if why:
        raise CrakenError(f"--resume {resume}: this checkpoint is partial or corrupt ({'; '.join(why[:3])}); "
                          "use an earlier one from `craken ckpt list RUN_DIR`", title="cannot resume")
    return path, []


def convert_if_world_changed(ckpt: Path, spec, warnings: list[str], run_dir: Path, convert: bool = True) -> Path:
    """A checkpoint from another process count, or from the other ZeRO-1 optimizer (fp32 or 16-bit
    gradient accumulation: each reads only its own files): its universal copy (DeepSpeed's
    ds_to_universal), made now unless one exists. With `convert` off (--dry-run) only the path it would have."""
    from . import manage
    from ..train import checkpoint

    state = checkpoint.read_state(ckpt)
    engine_problem = engine_mismatch(ckpt, state, spec)
    problems = [engine_problem] if engine_problem else []
    problems += preflight.resume_problems(ckpt, state, spec)
    if problems:
        raise CrakenError([f"--resume {ckpt}: {p}" for p in problems], title="cannot resume")
    for note in (schedule_change(state, spec), data_change(state, spec)):
        if note:
            warnings.append(f"--resume {ckpt}: {note}")
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
    out = (manage.default_universal_out(ckpt) if own
           else checkpoint.checkpoint_dir(run_dir) / manage.UNIVERSAL_DIR / ckpt.name)
    if checkpoint.is_complete(out) and checkpoint.read_state(out).step == state.step:
        warnings.append(f"{ckpt} {reason}: resuming from its universal copy {out}")
        return out
    warnings.append(f"{ckpt} {reason}: converting it to a universal checkpoint in {out}")
    if not convert:
        return out
    try:
        return manage.convert(ckpt, out, force=True)
    except CrakenError as exc:
        raise CrakenError(f"{ckpt} {reason}; converting it failed: {exc.problems[0]}; convert it by hand with "
                          f"`craken ckpt convert {ckpt} --out DIR` and resume with --resume DIR, or resume with "
                          f"{' '.join(fix)}", title="cannot resume") from None


def schedule_change(state, spec) -> str | None:
    """How the lr of the resumed steps differs from the run the checkpoint came from (a new --max-steps
    stretches the schedule, a new --lr scales it), with the flags that keep it; None when it does not.
    Neither engine keeps the schedule's length in its checkpoint: the resumed launch's applies."""
    from ..train.schedule import deepspeed_block, lr_lambda

    if state.lr_schedule is None or state.lr is None:
        return None  # a checkpoint of an older craken
    block = deepspeed_block(spec)
    if block == state.lr_schedule and spec.optimizer.lr == state.lr:
        return None
    try:
        before = lr_lambda(state.lr_schedule, state.lr)(state.step + 1) * state.lr
        after = lr_lambda(block, spec.optimizer.lr)(state.step + 1) * spec.optimizer.lr
    except (KeyError, TypeError, ValueError):
        return None
    keep = [f"--max-steps {state.max_steps}"] if state.max_steps not in (None, spec.train.max_steps) else []
    keep += [f"--lr {state.lr:g}"] if state.lr != spec.optimizer.lr else []
    changed = ", ".join(keep) or "the schedule settings (schedule.*) it was trained with"
    return (f"the lr schedule differs from the one it was trained with: the lr of step {state.step + 1} is "
            f"{after:.3g} instead of {before:.3g}; resume with {changed} to keep it")


def data_change(state, spec) -> str | None:
    """How this run's data differs from the data the checkpoint's position counts in (None when it does
    not, or for a checkpoint of an older craken). Said, not refused: appending rows or fixing a file and
    continuing is a choice; continuing unaware on another stream is not."""
    from ..train.data import fingerprint

    if not state.data:
        return None
    try:
        now = fingerprint(spec)
    except (ValueError, OSError):  # data that cannot be listed: the pre-launch data check names the problem
        return None
    changed = [f"{key} {state.data.get(key)!r} -> {now.get(key)!r}" for key in ("dataset", "split", "eval_split",
                                                                                  "format")
               if key in state.data and state.data.get(key) != now.get(key)]
    before, after = state.data.get("files") or {}, now.get("files") or {}
    changed += [f"{name} {'added' if name not in before else 'removed' if name not in after else 'changed'}"
                for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]
    if not changed:
        return None
    shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
    return (f"the data differs from what it was trained on ({shown}): the run continues at its data position "
            f"(epoch {state.epoch}, {state.batch_in_epoch} micro-batches per process into it) in this data, "
            "another stream than the one it left; resume with the data it was trained on to continue that one")


class OptimizerLayout(NamedTuple):
    """How a checkpoint's optimizer state is laid out. ZeRO-1 and -2 share DeepSpeed's one ZeRO
    optimizer and its shard files (checked: ZeRO-1 resumes at ZeRO-2); ZeRO-3 and stage 0 each
    write their own; optimizer offload steps with DeepSpeed's CPU Adam, whose state keys differ from
    torch's AdamW (ZeRO-1 -> ZeRO-2 with offload fails on 'bias_correction'); no DeepSpeed: Accelerate's."""

    deepspeed: bool
    stages: str  # "0", "1/2" or "3" (for deepspeed=False always "0")
    offloaded: bool

    def describe(self) -> str:
        if not self.deepspeed:
            return "without DeepSpeed (ZeRO stage 0 on GPUs)"
        where = {"0": "by DeepSpeed at ZeRO stage 0", "1/2": "at ZeRO-1/2", "3": "at ZeRO-3"}[self.stages]
        return where + (" with optimizer offload" if self.offloaded else " without optimizer offload")


def layout(stage: int, deepspeed: bool, offload_optimizer: str) -> OptimizerLayout:
    if not deepspeed:
        return OptimizerLayout(False, "0", False)
    return OptimizerLayout(True, {0: "0", 3: "3"}.get(stage, "1/2"), offload_optimizer != "none")


def engine_mismatch(ckpt: Path, state, spec) -> str | None:
    """Why this run cannot load the checkpoint's optimizer shards at all (DeepSpeed fails after the
    launch otherwise), with what to change; None when it can."""
    from ..train import checkpoint

    plain = checkpoint.is_plain(ckpt)
    if state.zero_stage is None and not plain:
        return None  # written by an older craken: not recorded
    saved_offload = state.offload_optimizer or "none"
    saved = layout(state.zero_stage or 0, not plain, saved_offload)
    wanted = layout(spec.zero.stage, spec.uses_deepspeed, spec.offload.optimizer.device)
    if saved == wanted:
        return None
    return (f"it was saved {saved.describe()}, this run trains {wanted.describe()}, whose optimizer state is laid out differently: "
            f"resume with --zero {state.zero_stage or 0} --offload-optimizer {saved_offload}, or start a new run "
            f"from its weights (craken ckpt export {ckpt} --out DIR, then --model DIR)")


def is_universal(ckpt: Path) -> bool:
    from ..train import checkpoint

    return checkpoint.is_complete(ckpt) and checkpoint.read_state(ckpt).universal or not ckpt.exists()


def with_universal_load(files: dict[str, str], machine_rank: int = 0) -> dict[str, str]:
    """The DeepSpeed JSON of a launch that resumes from a universal checkpoint. Only that launch:
    the checkpoints it writes are ordinary ones again."""
    from ..launch.render import DS_FILE, machine_file

    name = machine_file(DS_FILE, machine_rank)
    cfg = json.loads(files[name])
    cfg["checkpoint"] = {**cfg.get("checkpoint", {}), "load_universal": True}
    return {**files, name: json.dumps(cfg, indent=2) + "\n"}
