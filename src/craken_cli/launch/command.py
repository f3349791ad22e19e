"""Build the launch command of a run: a pure function from spec to (argv, env), run in one place.

The child processes re-enter craken through a module (`-m craken_cli.train.loop RUN/run.yaml
[--resume-from CHECKPOINT]`, or for `craken launch` `-m craken_cli.launch.script_host RUN/run.yaml SCRIPT ARGS`),
so they read the very run file the configs were rendered from. accelerate's launch command runs inside
`craken_cli.launch.launcher`, which turns torchrun's failure tracebacks into an exit code and a failure file.
No shell is involved anywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

from ..runfolder import ACCELERATE_FILE, DS_ENV_FILE, RUN_FILE, machine_file

LOOP_MODULE = "craken_cli.train.loop"
SCRIPT_HOST_MODULE = "craken_cli.launch.script_host"
LAUNCHER_MODULE = "craken_cli.launch.launcher"
# Environment variables whose values must never be printed or written by craken: a name with one
# of these as a word, or at the end of a word (HF_TOKEN, WANDB_API_KEY, GITHUB_AUTHTOKEN).
SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS", "AUTHORIZATION",
                  "COOKIE")
# Credentials inside a value, whatever the variable's name: URL user-info (postgres://u:pw@host,
# https://bob:pw@host; s3:/bob:pw@host as pathlib leaves a URL given for a folder) and HTTP authorization headers.
URL_USERINFO = r"(?i)\b([a-z][a-z0-9+.-]*:/{1,2})[^/\s@]+@"
AUTH_HEADER = r"(?i)\b(authorization\s*[:=]|bearer\s+\S|basic\s+[a-z0-9+/=]{8,})"
HF_TOKEN_VALUE = r"\bhf_[A-Za-z0-9]{20,}"  # a Hugging Face access token (hf_ and 34 letters or digits)
# torchrun relays Ctrl-C and SIGTERM to the workers, then SIGKILLs them after this many seconds
# (its default is 30): the stopped run must have time to write its checkpoint, seconds per GB of
# weights and optimizer state.
STOP_GRACE_S = 600
# DeepSpeed's env file of a pdsh launch (--launcher deepspeed over several machines) is RUN/DS_ENV_FILE:
# accelerate appends the whole environment to it and DeepSpeed's runner exports every line on every
# machine. At its default ./.deepspeed_env it grew with every launch, so a later run re-exported old
# values, and tokens were written to disk.


# The caching allocator grows segments in place instead of cutting fixed ones: without it a run whose
# big blocks (the logits of a large vocabulary) are held across micro-steps reserved 18 GiB more than it
# allocated (Qwen2.5-0.5B, accumulation 2, one H200). torchtitan sets the same. A value the user set wins.
GROWN_SEGMENTS = ("expandable_segments", "True")
GPU_ALLOCATOR_ENV = {"PYTORCH_CUDA_ALLOC_CONF": ":".join(GROWN_SEGMENTS)}
# torch >= 2.9 reads either name, PYTORCH_ALLOC_CONF first (c10/core/AllocatorConfig.h)
ALLOCATOR_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def allocator_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The allocator setting a GPU run gets, unless the environment already names one."""
    return {} if any(environ.get(name) for name in ALLOCATOR_VARS) else dict(GPU_ALLOCATOR_ENV)


def grows_segments(environ: Mapping[str, str]) -> bool:
    """Whether a GPU run's caching allocator grows its segments: craken's default, or the user's own setting
    as torch reads it (the first variable of ALLOCATOR_VARS that names the key decides, its last mention)."""
    conf = {**environ, **allocator_env(environ)}
    key, on = GROWN_SEGMENTS
    for name in ALLOCATOR_VARS:
        said = [value for item in (conf.get(name) or "").replace(" ", "").split(",")
                for k, _, value in [item.partition(":")] if k == key]
        if said:
            return said[-1] == on
    return False


INHERITED_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                       "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT",
                       "TORCHELASTIC_RUN_ID")


