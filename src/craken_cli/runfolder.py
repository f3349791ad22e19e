"""A run folder's layout, the exit codes, and crash-safe writes: one place, imported by the CLI and by
every training process alike (what accelerate's `ProjectConfiguration` is to its users).

    RUN/craken-run.json           marker: this folder is a craken run (what --force may clear, and what not)
    RUN/.craken.lock              held (fcntl.flock) by the live `craken train` of this folder
    RUN/run.yaml, accelerate.yaml, ds_config.json     rendered files (machine R: run-machineR.yaml, ...)
    RUN/metrics.jsonl             metrics of machine 0 (machine R: metrics-machineR.jsonl)
    RUN/checkpoints/              step_N/ checkpoints, `latest`, universal/ copies
    RUN/model_meta/               model config + tokenizer, for export
    RUN/final/, final_check.pt    the trained HF model, and its logits on a fixed batch
    RUN/report/                   PNG plots
    RUN/tensorboard/              event files of --report-to tensorboard
    RUN/oom-rank<R>.json          out-of-memory marker of process R (--auto relaunches)

Standard library only: `craken --help` and the workers both import it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

RUN_FILE = "run.yaml"
DS_FILE = "ds_config.json"
ACCELERATE_FILE = "accelerate.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
MODEL_META = "model_meta"
FINAL = "final"
FINAL_CHECK = "final_check.pt"
REPORT = "report"
TENSORBOARD = "tensorboard"
OOM_MARKER_PREFIX = "oom-rank"
DS_ENV_FILE = ".deepspeed_env"  # DeepSpeed's env file of a pdsh launch, in the run folder
MARKER = "craken-run.json"
LOCK = ".craken.lock"

# Everything a run writes into its folder: --force clears these (each only if this run wrote it).
OUTPUT_DIRS = (CHECKPOINTS, MODEL_META, FINAL, REPORT, TENSORBOARD)
# In a folder craken writes (final/, model_meta/, report/, an export): the files it wrote there, so that
# replacing or clearing the folder keeps what someone else put in it.
WRITTEN_LIST = ".craken-written"
OUTPUT_FILES = (METRICS, FINAL_CHECK)

# The exit codes of `craken` and of its training processes.
EXIT_CODES = {
    "ok": 0,
    "failed": 1,  # a training process failed (its message says why)
    "bad_input": 2,  # CrakenError: a problem the user can fix, reported before anything ran
    "nonfinite": 3,  # a non-finite loss or gradient norm stopped the run (train.on_nonfinite=stop)
    "out_of_memory": 4,  # a process ran out of GPU memory (--auto relaunches)
    "disk_full": 5,  # the run folder's disk cannot hold the next checkpoint (the previous one is kept)
    "sigint": 130,  # stopped by Ctrl-C after saving a checkpoint
    "sigterm": 143,  # stopped by SIGTERM after saving a checkpoint
}
# craken doctor's verdict -> exit code; the order is the severity.
VERDICT_EXIT = {"ok": 0, "warn": 1, "fail": 2}


def machine_file(name: str, machine_rank: int) -> str:
    """A file's name in a run folder that every machine of a job shares (what `craken cluster slurm`
    sets up): machine 0 keeps the plain name, machine R writes e.g. accelerate-machine1.yaml, so no
    machine overwrites what another one's processes read."""
    if machine_rank == 0:
        return name
    stem, dot, suffix = name.partition(".")
    return f"{stem}-machine{machine_rank}{dot}{suffix}"


def metrics_file(machine_rank: int) -> str:
    return machine_file(METRICS, machine_rank)


def oom_marker(rank: int) -> str:
    return f"{OOM_MARKER_PREFIX}{rank}.json"


