"""The doctor's data: what it looks at (`Facts`, the run as `RunView`), what it says (`Check`), the
verdict and its exit code (`runfolder.VERDICT_EXIT`, the one table)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from ..errors import Refusal
from ..plan.hardware import GiB, Hardware
from ..runfolder import VERDICT_EXIT
from .dsops import ops_for


Status = Literal["ok", "warn", "fail"]
AREAS = ("system", "packages", "gpu", "ops", "memory", "disk", "network", "run")
# The stack craken runs on, by distribution name (not imported: read from metadata).
STACK = ("torch", "deepspeed", "accelerate", "transformers", "datasets", "nvidia-ml-py")
# Distributions whose declared requirements are checked against what is installed (a `pip check`
# restricted to the training stack): their own metadata is the most exact list of bad combinations.
DECLARERS = ("craken", "deepspeed", "accelerate", "transformers", "datasets")
# Combinations that install cleanly (nobody declares the conflict) but fail at run time.
KNOWN_BAD = (
    # (package, its version below, other package, its version at or above, why, fix)
    ("torch", "2.3", "numpy", "2",
     "torch before 2.3 was compiled against NumPy 1.x and fails to load with NumPy 2",
     "pip install 'numpy<2' (or a newer torch)"),
)
# DeepSpeed accepts an nvcc whose minor version differs from torch's CUDA within these lists and
# refuses any other mismatch (deepspeed/ops/op_builder/builder.py, 0.19.8: cuda_minor_mismatch_ok).
DS_CUDA_MINOR_OK = {
    11: {"11.0", "11.1", "11.2", "11.3", "11.4", "11.5", "11.6", "11.7", "11.8"},
    12: {"12.0", "12.1", "12.2", "12.3", "12.4", "12.5", "12.6", "12.8", "12.9"},
}
SHM_MIN = 1 * GiB  # below this, NCCL and DataLoader workers fail with "Bus error" / "unhandled system error"
# The fix of a settings problem, whose message already names the setting to change.
SETTINGS_FIX = "fix the settings named above"
# Upper bound for the built-in models' parameters (builtin:tiny is ~0.1M) when their config is unreadable.
BUILTIN_PARAMS_BOUND = 1_000_000


@dataclass(frozen=True)
class Check:
    area: str
    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class PathState:
    """A folder the run will write into: whether it can, and how much room there is."""

    path: str
    exists: bool
    writable: bool
    free: int | None
    fstype: str | None = None
    error: str | None = None


@dataclass
class Facts:
    """Everything the checks look at; `gather()` reads it from this machine, tests write it."""

    hardware: Hardware
    versions: dict[str, str | None] = field(default_factory=dict)  # distribution -> version (None: missing)
    requires: dict[str, list[str]] = field(default_factory=dict)  # distribution -> Requires-Dist lines
    python: tuple[int, int, int] = (3, 11, 0)
    python_requires: str | None = None  # craken's Requires-Python
    torch_build: str | None = None  # "cpu", "12.4", "rocm6.1", or None when unknown
    environ: Mapping[str, str] = field(default_factory=dict)
    tools: dict[str, str | None] = field(default_factory=dict)  # ninja, c++, nvcc, pdsh, ssh -> path
    cuda_home: str | None = None
    cuda_toolkit: tuple[int, int] | None = None  # nvcc's version at cuda_home
    prebuilt_ops: dict[str, bool] = field(default_factory=dict)  # deepspeed's installed_ops
    jit_cache: dict[str, str] = field(default_factory=dict)  # op -> a cached JIT build found
    jit_locks: dict[str, tuple[str, float]] = field(default_factory=dict)  # op -> left-over build lock, age s
    # libaio, which DeepSpeed's async_io op (any NVMe offload) needs; looked for only when the run uses it
    aio_library: str | None = None  # the shared library the loader finds (what a pre-built async_io loads)
    aio_header: str | None = None  # libaio.h where the compiler looks (a JIT build compiles against it)
    aio_link: str | None = None  # libaio.so (unversioned, from libaio-dev) where the linker looks
    interfaces: tuple[str, ...] = ()  # network interfaces (NCCL_SOCKET_IFNAME must match one)
    paths: dict[str, PathState] = field(default_factory=dict)  # "output" / "nvme" -> state
    params: int | None = None  # model parameters, estimated from its config
    params_source: str = ""
    address: str | None = None  # main_process_ip resolved
    address_error: str | None = None
    port_error: str | None = None  # why main_process_port cannot be bound here (None: free)
    port_checked: bool = False


@dataclass(frozen=True)
class RunView:
    """The run the checks look at: its spec (resolved, or as loaded where resolving refused it), the values
    the hardware fills even then, and what resolving decided, warned and refused."""

    spec: Any  # config.spec.RunSpec
    use_cpu: bool
    processes: int
    precision: str
    fused: bool
    decisions: tuple[tuple[str, Any, str], ...] = ()  # (path, value, why) decided from the hardware
    warnings: tuple[str, ...] = ()
    problems: tuple[Refusal, ...] = ()  # what this machine cannot give the run (resolve's refusals)

    # Shorthands for the settings several checks read (the resources checks among them).
    @property
    def machines(self) -> int:
        return self.spec.cluster.num_machines

    @property
    def per_machine(self) -> int:
        return max(1, self.processes // max(1, self.machines))

    @property
    def offload_optimizer(self) -> str:
        return self.spec.offload.optimizer.device

    @property
    def offload_param(self) -> str:
        return self.spec.offload.param.device

    @property
    def nvme_path(self) -> str | None:
        return self.spec.offload.optimizer.nvme_path or self.spec.offload.param.nvme_path

    @property
    def num_workers(self) -> int:
        return self.spec.data.num_workers

    @property
    def keep_checkpoints(self) -> int:
        return self.spec.train.keep_checkpoints


def run_view(sourced, hw: Hardware) -> RunView:
    """Resolve `sourced` (config.sources.SourcedSpec, as `load_spec` returns it) against `hw` as `craken train`
    would, without raising: refusals become `problems`, so the doctor reports them next to everything else."""
    from ..errors import CrakenError
    from ..plan.resolve import fill, hardware_problems, hardware_values

    spec = sourced.spec
    values, decisions = hardware_values(spec, hw)
    problems: tuple[Refusal, ...] = ()
    try:
        filled = fill(sourced, hw)[0].spec
    except CrakenError as exc:  # a filled value breaks a settings rule: its message names the fix, kept whole
        problems = tuple(Refusal(p, SETTINGS_FIX) for p in exc.problems)
    else:
        problems = tuple(hardware_problems(filled, hw))
        if not problems:
            spec = filled

    def get(path: str):
        if path in values:
            return values[path]
        node = spec
        for part in path.split("."):
            node = getattr(node, part)
        return node

    return RunView(
        spec=spec, use_cpu=bool(get("cluster.use_cpu")), processes=int(get("cluster.num_processes")),
        precision=str(get("precision")), fused=bool(get("optimizer.fused")),
        decisions=tuple((k, v, why) for k, (v, why) in decisions.made.items()),
        warnings=tuple(decisions.warnings), problems=problems,
    )


def needed_ops(view: RunView) -> list[str]:
    """DeepSpeed ops this run will build or load."""
    return ops_for(view.offload_optimizer, view.use_cpu, view.fused, view.offload_param)


def verdict(checks: list[Check]) -> Status:
    worst = max((VERDICT_EXIT[c.status] for c in checks), default=0)
    return next(s for s, r in VERDICT_EXIT.items() if r == worst)


def exit_code(checks: list[Check]) -> int:
    return VERDICT_EXIT[verdict(checks)]


def fmt_gib(n: int | float | None) -> str:
    if n is None:
        return "?"
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def fmt_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def parse_version(text: str | None):
    from packaging.version import InvalidVersion, Version

    if text is None:
        return None
    try:
        return Version(text)
    except InvalidVersion:
        return None


def major_minor(text: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None
