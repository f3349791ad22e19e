"""Files for running one craken spec on several machines: a SLURM batch script and a DeepSpeed hostfile.

Pure functions: `slurm_script(job)` and `hostfile_text(entries)` return text, `slurm_job(...)` and
`parse_hosts(...)` validate their inputs and raise one `CrakenError` listing every problem (each
naming the flag to change). Only `check_run_file` and `write_new` touch the disk.

    craken cluster slurm --nodes 2 --gpus-per-node 8 --config craken.yaml > job.sbatch
    craken cluster hostfile node1:8 node2:8 --out hostfile
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CrakenError

DEFAULT_PORT = 29500
# Train flags that the SLURM script sets itself on every node; giving them after `--` would clash.
SCRIPT_FLAGS = ("--num-machines", "--num-processes", "--machine-rank", "--main-process-ip",
                "--main-process-port", "--config", "-c", "--launcher")

# sbatch --time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (the leading field unbounded)
_TIME = re.compile(r"^(?:(?P<days>\d+)-(?P<dh>\d{1,2})(?::(?P<dm>\d{1,2})(?::(?P<ds>\d{1,2}))?)?"
                   r"|(?P<a>\d+)(?::(?P<b>\d{1,2})(?::(?P<c>\d{1,2}))?)?)$", re.ASCII)
_UNLIMITED = ("UNLIMITED", "INFINITE")
# Values pasted into `#SBATCH` lines: no spaces, quotes or newlines, which would end or split the line.
_SBATCH_VALUE = re.compile(r"^[A-Za-z0-9._,:@+\-]+$")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_IPV4 = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$", re.ASCII)


# ---------------------------------------------------------------------------------------------
# SLURM


@dataclass(frozen=True)
class SlurmJob:
    nodes: int
    gpus_per_node: int
    config: Path | None  # absolute: every node reads the same run file (None: a flags-only run)
    port: int = DEFAULT_PORT
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str = "craken"
    cpus_per_task: int | None = None
    train_args: tuple[str, ...] = field(default_factory=tuple)  # extra `craken train` arguments

    @property
    def num_processes(self) -> int:
        return self.nodes * self.gpus_per_node


def time_problem(value: str) -> str | None:
    """None when `value` is a time limit sbatch accepts (its formats: MM, MM:SS, HH:MM:SS, D-HH,
    D-HH:MM, D-HH:MM:SS, UNLIMITED)."""
    if value.upper() in _UNLIMITED:
        return None
    parsed = _TIME.match(value)
    fix = (f"--time {value!r}: write one of SLURM's formats MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS, "
           "e.g. --time 25:00 or --time 2-00:00:00")
    if not parsed:
        return fix
    # b is the minutes of HH:MM:SS or the seconds of MM:SS: at most 59 either way
    bounded = [(parsed["dh"], 23), (parsed["dm"], 59), (parsed["ds"], 59), (parsed["b"], 59), (parsed["c"], 59)]
    if any(field is not None and int(field) > limit for field, limit in bounded):
        return f"{fix} (minutes and seconds go to 59, hours after a day count to 23)"
    if not any(int(x) for x in parsed.groups() if x is not None):
        return f"--time {value!r} is zero: give a positive limit, e.g. --time 01:00:00"
    return None


def slurm_job(nodes: int, gpus_per_node: int, config: Path | None, *, port: int = DEFAULT_PORT,
              partition: str | None = None, time: str | None = None, account: str | None = None,
              job_name: str | None = None, cpus_per_task: int | None = None,
              train_args: list[str] | tuple[str, ...] = ()) -> SlurmJob:
    """A validated job; every problem is reported at once, each naming the flag and the fix."""
    problems = []
    if config is not None and any(ord(ch) < 32 or ord(ch) == 127 for ch in str(config)):
        problems.append(f"--config {str(config)!r}: a newline or control character in the path would end up as a "
                        "line of its own in the sbatch script: rename the file")
    if nodes < 1:
        problems.append(f"--nodes {nodes}: a job needs at least one node, e.g. --nodes 2")
    if gpus_per_node < 1:
        problems.append(f"--gpus-per-node {gpus_per_node}: give the GPUs of one node (at least 1), "
                        "e.g. --gpus-per-node 8")
    if not 1024 <= port <= 65535:
        problems.append(f"--port {port}: the rendezvous port must be in 1024-65535 (unprivileged), "
                        f"e.g. --port {DEFAULT_PORT}")
    if cpus_per_task is not None and cpus_per_task < 1:
        problems.append(f"--cpus-per-task {cpus_per_task}: give at least 1, or leave it out")
    if time is not None and (problem := time_problem(time)):
        problems.append(problem)
    for flag, value in (("--partition", partition), ("--account", account), ("--job-name", job_name)):
        if value is not None and not _SBATCH_VALUE.match(value):
            problems.append(f"{flag} {value!r}: use letters, digits and . _ - , : @ + only (no spaces or quotes)")
    for arg in train_args:
        name = arg.split("=", 1)[0]
        if name in SCRIPT_FLAGS:
            problems.append(f"{name} after `--`: the script sets it on every node; use --nodes, --gpus-per-node, "
                            "--port or --config of `craken cluster slurm` instead")
    if problems:
        raise CrakenError(problems, title="invalid cluster job")
    return SlurmJob(nodes=nodes, gpus_per_node=gpus_per_node, config=Path(config).absolute() if config is not None else None,
                     port=port,
                    partition=partition, time=time, account=account, job_name=job_name or "craken",
                    cpus_per_task=cpus_per_task, train_args=tuple(train_args))


# Run by `bash -c` in each srun task: the rank and address expand there (SLURM_NODEID differs per
# task); every other argument arrives already split, as "$@", so it needs one level of quoting only.
NODE_SCRIPT = 'exec craken train --machine-rank "$SLURM_NODEID" --main-process-ip "$MAIN_ADDR" "$@"'


def node_args(job: SlurmJob) -> list[str]:
    """The `craken train` arguments every node shares (all but the rank and the main address)."""
    return [*cluster_args(job), *job.train_args]


def cluster_args(job: SlurmJob) -> list[str]:
    return ["--num-machines", str(job.nodes),
            "--num-processes", str(job.num_processes),
            "--main-process-port", str(job.port),
            *(["--config", str(job.config)] if job.config is not None else []),
            # One launcher per node, started by srun: DeepSpeed's pdsh launcher would start every node again.
            "--launcher", "accelerate"]


def slurm_script(job: SlurmJob) -> str:
    """The sbatch script: one task per node, each running `craken train` with its own machine rank."""
    sbatch = [f"--job-name={job.job_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1",
              f"--gpus-per-node={job.gpus_per_node}"]
    if job.cpus_per_task is not None:
        sbatch.append(f"--cpus-per-task={job.cpus_per_task}")
    for name, value in (("partition", job.partition), ("time", job.time), ("account", job.account)):
        if value is not None:
            sbatch.append(f"--{name}={value}")
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {opt}" for opt in sbatch),
        "",
        "# Written by `craken cluster slurm`.",
        "# Submit with: sbatch THIS_FILE. The job inherits the submitting shell's environment",
        *(["# (activate craken's environment first); every node reads the same run file:", f"#   {job.config}"]
          if job.config is not None else
          ["# (activate craken's environment first); no run file: every node gets the same flags below."]),
        "set -eu",
        "",
        "# The rendezvous runs on the first node of the allocation.",
        'MAIN_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        'if [ -z "$MAIN_ADDR" ]; then echo "craken: no host in SLURM_JOB_NODELIST" >&2; exit 1; fi',
        "export MAIN_ADDR",
        f'echo "craken: {job.nodes} node(s) x {job.gpus_per_node} GPU(s), main $MAIN_ADDR:{job.port}" >&2',
        "",
        "# One task per node; single quotes keep $SLURM_NODEID for each task's own shell.",
        f"srun --nodes={job.nodes} --ntasks={job.nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 \\",
        f"  bash -c {shlex.quote(NODE_SCRIPT)} craken-node \\",
        f"  {shlex.join(cluster_args(job))}" + (" \\" if job.train_args else ""),
        *([f"  {shlex.join(job.train_args)}"] if job.train_args else []),
        "",
    ]
    return "\n".join(lines)


def check_run_file(job: SlurmJob, train=None) -> None:
    """The run file exists, and it with the train flags after `--` (`train`: their SpecArgs) validates for
    this job's world size, so a wrong batch triple or a --zero 7 fails here, not after the job has queued."""
    from ..config import sources
    from ..config.options import SpecArgs, load_spec

    if job.config is not None:
        if not job.config.is_file():
            raise CrakenError(f"--config {job.config}: no such file; write the run file (a craken.yaml) on a "
                              "file system all nodes share and pass its path", title="invalid cluster job")
        layer = sources.file_layer(job.config)  # a readable YAML mapping at least
        if (layer.values.get("cluster") or {}).get("use_cpu") is True:
            raise CrakenError(f"{job.config} sets cluster.use_cpu: true, but the job asks for GPUs: remove it (a "
                              "run.yaml rendered on a machine without GPUs carries it)", title="invalid cluster job")
    train = train or SpecArgs(flags={})
    given = {flag: value for flag, value in train.flags.items() if value is not None}
    load_spec(SpecArgs(config=job.config, sets=train.sets, nvme_path=train.nvme_path, preset=train.preset, flags={
        "--num-machines": job.nodes, "--num-processes": job.num_processes, "--machine-rank": 0,
        "--main-process-ip": "first-node", "--main-process-port": job.port, "--launcher": "accelerate", **given}))