def fsync_tree(root: Path) -> None:
    """Every file and folder under `root` on disk, so a rename after it publishes complete content."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_mode() -> int:
    """The mode a plain `open()` would give a new file: 0666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, text: str, private: bool = False) -> None:
    """Write `text` to `path` so that a reader sees the old content or the new, never half; a failed
    write (a full disk) leaves no temporary file behind. The mode follows the umask, except a
    `private` file (one that may hold secrets) stays 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if not private:  # mkstemp's 0600 would hide the run from teammates on a shared disk
            os.fchmod(fd, file_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# What is a craken run, and what --force may clear


def lock_file(machine_rank: int) -> str:
    return LOCK if machine_rank == 0 else f".craken-machine{machine_rank}.lock"


def read_marker(run_dir: Path) -> dict | None:
    """The marker of a craken run folder; None when the folder is not one (or the marker is unreadable)."""
    import json

    try:
        data = json.loads((Path(run_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("craken_run") == 1 else None


def write_marker(run_dir: Path) -> None:
    """Claim a run folder for craken: the marker lists what was in the folder before, which --force
    never removes. Written once, when a run first writes into the folder."""
    import json

    run_dir = Path(run_dir)
    if read_marker(run_dir) is not None:
        return
    before = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".craken")) if run_dir.is_dir() else []
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / MARKER, json.dumps({"craken_run": 1, "preexisting": before}, indent=1) + "\n")


def protected(path: Path, reads: tuple[Path, ...] = (), cwd: Path | None = None, home: Path | None = None
              ) -> str | None:
    """Why craken must never clear or replace `path`, or None: the filesystem root, a top-level
    folder (/etc, /home), the home folder or the working folder or a folder above either, or a folder
    holding (or being) what this command reads."""
    target = Path(os.path.abspath(Path(path).expanduser()))
    cwd = Path(os.path.abspath(cwd or Path.cwd()))
    home = Path(os.path.abspath(home or Path.home()))
    if len(target.parts) <= 2:
        return "the filesystem root or a top-level folder" if len(target.parts) == 1 or target != home \
            else "your home folder"
    for name, place in (("the working folder", cwd), ("your home folder", home)):
        if target == place:
            return name
        if target in place.parents:
            return f"a folder above {name}"
    for item in reads:
        item = Path(os.path.abspath(item))
        if target == item or target in item.parents:
            return f"{'' if target == item else 'a folder holding '}{item}, which this command reads"
    return None


def foreign_outputs(run_dir: Path) -> list[str]:
    """Entries of `run_dir` named like a run's outputs although no craken run wrote them (the folder has
    no marker): --force refuses to clear such a folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or read_marker(run_dir) is not None:
        return []
    names = (RUN_FILE, *OUTPUT_FILES, *OUTPUT_DIRS)
    return sorted(name for name in names if (run_dir / name).exists())


def note_written(folder: Path, paths=None) -> None:
    """Add `paths` to the folder's list of what craken wrote; without `paths` the list is every file under
    `folder` (one craken has just written whole)."""
    folder = Path(folder)
    if paths is None:
        names, found = set(), (p for p in folder.rglob("*") if p.is_file())
    else:
        names, found = set(written_files(folder) or ()), map(Path, paths)
    names |= {Path(p).resolve().relative_to(folder.resolve()).as_posix() for p in found}
    names.discard(WRITTEN_LIST)
    atomic_write(folder / WRITTEN_LIST, "".join(f"{name}\n" for name in sorted(names)))


def written_files(folder: Path) -> set[str] | None:
    """What craken wrote in `folder` (relative paths), or None where it kept no list (before 2026-12-04)."""
    listed = Path(folder) / WRITTEN_LIST
    return set(listed.read_text(encoding="utf-8").splitlines()) if listed.is_file() else None


def foreign_files(folder: Path) -> list[str]:
    """Files under `folder` craken did not write (none where it kept no list: it wrote the folder whole)."""
    written = written_files(folder)
    if written is None:
        return []
    return sorted(rel for rel in (p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())
                  if rel not in written and rel != WRITTEN_LIST)


def remove_written(folder: Path) -> None:
    """What craken wrote in `folder` goes, then the folders left empty; anything else stays."""
    import shutil

    folder = Path(folder)
    written = written_files(folder)
    if written is None:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for rel in written:
        (folder / rel).unlink(missing_ok=True)
    (folder / WRITTEN_LIST).unlink(missing_ok=True)
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        _remove_if_empty(sub)
    _remove_if_empty(folder)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def clear(run_dir: Path, machine_rank: int = 0) -> None:
    """--force: remove the outputs of the earlier run in this (craken) run folder, nothing else: what
    was there before the run (the marker's list) stays, in checkpoints/ only checkpoint folders go, and in
    final/, model_meta/ and report/ only the files craken wrote (their WRITTEN_LIST).
    A machine of rank > 0 shares machine 0's folder and removes only its own log."""
    import shutil

    run_dir = Path(run_dir)
    marker = read_marker(run_dir)
    if marker is None:
        return
    keep = set(marker.get("preexisting") or [])
    if machine_rank > 0:
        (run_dir / metrics_file(machine_rank)).unlink(missing_ok=True)
        return
    for name in OUTPUT_FILES:
        if name not in keep:
            (run_dir / name).unlink(missing_ok=True)
    for oom in run_dir.glob(f"{OOM_MARKER_PREFIX}*.json"):
        if oom.name not in keep:
            oom.unlink()
    for name in OUTPUT_DIRS:
        if name in keep:
            continue
        if name == CHECKPOINTS:
            clear_checkpoints(run_dir / CHECKPOINTS)
        elif name == TENSORBOARD:
            shutil.rmtree(run_dir / name, ignore_errors=True)
        else:
            remove_written(run_dir / name)