def is_secret(name: str, value: str | None = None) -> bool:
    """A variable craken must never print or write: by its name, or by a credential in its value."""
    import re

    words = re.split(r"[^A-Z0-9]+", name.upper())
    if any(w.endswith(m) for w in words for m in SECRET_MARKERS):  # not TOKENIZERS_PARALLELISM
        return True
    return value is not None and any(re.search(p, value) for p in (URL_USERINFO, AUTH_HEADER, HF_TOKEN_VALUE))


def redacted(name: str, value: str) -> str:
    """The value as craken may show it: a URL keeps its scheme and host (postgres://***@db:5432/x), a path
    around a token the rest of it (/cache/hf_***/x)."""
    import re

    if not is_secret(name, value):
        return value
    if not is_secret(name) and not re.search(AUTH_HEADER, value):
        return redact_text(value)
    return "***"


def redact_text(text: str) -> str:
    """A message as craken may print it: it echoes the user's own values (a --dataset URL, HF_ENDPOINT), so
    URL credentials and hub tokens inside them are masked."""
    import re

    return re.sub(HF_TOKEN_VALUE, "hf_***", re.sub(URL_USERINFO, r"\1***@", text))


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: redacted(k, v) for k, v in env.items()}


def build(spec, run_dir: str | os.PathLike, base_env: Mapping[str, str], cpu_count: int,
          extra_args: Sequence[str] = (), resume_from: str | None = None,
          script_args: Sequence[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, env) that start every process of this machine: craken's loop, or with `script_args`
    (userscript.Target.host_args) the user's script under the script host."""
    run = Path(run_dir).absolute()
    cluster = spec.cluster
    rank = cluster.machine_rank
    argv = [sys.executable, "-m", LAUNCHER_MODULE, "--config_file", str(run / machine_file(ACCELERATE_FILE, rank))]
    if cluster.max_restarts:
        argv += ["--max_restarts", str(cluster.max_restarts), "--monitor_interval", "1"]
    if cluster.rdzv_backend and cluster.rdzv_backend != "static":
        # accelerate copies a YAML value only onto flags whose default is None, and --rdzv_backend
        # defaults to "static": `rdzv_backend: c10d` in the YAML alone never reaches torchrun.
        argv += ["--rdzv_backend", cluster.rdzv_backend]
    argv += list(extra_args)
    if script_args is not None:
        argv += ["-m", SCRIPT_HOST_MODULE, str(run / machine_file(RUN_FILE, rank)), *script_args]
    else:
        argv += ["-m", LOOP_MODULE, str(run / machine_file(RUN_FILE, rank))]
    if resume_from and script_args is None:
        argv += ["--resume-from", str(resume_from)]

    env = dict(base_env)
    # A new job must not inherit the rendezvous of a process group craken itself runs inside
    # (a notebook, a test, another job): the launcher sets these for its workers.
    for name in INHERITED_DIST_VARS:
        env.pop(name, None)
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(STOP_GRACE_S))
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               # accelerate's and transformers' own nags that say nothing about this run
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    if not cluster.use_cpu:
        env.update(allocator_env(env))
    if cluster.use_cpu:
        env["DS_ACCELERATOR"] = "cpu"
        per_machine = max(1, cluster.num_processes // cluster.num_machines)
        # Share the cores between the processes instead of each grabbing all of them.
        env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count // per_machine)))
    if cluster.rdzv_backend == "c10d":
        # torch >= 2.4 shares the c10d rendezvous' TCPStore with the workers and keeps that one
        # server across restarts, so a restarted group reads the previous round's gloo/NCCL
        # addresses ("Connection refused", or a hang in init_process_group; pytorch#135712).
        # Opting out gives every round a fresh store on a fresh port, hosted by worker rank 0.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        # accelerate passes no rendezvous endpoint to torchrun on one machine (nor with
        # same_network), so c10d would meet at localhost:29400 under run id "none": concurrent
        # runs on a machine would join each other. torchrun reads PET_<ARG> as its flags' defaults.
        env.setdefault("PET_RDZV_ENDPOINT", f"{cluster.main_process_ip or '127.0.0.1'}:{cluster.main_process_port}")
    arch = normalized_arch_list(env.get("TORCH_CUDA_ARCH_LIST"))
    if arch is not None:
        env["TORCH_CUDA_ARCH_LIST"] = arch
    if uses_pdsh(spec):
        env["DS_ENV_FILE"] = str(run / DS_ENV_FILE)
        for name in [k for k, v in env.items() if is_secret(k, v)]:
            del env[name]  # would be written into that file: each machine needs its own (e.g. hf auth login)
    return argv, env


def launcher_arg_problems(args: Sequence[str]) -> list[str]:
    """`craken train -- my_train.py` ran the script by accident, with craken's loop appended to its argv."""
    if any(a in ("-m", "--module", "--no_python") or a.endswith(".py") for a in args):
        return [f"`{' '.join(args)}` after -- would name a program for accelerate launch: craken train runs its "
                "own loop; run your script with craken launch [flags] SCRIPT [ARGS] (or -m MODULE)"]
    return []


def with_failure_file(argv: Sequence[str], path: str | os.PathLike) -> list[str]:
    """The launcher's argv, told where to write the failed workers' ranks and messages."""
    argv = list(argv)
    at = argv.index(LAUNCHER_MODULE) + 1
    return [*argv[:at], "--failure-file", str(path), *argv[at:]]


def uses_pdsh(spec) -> bool:
    return spec.cluster.launcher == "deepspeed" and spec.cluster.num_machines > 1 and spec.uses_deepspeed


def seed_deepspeed_env(target: Path, home: Path, cwd: Path) -> None:
    """Start this launch's env file afresh from the user's own ~/.deepspeed_env and ./.deepspeed_env
    lines (what DeepSpeed reads when DS_ENV_FILE is not set), without secrets; owner-only."""
    from ..runfolder import atomic_write

    lines = []
    for source in (home / DS_ENV_FILE, cwd / DS_ENV_FILE):
        if source.is_file() and source.resolve() != target.resolve():
            lines += [line for line in source.read_text().splitlines()
                      if "=" in line and not is_secret(*(part.strip() for part in line.split("=", 1)))]
    atomic_write(target, "".join(f"{line}\n" for line in lines), private=True)


def normalized_arch_list(value: str | None) -> str | None:
    """TORCH_CUDA_ARCH_LIST as DeepSpeed's op builder can parse it, or None if it already can.

    Images often set "9.0a" (Hopper's arch-specific target); DeepSpeed 0.19 reads every entry as
    numbers and fails to build any op ("invalid literal for int() ... '0a'").
    """
    if not value:
        return None
    import re

    entries = re.split(r"[;\s,]+", value.strip())
    fixed = []
    for e in entries:
        parsed = re.fullmatch(r"(\d+\.\d+)[a-z]?(\+PTX)?", e)
        if parsed and parsed.group(1) + (parsed.group(2) or "") not in fixed:
            fixed.append(parsed.group(1) + (parsed.group(2) or ""))
    out = ";".join(fixed)
    return out if out != value else None


def run(argv: Sequence[str], env: Mapping[str, str], keep_fds: Sequence[int] = ()) -> int:
    """Start the launcher, stream its output, return its exit code.

    Ctrl-C reaches the launcher (same process group), which passes it on to the workers. A SIGTERM or
    SIGINT sent to craken alone (a container's PID 1, a scheduler) is passed to the workers directly:
    torchrun starts them in sessions of their own, and a second signal to torchrun while it is
    shutting down would make it give up waiting for their checkpoint. `keep_fds` stay open in the
    launcher (the run folder's lock: held while the launcher lives, not only craken)."""
    import signal

    proc = subprocess.Popen(list(argv), env=dict(env), pass_fds=tuple(keep_fds))

    def forward(signum, frame):
        for pid in descendants(proc.pid):
            try:
                os.kill(pid, signum)
            except OSError:
                pass

    # SIGINT too: Ctrl-C reaches the whole process group, but `kill -INT <craken's pid>` only craken
    # (the workers may then see it twice: they only note it, and stop once).
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue  # the launcher got the SIGINT too: let the workers checkpoint and exit
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def descendants(pid: int) -> list[int]:
    """Processes below `pid` (Linux /proc; empty elsewhere), for passing a signal on to workers."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat") if Path("/proc").is_dir() else []:
        try:
            stat = entry.read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
