"""accelerate launch, without the launcher's tracebacks:

    python -m craken_cli.launch.launcher [--failure-file PATH] ACCELERATE LAUNCH ARGS...

`craken train` and `craken launch` start their workers through this module. It runs accelerate's
launch command in this process; when a worker fails, torchrun raises ChildFailedError (and
SignalException on Ctrl-C / SIGTERM), which accelerate lets through as a traceback. Here they become
an exit code: the first failed worker's own code (128 + N after a signal), and the failures, read
from torchrun's per-rank error files (TORCHELASTIC_ERROR_FILE: what the worker recorded, its
exception's last line), are written as JSON to PATH for craken to word its one message from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FAILURE_FLAG = "--failure-file"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    failure_file = None
    if args[:1] == [FAILURE_FLAG]:
        failure_file, args = Path(args[1]), args[2:]

    import logging

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torchrun's own "failed (exitcode: 1) local_rank: 0 (pid ...)" lines: craken words the failure itself
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    parsed = launch_command_parser().parse_args(args)
    try:
        launch_command(parsed)
    except ChildFailedError as exc:
        failures = sorted((failure_record(rank, f) for rank, f in exc.failures.items()), key=first_cause)
        write_failures(failure_file, failures)
        return worker_exit_code(failures[0]["exitcode"])
    except SignalException as exc:
        stopped = {"rank": None, "exitcode": -int(exc.sigval), "message": f"signal {exc.sigval.name}", "time": 0.0}
        write_failures(failure_file, [stopped])
        return 128 + int(exc.sigval)
    except subprocess.CalledProcessError as exc:  # the pdsh launcher (DeepSpeed's runner) of a multi-machine job
        write_failures(failure_file, [{"rank": None, "exitcode": exc.returncode, "message": "", "time": 0.0}])
        return exc.returncode
    except KeyboardInterrupt:
        return 130
    return 0


def failure_record(rank: int, failure) -> dict:
    """One failed worker: its global rank, exit code, the last line of what it recorded, and when (and the
    problems it listed, kept a list)."""
    # Without an error file torchrun makes up "Signal 9 (SIGKILL)" or a pointer to its docs: not the worker's words.
    data = failure.error_file_data.get("message")
    recorded = data not in (None, "<NONE>")
    message = data.get("message", "") if isinstance(data, dict) else str(data or "")
    extra = data.get("extraInfo", {}) if isinstance(data, dict) else {}
    when = float(extra.get("time", failure.timestamp))  # script_host records it to the microsecond
    record = {"rank": rank, "exitcode": failure.exitcode, "message": last_line(message) if recorded else "",
              "time": when}
    if isinstance(extra.get("problems"), list):
        record["problems"] = [str(p) for p in extra["problems"]]
    return record


def first_cause(record: dict) -> tuple:
    """The failure that started it first: a worker that recorded its exception, earliest first, then one
    that exited by itself (the others mostly followed it: "Connection closed by peer", or were stopped by
    torchrun's signal)."""
    return (not record["message"], record["exitcode"] < 0, record["time"], record["rank"])


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def worker_exit_code(code: int) -> int:
    return 128 - code if code < 0 else code  # a worker killed by signal N: 128 + N, as a shell reports it


def record_error(exc: BaseException, problems: list[str] | None = None) -> bool:
    """This worker's torchrun error file (TORCHELASTIC_ERROR_FILE), in the format of torch's `@record`
    (ErrorHandler.record_exception), plus the time to the microsecond, by which the failure that came
    first is named, and `problems` (a list, one entry each) for craken to word; False where torchrun
    asked for none."""
    import os
    import time
    import traceback

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    now = time.time()
    data = {"message": {"message": f"{type(exc).__name__}: {exc}", "extraInfo": {
        "py_callstack": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "timestamp": str(int(now)), "time": now}}}
    if problems:
        data["message"]["extraInfo"]["problems"] = list(problems)
    try:
        Path(path).write_text(json.dumps(data))
    except OSError:  # the file only improves craken's message; the failure itself is printed by the worker
        return False
    return True


def write_failures(path: Path | None, failures: list[dict]) -> None:
    if path is not None:
        path.write_text(json.dumps(failures))


def read_failures(path: Path) -> list[dict]:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return found if isinstance(found, list) else []


def failure_summary(failures: list[dict]) -> str:
    """'rank 1 exited with code 1: ValueError: boom' for the first failed worker, with how many more."""
    if not failures:
        return ""
    first = failures[0]
    if first.get("rank") is None:
        return f"the launcher was stopped by {first['message']}" if first.get("message") else \
            f"the launcher exited with code {first.get('exitcode')}"
    code = first.get("exitcode")
    how = f"was killed by signal {-code}" if isinstance(code, int) and code < 0 else f"exited with code {code}"
    text = f"rank {first['rank']} {how}"
    if first.get("message"):
        text += f": {first['message']}"
    if len(failures) > 1:
        text += f" (and {len(failures) - 1} more rank{'s' if len(failures) > 2 else ''})"
    return text


if __name__ == "__main__":
    sys.exit(main())