def is_checkpoint_name(name: str) -> bool:
    import re

    return bool(re.fullmatch(r"\.?(tmp_)?step_\d+", name)) or name in ("latest", "universal")


def clear_checkpoints(root: Path) -> None:
    """Checkpoint folders, their temporary folders, `latest` and universal copies; a file of the
    user's own in checkpoints/ stays (and so does the folder then)."""
    import shutil

    if not root.is_dir():
        return
    for item in root.iterdir():
        if not is_checkpoint_name(item.name):
            continue
        if item.name == "universal" and item.is_dir():
            clear_checkpoints(item)
            try:
                item.rmdir()
            except OSError:
                pass
        elif item.is_dir():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
    try:
        root.rmdir()
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# One run per folder


_HELD: dict[str, int] = {}  # lock file -> open descriptor, for as long as this process lives


def lock_holder(run_dir: Path, machine_rank: int = 0) -> str | None:
    """Who holds this folder's run lock (its pid as written into the file), or None when nobody does.
    Reads only: a folder without a lock file is free."""
    import fcntl

    path = Path(run_dir) / lock_file(machine_rank)
    if str(path.absolute()) in _HELD or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return Path(path).read_text().strip() or "?"
    finally:
        os.close(fd)  # closing releases a lock taken here
    return None


def acquire_lock(run_dir: Path, machine_rank: int = 0) -> int:
    """Hold this folder's run lock until the process ends (the kernel drops it with the process, also on
    SIGKILL); returns its descriptor (passed on to the launcher, which holds it while workers live).
    Raises BlockingIOError when another live process holds it."""
    import fcntl

    path = Path(run_dir) / lock_file(machine_rank)
    key = str(path.absolute())
    if key in _HELD:
        return _HELD[key]
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = fd
    return fd


# ---------------------------------------------------------------------------------------------
# Disk space


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def existing_parent(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_point(path: Path) -> Path:
    path = existing_parent(path)
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    import shutil

    return shutil.disk_usage(existing_parent(path)).free


def disk_message(path: Path, needed: int, what: str, hint: str = "") -> str:
    """Which disk is too small, and by how much, for `what` in `path`."""
    return (f"the disk of {path} (mounted at {mount_point(path)}) has {human_bytes(free_bytes(path))} free, {what} "
            f"needs about {human_bytes(needed)}: free space there{hint}, or choose a folder on a larger disk")


def is_disk_full(exc: BaseException) -> bool:
    import errno

    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def remove_partial_writes(run_dir: Path) -> None:
    """Temporary folders of a save that did not finish (a killed process, a full disk): nothing
    reads them and they can keep a disk full. Only while this process holds the folder's lock."""
    import shutil

    for root in (Path(run_dir) / CHECKPOINTS, Path(run_dir) / CHECKPOINTS / "universal", Path(run_dir)):
        if root.is_dir():
            for tmp in root.glob(".tmp_*"):
                shutil.rmtree(tmp, ignore_errors=True)
    for name in (f".{FINAL}.tmp", f".{MODEL_META}.tmp"):
        shutil.rmtree(Path(run_dir) / name, ignore_errors=True)


def drop_metrics_after(metrics: Path, step: int) -> None:
    """A resume from the checkpoint of `step` trains the later steps again: their lines go, so the log
    reads as one run (a line cut by a kill goes too)."""
    import json

    if step < 0 or not Path(metrics).is_file():
        return
    kept = []
    for line in Path(metrics).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        at = record.get("steps") if record.get("event") == "end" else record.get("step")
        if isinstance(at, (int, float)) and at > step:
            continue
        kept.append(line)
    atomic_write(Path(metrics), "".join(f"{line}\n" for line in kept))