# ---------------------------------------------------------------------------------------------
# DeepSpeed hostfile


def hostname_ok(host: str) -> bool:
    if _IPV4.match(host):
        return all(int(part) <= 255 for part in host.split("."))
    if len(host) > 253 or host.replace(".", "").isdigit():
        return False
    return all(_LABEL.match(label) for label in host.removesuffix(".").split("."))


def parse_hosts(items: list[str] | tuple[str, ...], slots: int | None = None) -> list[tuple[str, int]]:
    """`HOST` or `HOST:SLOTS` items -> [(host, slots)]; `slots` fills hosts given without a count."""
    problems = []
    if slots is not None and slots < 1:
        problems.append(f"--slots {slots}: give the processes (GPUs) per host, at least 1, e.g. --slots 8")
    if not items:
        problems.append("no hosts given: list them, e.g. craken cluster hostfile node1:8 node2:8")
    out: list[tuple[str, int]] = []
    seen: dict[str, str] = {}
    for item in items:
        if item.count(":") > 1:
            problems.append(f"{item!r}: IPv6 addresses are not supported here; give the host's hostname, "
                            "e.g. node1:8")
            continue
        host, sep, count = item.partition(":")
        if not hostname_ok(host):
            problems.append(f"{item!r}: {host!r} is not a hostname or IPv4 address; write HOST or HOST:SLOTS, "
                            "e.g. node1:8")
            continue
        key = host.lower().removesuffix(".")
        if key in seen:
            problems.append(f"{item!r}: host {host} is listed twice (also as {seen[key]!r}): give each host once")
            continue
        seen[key] = item
        if sep and not (count.isascii() and count.isdigit() and int(count) >= 1):
            problems.append(f"{item!r}: slots must be a whole number of at least 1, e.g. {host}:8")
        elif not sep and slots is None:
            problems.append(f"{item!r} has no slot count: write {host}:8, or pass --slots 8 for every host")
        elif sep or slots >= 1:
            out.append((host, int(count) if sep else slots))
    if problems:
        raise CrakenError(problems, title="invalid hostfile")
    return out


def hostfile_text(entries: list[tuple[str, int]]) -> str:
    """DeepSpeed's hostfile format: one `host slots=N` line per host."""
    total = sum(n for _, n in entries)
    lines = [f"# DeepSpeed hostfile: {len(entries)} host(s), {total} slot(s) in all."]
    lines += [f"{host} slots={n}" for host, n in entries]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# writing


def write_new(path: Path, text: str, force: bool = False) -> None:
    """Write `text` to `path` atomically; an existing file is refused unless `force`."""
    from ..runfolder import atomic_write

    path = Path(path)
    if path.exists() and not force:
        raise CrakenError(f"{path} already exists: pass --force to overwrite, or choose another --out FILE",
                          title="refusing to overwrite")
    if path.is_dir():
        raise CrakenError(f"{path} is a folder: give a file name with --out FILE", title="cannot write")
    if not path.parent.is_dir():
        raise CrakenError(f"folder {path.parent} does not exist: create it or choose another --out FILE",
                          title="cannot write")
    try:
        atomic_write(path, text)
    except OSError as exc:
        raise CrakenError(f"cannot write {path} ({exc.strerror or exc}): choose a writable --out FILE",
                          title="cannot write") from None
