"""--force: remove the outputs of the earlier run in a run folder before the new run writes."""

from __future__ import annotations

from pathlib import Path

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
