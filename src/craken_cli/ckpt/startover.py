"""A run's hold on its folder: claimed (marker, lock), cleared on --force of only what a craken run
wrote (runfolder.clear), the log cut back to the checkpoint a resume starts from."""

from __future__ import annotations

from pathlib import Path

from .. import runfolder
from ..errors import CrakenError
from ..launch import preflight


def clear_previous_run(run_dir: Path, machine_rank: int = 0) -> None:
    """--force: the outputs of the earlier run (runfolder.clear: only what a craken run wrote). A machine
    of rank > 0 shares machine 0's run folder and removes only its own log."""
    runfolder.clear(run_dir, machine_rank)


def claim_run_folder(run_dir: Path, machine_rank: int) -> int:
    """Mark the folder as a craken run and hold its lock while this run lives (its descriptor)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = runfolder.acquire_lock(run_dir, machine_rank)
        if machine_rank == 0:
            runfolder.remove_partial_writes(run_dir)  # no live run writes them: it would hold the lock
        runfolder.write_marker(run_dir)
        return fd
    except BlockingIOError:
        holder = runfolder.lock_holder(run_dir, machine_rank) or "?"
        raise CrakenError(preflight.lock_message(run_dir, holder), title="cannot start this run") from None
    except OSError as exc:
        why = runfolder.disk_message(run_dir, 1 << 20, "the run files") if runfolder.is_disk_full(exc) \
            else f"{exc.strerror or exc}: choose a writable --output-dir"
        raise CrakenError(f"cannot write into run folder {run_dir}: {why}", title="cannot start this run") from None


def drop_metrics_after_resume(run_dir: Path, machine_rank: int, resume_from: Path) -> None:
    """The lines logged after the checkpoint a resume goes back to are trained again: they go."""
    from ..train import checkpoint

    runfolder.drop_metrics_after(run_dir / runfolder.metrics_file(machine_rank), checkpoint.saved_step(resume_from))
