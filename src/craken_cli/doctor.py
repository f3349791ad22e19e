"""`craken doctor`'s checks: every environment problem found before launch, each with its fix.

Two halves, kept apart so that tests call the checks on any machine they can describe:

    facts = gather(hardware, spec, environ)      # impure: package metadata, PATH, sockets, disks
    checks = run_checks(facts, view)             # pure: Facts -> [Check(area, name, status, ...)]

Nothing here imports torch, deepspeed, transformers or accelerate (`craken doctor` answers in well
under a second); versions come from package metadata. Only `deep_checks()` (`--deep`) imports
torch and DeepSpeed and builds the ops.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from .hardware import GiB, Hardware, nearest_existing
from .runfolder import VERDICT_EXIT

Status = Literal["ok", "warn", "fail"]
AREAS = ("system", "packages", "gpu", "ops", "memory", "disk", "network", "run")
EXIT_CODES = VERDICT_EXIT  # verdict -> exit code; the order is the severity

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
    """The settings the checks care about, taken from a run that may have failed to resolve."""

    use_cpu: bool
    processes: int
    machines: int
    rank: int
    precision: str
    fused: bool
    zero: int
    offload_optimizer: str
    offload_param: str
    nvme_path: str | None
    main_ip: str | None
    port: int
    launcher: str
    num_workers: int
    model: str
    output_dir: str
    keep_checkpoints: int
    report_to: str = "none"
    decisions: tuple[tuple[str, Any, str], ...] = ()  # (path, value, why) decided from the hardware
    warnings: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()  # what this machine cannot give the run (resolve's refusals)

    @property
    def per_machine(self) -> int:
        return max(1, self.processes // max(1, self.machines))


# ---------------------------------------------------------------------------------------------
# the run, as the checks see it


def run_view(spec, hw: Hardware) -> RunView:
    """Resolve `spec` against `hw` as `craken train` would, without raising: refusals become
    `problems`, so the doctor reports them next to everything else."""
    from .errors import CrakenError
    from .resolve import hardware_values, resolve
    from .sources import Resolved

    values, decisions = hardware_values(spec, hw)
    problems: tuple[str, ...] = ()
    try:
        spec = resolve(Resolved(spec, {}), hw)[0].spec
    except CrakenError as exc:
        problems = tuple(exc.problems)

    def get(path: str):
        if path in values:
            return values[path]
        node = spec
        for part in path.split("."):
            node = getattr(node, part)
        return node

    off = spec.offload
    nvme = off.optimizer.nvme_path or off.param.nvme_path
    return RunView(
        use_cpu=bool(get("cluster.use_cpu")), processes=int(get("cluster.num_processes")),
        machines=spec.cluster.num_machines, rank=spec.cluster.machine_rank, precision=str(get("precision")),
        fused=bool(get("optimizer.fused")), zero=spec.zero.stage, offload_optimizer=off.optimizer.device,
        offload_param=off.param.device, nvme_path=nvme, main_ip=spec.cluster.main_process_ip,
        port=spec.cluster.main_process_port, launcher=spec.cluster.launcher, num_workers=spec.data.num_workers,
        model=spec.model.name_or_path, output_dir=spec.output.run_dir(), keep_checkpoints=spec.train.keep_checkpoints,
        report_to=spec.logging.report_to,
        decisions=tuple((k, v, why) for k, (v, why) in decisions.made.items()),
        warnings=tuple(decisions.warnings), problems=problems,
    )


def needed_ops(view: RunView) -> list[str]:
    """DeepSpeed ops this run will build or load."""
    return ops_for(view.offload_optimizer, view.use_cpu, view.fused, view.offload_param)


def ops_for(offload_optimizer: str, use_cpu: bool, fused: bool | None, offload_param: str = "none") -> list[str]:
    ops = []
    if offload_optimizer != "none":
        ops.append("cpu_adam")  # DeepSpeedCPUAdam for offloaded optimizer states
    elif not use_cpu and fused:
        ops.append("fused_adam")
    if "nvme" in (offload_optimizer, offload_param):
        ops.append("async_io")  # DeepSpeed's swapper reads and writes the NVMe files through libaio
    return ops


# what `--deep` builds for each op
OP_BUILDERS = {"cpu_adam": "CPUAdamBuilder", "fused_adam": "FusedAdamBuilder", "async_io": "AsyncIOBuilder"}


# Older torch.utils.cpp_extension guards each JIT build with a FileBaton: a `lock` file whose mere
# existence blocks, removed when the build ends. A build that was killed leaves it behind, and from
# then on every process that loads the op waits for it forever, printing nothing. A build takes one
# to three minutes; a baton older than this is taken as left over. Newer torch holds an OS advisory
# lock (filelock) on a file that stays on disk: the kernel releases it with its holder, so such a
# file is never stale, and one that is locked now belongs to a build that is running.
STALE_LOCK_S = 600


def torch_uses_build_baton() -> bool:
    """Whether the installed torch blocks JIT builds on a lock file's existence (FileBaton), read from
    its source so that no torch import is needed."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    source = os.path.join(list(spec.submodule_search_locations)[0], "utils", "cpp_extension.py")
    try:
        with open(source, encoding="utf-8") as f:
            return "FileBaton(" in f.read()
    except OSError:
        return False


def stale_build_locks(ops: list[str], environ: Mapping[str, str], now: float | None = None,
                      baton: bool | None = None) -> dict[str, tuple[str, float]]:
    """op -> (lock file, age in seconds) for JIT build batons left over by an interrupted build;
    none with a torch whose build locks release with their holder."""
    import time

    if not (torch_uses_build_baton() if baton is None else baton):
        return {}
    now = time.time() if now is None else now
    found: dict[str, tuple[str, float]] = {}
    for root in extension_roots(environ):
        for op in ops:
            lock = os.path.join(root, op, "lock")
            try:
                age = now - os.stat(lock).st_mtime
            except OSError:
                continue
            if age > STALE_LOCK_S and op not in found:
                found[op] = (lock, age)
    return found


def stale_lock_message(op: str, lock: str, age: float) -> str:
    return (f"a build of DeepSpeed's {op} op was interrupted {age / 60:.0f} min ago and left its lock file "
            f"{lock}: every process that loads {op} would wait for it forever")


def extension_roots(environ: Mapping[str, str]) -> list[str]:
    """Where torch.utils.cpp_extension keeps JIT builds: TORCH_EXTENSIONS_DIR (then nowhere else),
    else ~/.cache/torch_extensions/<py_cu>."""
    if environ.get("TORCH_EXTENSIONS_DIR"):
        return [environ["TORCH_EXTENSIONS_DIR"]]
    roots = glob.glob(os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions", "*"))
    return roots + glob.glob("/tmp/torch_extensions")


# ---------------------------------------------------------------------------------------------
# pure checks


def run_checks(facts: Facts, view: RunView | None, spec_error: str | None = None) -> list[Check]:
    """Every check, in area order. `view` is None when the settings themselves are invalid."""
    checks: list[Check] = []
    checks += check_system(facts)
    checks += check_packages(facts)
    checks += check_tracker(facts, view)
    checks += check_gpus(facts, view)
    checks += check_fp8(facts, view)
    if view is not None:
        checks += check_ops(facts, view)
        checks += check_memory(facts, view)
        checks += check_disk(facts, view)
    else:
        checks += check_ops(facts, None)
    checks += check_network(facts, view)
    checks += check_run(view, spec_error)
    order = {a: i for i, a in enumerate(AREAS)}
    return sorted(checks, key=lambda c: order.get(c.area, len(order)))  # stable within an area


def verdict(checks: list[Check]) -> Status:
    worst = max((VERDICT_EXIT[c.status] for c in checks), default=0)
    return next(s for s, r in VERDICT_EXIT.items() if r == worst)


def exit_code(checks: list[Check]) -> int:
    return EXIT_CODES[verdict(checks)]


def _gib(n: int | float | None) -> str:
    if n is None:
        return "?"
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _ver(text: str | None):
    from packaging.version import InvalidVersion, Version

    if text is None:
        return None
    try:
        return Version(text)
    except InvalidVersion:
        return None


def check_system(f: Facts) -> list[Check]:
    out = []
    py = ".".join(map(str, f.python))
    if f.python_requires:
        from packaging.specifiers import SpecifierSet

        ok = SpecifierSet(f.python_requires).contains(py)
        out.append(Check("system", "python", "ok" if ok else "fail", f"Python {py} ({sys.executable})" if ok else
                         f"Python {py}; craken needs {f.python_requires}",
                         "" if ok else f"use a Python {f.python_requires} environment"))
    else:
        out.append(Check("system", "python", "ok", f"Python {py}"))
    hw = f.hardware
    out.append(Check("system", "cpu", "ok", f"{hw.cpu_count} cores, RAM {_gib(hw.ram_total)} "
                     f"({_gib(hw.ram_available)} available)"))
    return out


def _requirements(lines: list[str]) -> list:
    """Parsed requirements that apply to this install: optional extras and other platforms dropped."""
    from packaging.requirements import InvalidRequirement, Requirement

    out = []
    for line in lines:
        if "extra ==" in line or "extra==" in line:  # cheap filter first: transformers lists hundreds
            continue
        try:
            r = Requirement(line)
            if r.marker is not None and not r.marker.evaluate({"extra": ""}):
                continue
        except (InvalidRequirement, Exception):  # an unknown marker variable: not ours to judge
            continue
        out.append(r)
    return out


def _broken(r, installed: str | None) -> bool:
    """Does the installed version (None: missing) break requirement `r`?"""
    if installed is None:
        return True
    v = _ver(installed)
    return v is not None and bool(r.specifier) and not r.specifier.contains(v, prereleases=True)


def check_packages(f: Facts) -> list[Check]:
    from packaging.utils import canonicalize_name as canon

    out = []
    v = f.versions
    installed = {canon(k): val for k, val in v.items()}
    declared = {d: _requirements(f.requires.get(d, [])) for d in DECLARERS}
    stack = {canon(d) for d in STACK}
    for dist in STACK:
        if v.get(dist) is None:
            hint = ("install a torch build for this machine first (https://pytorch.org/get-started/locally/)"
                    if dist == "torch" else f"pip install {dist}")
            status: Status = "warn" if dist == "nvidia-ml-py" and not f.hardware.gpus else "fail"
            why = " (GPUs cannot be detected)" if dist == "nvidia-ml-py" else ""
            out.append(Check("packages", dist, status, f"not installed{why}", hint))
            continue
        broken = [(declarer, r) for declarer, reqs in declared.items() if declarer != dist
                  for r in reqs if canon(r.name) == canon(dist) and _broken(r, v[dist])]
        detail = v[dist]
        if dist == "torch" and f.torch_build:
            detail += f" ({'CPU-only build' if f.torch_build == 'cpu' else 'build for ' + f.torch_build})"
        if broken:
            why = "; ".join(f"{d} {v.get(d)} needs {r.name}{r.specifier}" for d, r in broken)
            out.append(Check("packages", dist, "fail", f"{v[dist]}: {why}", f"pip install '{dist}{broken[0][1].specifier}'"))
        else:
            out.append(Check("packages", dist, "ok", detail))
    # what the stack declares on other packages (numpy, huggingface-hub, tokenizers, ...)
    for declarer, reqs in declared.items():
        for r in reqs:
            name = canon(r.name)
            if name in stack or name not in installed or installed[name] is None:
                continue  # the stack is above; a missing one pip would have installed
            if _broken(r, installed[name]):
                out.append(Check("packages", r.name, "fail", f"{installed[name]}, but {declarer} {v.get(declarer)} "
                                 f"needs {r.name}{r.specifier}", f"pip install '{r.name}{r.specifier}'"))
    for pkg, below, other, at_least, why, fix in KNOWN_BAD:
        a, b = _ver(v.get(pkg)), _ver(v.get(other))
        if a is not None and b is not None and a < _ver(below) and b >= _ver(at_least):
            out.append(Check("packages", f"{pkg} + {other}", "fail", f"{pkg} {v[pkg]} with {other} {v[other]}: {why}",
                             fix))
    return out


def check_tracker(f: Facts, view: RunView | None) -> list[Check]:
    """The package of the run's --report-to tracker (accelerate would drop a missing one silently)."""
    from .preflight import TRACKER_PACKAGES

    if view is None or view.report_to == "none":
        return []
    names = TRACKER_PACKAGES[view.report_to]
    found = [(n, f.versions.get(n)) for n in names if f.versions.get(n)]
    if found:
        return [Check("packages", found[0][0], "ok", f"{found[0][1]} (--report-to {view.report_to})")]
    return [Check("packages", names[0], "fail", f"not installed (--report-to {view.report_to})",
                  f"pip install {names[0]}, or --report-to none")]


def torch_build_of(version: str | None, requires: list[str]) -> str | None:
    """'cpu', '12.4', 'rocm6.1' or None, from torch's version string and its declared CUDA wheels.

    '+cu124' -> '12.4'; '+cpu' -> 'cpu'; no local tag (PyPI's Linux wheels) -> the version of the
    nvidia-cuda-runtime wheel torch depends on.
    """
    if version is None:
        return None
    local = version.partition("+")[2]
    m = re.fullmatch(r"cu(\d+)(\d)", local)
    if m:
        return f"{int(m.group(1))}.{m.group(2)}"
    if local == "cpu":
        return "cpu"
    if local.startswith("rocm"):
        return local
    for req in requires:
        m = re.match(r"nvidia-cuda-runtime(?:-cu\d+)?\s*[=~]=\s*(\d+)\.(\d+)", req)
        if m:
            return f"{m.group(1)}.{m.group(2)}"
    return None


def _pair(text: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_gpus(f: Facts, view: RunView | None) -> list[Check]:
    hw = f.hardware
    out = []
    if not hw.gpus:
        why = f" ({hw.nvml_error})" if hw.nvml_error else ""
        hidden = f"; CUDA_VISIBLE_DEVICES hides {hw.hidden_gpus}" if hw.hidden_gpus else ""
        status: Status = "warn" if hw.hidden_gpus else "ok"
        out.append(Check("gpu", "GPUs", status, f"none found{why}{hidden}: training runs on CPU processes",
                         "unset CUDA_VISIBLE_DEVICES or list the GPUs to use" if hw.hidden_gpus else ""))
    else:
        extra = f", {hw.hidden_gpus} hidden by CUDA_VISIBLE_DEVICES" if hw.hidden_gpus else ""
        out.append(Check("gpu", "GPUs", "ok", f"{hw.gpu_count} GPU(s){extra}, driver {hw.driver_version}, "
                         f"CUDA {'.'.join(map(str, hw.cuda_driver_version or ())) or '?'} supported by the driver"))
        for g in hw.gpus:
            feats = ", ".join(x for x, on in (("bf16", g.bf16), ("fp8", g.fp8)) if on) or "no bf16"
            used = g.memory_total - g.memory_free
            busy = used > max(2 * GiB, 0.1 * g.memory_total)
            out.append(Check("gpu", f"GPU {g.index}", "warn" if busy else "ok",
                             f"{g.name}, {_gib(g.memory_total)} ({_gib(g.memory_free)} free), "
                             f"compute capability {g.capability[0]}.{g.capability[1]}, {feats}",
                             f"{_gib(used)} in use by other processes: find them with nvidia-smi" if busy else ""))
        if hw.gpu_count > 1:
            missing_p2p = [p for p in hw.pairs() if p not in hw.p2p_pairs and p not in hw.nvlink_pairs]
            out.append(Check("gpu", "links", "warn" if missing_p2p else "ok", hw.links(),
                             "check `nvidia-smi topo -p2p r`; in VMs and containers enable PCIe ACS/IOMMU "
                             "pass-through so NCCL can use peer-to-peer" if missing_p2p else ""))
    build = f.torch_build
    if f.versions.get("torch") is None:
        pass  # reported under packages
    elif build is None:
        out.append(Check("gpu", "torch build", "ok", f"torch {f.versions['torch']}: CUDA version unknown"))
    elif build == "cpu":
        if hw.gpus:
            out.append(Check("gpu", "torch build", "fail", f"torch {f.versions['torch']} is a CPU-only build but "
                             f"{hw.gpu_count} GPU(s) are here", _torch_fix(hw)))
        else:
            out.append(Check("gpu", "torch build", "ok", f"torch {f.versions['torch']}: CPU-only build, no GPU here"))
    elif build.startswith("rocm"):
        out.append(Check("gpu", "torch build", "fail" if hw.gpus else "ok",
                         f"torch {f.versions['torch']} is a ROCm build" + (" but the GPUs are NVIDIA" if hw.gpus else ""),
                         _torch_fix(hw) if hw.gpus else ""))
    else:
        tb = _pair(build)
        drv = hw.cuda_driver_version
        if not hw.gpus:
            out.append(Check("gpu", "torch build", "ok", f"torch {f.versions['torch']}: CUDA {build} build, no GPU "
                             "here (CPU processes)"))
        elif drv is None or tb is None:
            out.append(Check("gpu", "torch build", "ok", f"CUDA {build} build; driver's CUDA version unknown"))
        elif tb[0] > drv[0]:
            out.append(Check("gpu", "torch build", "fail", f"torch is built for CUDA {build} but driver "
                             f"{hw.driver_version} supports CUDA {drv[0]}.{drv[1]} at most: torch sees no GPU",
                             f"upgrade the NVIDIA driver, or {_torch_fix(hw)}"))
        elif tb > drv:
            out.append(Check("gpu", "torch build", "warn", f"torch is built for CUDA {build}, driver supports "
                             f"{drv[0]}.{drv[1]}: runs through minor-version compatibility, but kernels that need "
                             "PTX JIT fail", f"upgrade the NVIDIA driver, or {_torch_fix(hw)}"))
        else:
            out.append(Check("gpu", "torch build", "ok", f"CUDA {build} build, driver supports CUDA "
                             f"{drv[0]}.{drv[1]}"))
    return out


def check_fp8(f: Facts, view: RunView | None) -> list[Check]:
    """FP8 readiness on GPU machines: float8 tensor cores (compute capability >= 8.9) and torchao; a
    failure only where the run asks for fp8 (its refusal on CPU processes is the run area's)."""
    from .train import fp8

    gpus = f.hardware.gpus
    asked = view is not None and view.precision == "fp8"
    if not gpus:
        return []
    need = ".".join(map(str, fp8.MIN_CAPABILITY))
    old = [g for g in gpus if not g.fp8]
    if old:
        cap = ".".join(map(str, old[0].capability))
        return [] if asked else [Check("gpu", "fp8", "ok", f"not available: {old[0].name} has compute capability "
                                       f"{cap}, float8 matmuls need {need} (bf16 is what this GPU runs)")]
    torchao = f.versions.get("torchao")
    if torchao is None:
        return [Check("gpu", "fp8", "fail" if asked else "ok", "float8 tensor cores, but torchao is not installed"
                      + ("" if asked else f" ({fp8.INSTALL_HINT} for --precision fp8)"),
                      fp8.INSTALL_HINT if asked else "")]
    use = "this run trains in fp8" if asked else "--precision fp8 to use it"
    return [Check("gpu", "fp8", "ok", f"ready: compute capability >= {need}, torchao {torchao} ({use}; "
                  "`craken doctor --deep` runs one float8 matmul)")]


def _torch_fix(hw: Hardware) -> str:
    drv = hw.cuda_driver_version
    cap = f" for CUDA {drv[0]}.{drv[1]} or older" if drv else ""
    return f"install a torch CUDA build{cap}: pip install torch --index-url https://download.pytorch.org/whl/cuXYZ"


def check_ops(f: Facts, view: RunView | None) -> list[Check]:
    hw = f.hardware
    needed = needed_ops(view) if view is not None else []
    out = []
    if f.versions.get("deepspeed") is None:
        return out  # reported under packages
    prebuilt = {op for op, on in f.prebuilt_ops.items() if on}
    jit = [op for op in needed if op not in prebuilt]
    if "async_io" in needed and "async_io" in prebuilt and f.prebuilt_ops.get("pin_memory") is False:
        jit.append("pin_memory")  # a pre-built async_io still loads pin_memory first (DeepSpeed >= 0.18)
    gpu_build = bool(hw.gpus) and f.torch_build not in (None, "cpu")
    # what building each op needs
    need_tools = bool(jit)
    sev: Status = "fail" if need_tools else "warn"
    later = "" if need_tools else " (no op is built for these settings; --offload-optimizer cpu would need it)"
    ninja = f.tools.get("ninja")
    out.append(Check("ops", "ninja", "ok" if ninja else sev, ninja or f"not found: DeepSpeed cannot build ops{later}",
                     "" if ninja else "pip install ninja"))
    cxx_name = f.environ.get("CXX", "c++")
    cxx = f.tools.get("c++")
    out.append(Check("ops", "C++ compiler", "ok" if cxx else sev,
                     cxx or f"{cxx_name} not found: DeepSpeed cannot build ops{later}",
                     "" if cxx else "install g++ (apt-get install build-essential) or set CXX"))
    cuda_ok = True
    if gpu_build:
        cuda_needed = "fused_adam" in jit
        csev: Status = "fail" if cuda_needed else "warn"
        tb = _pair(f.torch_build or "")
        if not f.cuda_home or not f.tools.get("nvcc"):
            cuda_ok = False
            out.append(Check("ops", "CUDA toolkit", csev, "nvcc not found (CUDA_HOME unset, nvcc not on PATH): "
                             "CUDA ops (fused_adam) cannot be built",
                             f"install the CUDA toolkit {f.torch_build} and set CUDA_HOME, or use --set "
                             "optimizer.fused=false"))
        elif f.cuda_toolkit is None or tb is None:
            out.append(Check("ops", "CUDA toolkit", "ok", f"{f.cuda_home} (nvcc version unknown)"))
        else:
            tk = f.cuda_toolkit
            tks, tbs = f"{tk[0]}.{tk[1]}", f"{tb[0]}.{tb[1]}"
            minor_ok = tk[0] == tb[0] and tks in DS_CUDA_MINOR_OK.get(tk[0], ()) and tbs in DS_CUDA_MINOR_OK.get(tk[0], ())
            if tk == tb or minor_ok or f.environ.get("DS_SKIP_CUDA_CHECK") == "1":
                out.append(Check("ops", "CUDA toolkit", "ok", f"nvcc {tks} at {f.cuda_home}, torch built for {tbs}"))
            else:
                cuda_ok = False
                out.append(Check("ops", "CUDA toolkit", csev, f"nvcc {tks} at {f.cuda_home} but torch is built for "
                                 f"{tbs}: DeepSpeed refuses to build CUDA ops",
                                 f"point CUDA_HOME at a CUDA {tbs} toolkit (or set DS_SKIP_CUDA_CHECK=1 at your risk)"))
    for op in ("cpu_adam", "fused_adam"):
        if op == "fused_adam" and not gpu_build:
            why = ("not used on CPU processes" if not hw.gpus or (view is not None and view.use_cpu) else
                   "not used by these settings (torch's fused AdamW needs no op); torch's CUDA version is "
                   "unknown, so a build could not be checked" if op not in needed else
                   "torch's CUDA version is unknown: the build cannot be checked")
            out.append(Check("ops", op, "ok" if op not in needed else "warn", why))
            continue
        use = "used by these settings" if op in needed else "not used by these settings"
        if op in f.jit_locks and op not in prebuilt:
            lock, age = f.jit_locks[op]
            out.append(Check("ops", op, "fail" if op in needed else "warn", f"{stale_lock_message(op, lock, age)}; {use}",
                             f"delete {lock} (when no build is running)"))
            continue
        if op in prebuilt:
            out.append(Check("ops", op, "ok", f"pre-built into deepspeed; {use}"))
            continue
        tools_ok = bool(ninja and cxx) and (op != "fused_adam" or cuda_ok)
        cached = f" (cached build in {f.jit_cache[op]})" if op in f.jit_cache else ""
        if tools_ok:
            first = "" if cached else ", about a minute at first use"
            out.append(Check("ops", op, "ok", f"can be built{first}{cached}; {use}"))
        else:
            status: Status = "fail" if op in needed else "warn"
            out.append(Check("ops", op, status, f"cannot be built (see above); {use}",
                             "fix the build tools above, or run `craken doctor --deep` for the build log"))
    if "async_io" in needed:
        out.append(_async_io_check(f, view, prebuilt, bool(ninja and cxx), gpu_build))
    if f.environ.get("DS_ACCELERATOR") == "cpu" and hw.gpus:
        out.append(Check("ops", "DS_ACCELERATOR", "warn", "DS_ACCELERATOR=cpu: DeepSpeed ignores the GPUs",
                         "unset DS_ACCELERATOR"))
    return out


def nvme_offload_flags(offload_optimizer: str | None, offload_param: str | None) -> list[str]:
    """The offload flags set to nvme (the doctor's and the preflight's advice name them)."""
    return [f"--offload-{what}" for what, device in (("optimizer", offload_optimizer), ("param", offload_param))
            if device == "nvme"]


def libaio_missing(prebuilt_async_io: bool, library: str | None, header: str | None, link: str | None) -> list[str]:
    """What of libaio the async_io op lacks: a pre-built op loads only the shared library; a JIT build
    compiles against libaio.h and links libaio.so. Empty when it has what it needs."""
    if prebuilt_async_io:
        return [] if library else ["libaio's shared library"]
    return [name for name, found in (("libaio.h", header), ("libaio.so", link)) if not found]


def _aio_fix(view: RunView | None) -> str:
    flags = nvme_offload_flags(view and view.offload_optimizer, view and view.offload_param)
    return ("apt install libaio-dev (or conda install libaio and point CFLAGS=-I / LDFLAGS=-L at it), "
            f"or offload to CPU RAM instead of NVMe: {' '.join(f + ' cpu' for f in flags) or '--offload-optimizer cpu'}")


def _async_io_check(f: Facts, view: RunView | None, prebuilt: set[str], tools_ok: bool, gpu_build: bool) -> Check:
    """DeepSpeed's async_io op, which every NVMe offload loads: built against libaio (header and
    library) at first use, or pre-built (DS_BUILD_AIO=1), then it needs libaio's shared library only."""
    op, use = "async_io", "used by NVMe offload"
    fails = "the run would fail after launch with 'Unable to JIT load the async_io op'"
    if op in prebuilt:
        if not libaio_missing(True, f.aio_library, f.aio_header, f.aio_link):
            return Check("ops", op, "ok", f"pre-built into deepspeed, {f.aio_library} found; {use}")
        return Check("ops", op, "fail", f"pre-built into deepspeed but libaio's shared library is not found: it "
                     f"cannot load; {use}", _aio_fix(view))
    if op in f.jit_locks:
        lock, age = f.jit_locks[op]
        return Check("ops", op, "fail", f"{stale_lock_message(op, lock, age)}; {use}",
                     f"delete {lock} (when no build is running)")
    missing = libaio_missing(False, f.aio_library, f.aio_header, f.aio_link)
    if missing:
        return Check("ops", op, "fail", f"cannot be built: libaio is missing ({' and '.join(missing)} not found); "
                     f"{fails}", _aio_fix(view))
    if not tools_ok:
        return Check("ops", op, "fail", f"cannot be built (see above); {use}",
                     "fix the build tools above, or run `craken doctor --deep` for the build log")
    if gpu_build and not f.cuda_home:
        return Check("ops", op, "fail", f"cannot be built: DeepSpeed builds it against the CUDA headers and "
                     f"CUDA_HOME is unknown; {fails}", "install the CUDA toolkit and set CUDA_HOME")
    cached = f" (cached build in {f.jit_cache[op]})" if op in f.jit_cache else ", about a minute at first use"
    return Check("ops", op, "ok", f"can be built{cached}, libaio at {f.aio_header}; {use}")


def model_params(name: str, environ: Mapping[str, str]) -> tuple[int | None, str]:
    """Approximate parameter count from the model's config.json, where it is on disk."""
    if name.startswith("builtin:"):
        try:
            from .train.builtin import TINY_CONFIG

            return params_from_config(TINY_CONFIG), "built-in model"
        except Exception:  # another engineer's module changed: an upper bound still answers
            return BUILTIN_PARAMS_BOUND, "built-in model (upper bound)"
    candidates = [Path(name) / "config.json"]
    hub = environ.get("HF_HUB_CACHE") or os.path.join(
        environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")
    candidates += sorted(Path(hub).glob(f"models--{name.replace('/', '--')}/snapshots/*/config.json"))
    for path in candidates:
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        n = params_from_config(cfg) if isinstance(cfg, dict) else None  # the model check names a bad file
        if n:
            return n, f"estimated from {path}"
    return None, f"no config.json for {name!r} on this machine"


def params_from_config(cfg: Mapping[str, Any]) -> int | None:
    """Parameters from a HF config: the planner's count (modelinfo.config_params)."""
    from .modelinfo import config_params

    return config_params(dict(cfg))


def offload_bytes(view: RunView, params: int) -> tuple[int, int]:
    """(CPU RAM, NVMe) bytes per machine that the offloaded states take: the planner's count
    (planner.offload_host_bytes), partitioned over all processes."""
    from .planner import offload_host_bytes

    cpu, nvme = offload_host_bytes(params, view.processes, view.per_machine, view.offload_optimizer,
                                   view.offload_param, 4 if view.precision == "fp32" else 2)
    return int(cpu), int(nvme)


def offload_ram(view: RunView, params: int) -> int:
    """CPU RAM per machine that the offloaded states take."""
    return offload_bytes(view, params)[0]


def check_memory(f: Facts, view: RunView) -> list[Check]:
    hw = f.hardware
    out = []
    many = view.per_machine > 1 or view.num_workers > 0
    if hw.shm_total is None:
        out.append(Check("memory", "/dev/shm", "warn" if many else "ok", "/dev/shm does not exist",
                         "mount a tmpfs at /dev/shm (docker: --shm-size=16g or --ipc=host)" if many else ""))
    elif hw.shm_total < SHM_MIN:
        out.append(Check("memory", "/dev/shm", "fail" if many else "warn",
                         f"{_gib(hw.shm_total)}: NCCL and DataLoader workers need more (Bus error, NCCL "
                         "'unhandled system error')",
                         "docker run --shm-size=16g (or --ipc=host); Kubernetes: an emptyDir with medium: Memory "
                         "mounted at /dev/shm"))
    else:
        out.append(Check("memory", "/dev/shm", "ok", _gib(hw.shm_total)))
    if view.offload_optimizer != "cpu" and view.offload_param != "cpu":
        out.append(Check("memory", "RAM for offload", "ok", "no CPU offload asked for"))
    elif f.params is None:
        out.append(Check("memory", "RAM for offload", "warn", f"cannot estimate the model's size: {f.params_source}",
                         "download the model first (or give a local folder) so its size is known"))
    else:
        need = offload_ram(view, f.params)
        what = "+".join(x for x, on in (("optimizer", view.offload_optimizer == "cpu"),
                                         ("parameters", view.offload_param == "cpu")) if on)
        detail = (f"{what} offload of ~{_count(f.params)} params needs ~{_gib(need)} per machine; "
                  f"{_gib(hw.ram_available)} available")
        if need > hw.ram_available:
            out.append(Check("memory", "RAM for offload", "fail", detail,
                             "use --offload-optimizer nvme --nvme-path DIR, more machines, or a smaller model"))
        elif need > 0.8 * hw.ram_available:
            out.append(Check("memory", "RAM for offload", "warn", detail + " (little headroom)",
                             "close other programs, or offload to nvme"))
        else:
            out.append(Check("memory", "RAM for offload", "ok", detail))
    return out


def check_disk(f: Facts, view: RunView) -> list[Check]:
    out = []
    o = f.paths.get("output")
    if o is not None:
        ckpt = None if f.params is None else f.params * 14 * (view.keep_checkpoints + 1) // max(1, view.machines)
        if not o.writable:
            out.append(Check("disk", "output folder", "fail", f"{o.path}: not writable ({o.error or 'permission'})",
                             "choose another folder with --output-dir"))
        elif ckpt is not None and o.free is not None and ckpt > o.free:
            out.append(Check("disk", "output folder", "fail", f"{o.path}: {_gib(o.free)} free, "
                             f"{view.keep_checkpoints + 1} checkpoints need ~{_gib(ckpt)}",
                             "free space, use --output-dir elsewhere, or lower --keep-checkpoints"))
        else:
            need = f", checkpoints need ~{_gib(ckpt)}" if ckpt else ""
            out.append(Check("disk", "output folder", "ok", f"{o.path}: {_gib(o.free)} free{need}"))
    n = f.paths.get("nvme")
    if view.nvme_path and n is not None:
        need = None if f.params is None else offload_bytes(view, f.params)[1]
        fs = f" ({n.fstype})" if n.fstype else ""
        if not n.writable:
            out.append(Check("disk", "NVMe path", "fail", f"{n.path}{fs}: not writable ({n.error or 'permission'})",
                             f"mkdir -p {n.path} && chown $USER {n.path}, or choose another --nvme-path"))
        elif need is not None and n.free is not None and need > n.free:
            out.append(Check("disk", "NVMe path", "fail", f"{n.path}{fs}: {_gib(n.free)} free, offload needs "
                             f"~{_gib(need)}", "free space or choose another --nvme-path"))
        elif n.fstype in ("nfs", "nfs4", "cifs", "smb3", "fuse", "fuse.sshfs", "tmpfs", "overlay"):
            out.append(Check("disk", "NVMe path", "warn", f"{n.path}{fs}: not a local disk; "
                             f"{_gib(n.free)} free", "point --nvme-path at a local NVMe drive"))
        else:
            need_s = f", offload needs ~{_gib(need)}" if need is not None else ""
            out.append(Check("disk", "NVMe path", "ok", f"{n.path}{fs}: writable, {_gib(n.free)} free{need_s}"))
    return out


# NCCL/torch variables that slow or break training, with what they do and on which machines.
def check_env(f: Facts, view: RunView | None) -> list[Check]:
    env, hw = f.environ, f.hardware
    out = []
    multi_gpu = hw.gpu_count > 1
    has_p2p = bool(hw.nvlink_pairs or hw.p2p_pairs)
    link = "NVLink" if hw.nvlink_pairs else "PCIe peer-to-peer"
    if env.get("NCCL_P2P_DISABLE", "0") not in ("", "0") and multi_gpu and has_p2p:
        out.append(Check("network", "NCCL_P2P_DISABLE", "warn",
                         f"NCCL_P2P_DISABLE={env['NCCL_P2P_DISABLE']} turns off {link} between the GPUs: "
                         "collectives go through host memory, several times slower", "unset NCCL_P2P_DISABLE"))
    if env.get("NCCL_P2P_LEVEL", "").upper() in ("LOC", "0") and multi_gpu and has_p2p:
        out.append(Check("network", "NCCL_P2P_LEVEL", "warn", f"NCCL_P2P_LEVEL={env['NCCL_P2P_LEVEL']} disables "
                         f"{link} between the GPUs", "unset NCCL_P2P_LEVEL"))
    if env.get("NCCL_SHM_DISABLE", "0") not in ("", "0") and multi_gpu and not has_p2p:
        out.append(Check("network", "NCCL_SHM_DISABLE", "warn", "NCCL_SHM_DISABLE with GPUs that have no "
                         "peer-to-peer: NCCL falls back to sockets within the machine", "unset NCCL_SHM_DISABLE"))
    if env.get("NCCL_IB_DISABLE", "0") not in ("", "0") and view is not None and view.machines > 1 and not view.use_cpu:
        out.append(Check("network", "NCCL_IB_DISABLE", "warn", "NCCL_IB_DISABLE: machines talk over TCP sockets, "
                         "not InfiniBand/RoCE", "unset NCCL_IB_DISABLE unless the machines have no IB/RoCE"))
    for var in ("NCCL_ALGO", "NCCL_PROTO"):
        if env.get(var):
            out.append(Check("network", var, "warn", f"{var}={env[var]} overrides NCCL's own tuning",
                             f"unset {var} unless you measured it faster"))
    if env.get("NCCL_DEBUG", "").upper() == "TRACE":
        out.append(Check("network", "NCCL_DEBUG", "warn", "NCCL_DEBUG=TRACE logs every call and slows training",
                         "use NCCL_DEBUG=INFO or WARN"))
    if env.get("CUDA_LAUNCH_BLOCKING", "0") not in ("", "0") and hw.gpus:
        out.append(Check("network", "CUDA_LAUNCH_BLOCKING", "warn", "CUDA_LAUNCH_BLOCKING=1 serialises every "
                         "kernel launch (a debugging aid)", "unset CUDA_LAUNCH_BLOCKING"))
    if env.get("TORCH_DISTRIBUTED_DEBUG", "").upper() == "DETAIL":
        out.append(Check("network", "TORCH_DISTRIBUTED_DEBUG", "warn", "TORCH_DISTRIBUTED_DEBUG=DETAIL checks every "
                         "collective and slows training", "unset TORCH_DISTRIBUTED_DEBUG"))
    for var in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
        value = env.get(var)
        if value and not value.startswith("^") and f.interfaces:
            names = [n.strip() for n in value.split(",") if n.strip()]
            found = any((n[1:] in f.interfaces) if n.startswith("=") else any(i.startswith(n) for i in f.interfaces)
                        for n in names)
            if not found:
                out.append(Check("network", var, "fail", f"{var}={value} matches no interface here "
                                 f"({', '.join(f.interfaces)})", f"set {var} to one of them or unset it"))
    return out


def check_network(f: Facts, view: RunView | None) -> list[Check]:
    out = check_env(f, view)
    if view is None:
        return out
    if view.machines > 1:
        if f.address_error:
            out.append(Check("network", "main address", "fail", f"{view.main_ip}: {f.address_error}",
                             "set --main-process-ip to an address of the rank-0 machine that resolves here"))
        else:
            resolved = f" -> {f.address}" if f.address and f.address != view.main_ip else ""
            out.append(Check("network", "main address", "ok", f"{view.main_ip}{resolved}"))
        if view.launcher == "deepspeed":
            for tool in ("pdsh", "ssh"):
                path = f.tools.get(tool)
                out.append(Check("network", tool, "ok" if path else "fail",
                                 path or f"not found: the DeepSpeed hostfile launcher needs {tool}",
                                 "" if path else f"apt-get install {'pdsh' if tool == 'pdsh' else 'openssh-client'}, "
                                 "or use --launcher accelerate"))
    if f.port_checked:
        where = "on this machine (rank 0)" if view.machines > 1 else "for the local rendezvous"
        if f.port_error:
            out.append(Check("network", "port", "fail", f"{view.port} {where}: {f.port_error}",
                             "choose another --main-process-port (or stop the run that holds it)"))
        else:
            out.append(Check("network", "port", "ok", f"{view.port} is free {where}"))
    elif view.machines > 1:
        out.append(Check("network", "port", "ok", f"{view.port}: checked on the rank-0 machine, not here"))
    return out


def check_run(view: RunView | None, spec_error: str | None) -> list[Check]:
    if view is None:
        return [Check("run", "settings", "fail", spec_error or "invalid settings", "fix the settings named above")]
    out = []
    where = "CPU processes" if view.use_cpu else "GPU processes"
    why = {k: w for k, _, w in view.decisions}
    detail = f"{view.processes} {where}" + (f" over {view.machines} machines" if view.machines > 1 else "")
    if "cluster.num_processes" in why:
        detail += f" (auto: {why['cluster.num_processes']})"
    out.append(Check("run", "processes", "ok", detail))
    pdetail = view.precision + (f" (auto: {why['precision']})" if "precision" in why else "")
    fp16_warning = [w for w in view.warnings if "fp16" in w]
    out.append(Check("run", "precision", "warn" if fp16_warning else "ok", pdetail,
                     "expected on GPUs older than Ampere; watch for skipped steps, or use --precision fp32"
                     if fp16_warning else ""))
    for w in view.warnings:
        if w not in fp16_warning:
            out.append(Check("run", "decision", "warn", w, ""))
    for p in view.problems:
        out.append(Check("run", "settings vs machine", "fail", p.split(": ")[0], p.rsplit(": ", 1)[-1]))
    return out + check_model_folder(view.model)


def check_model_folder(name: str) -> list[Check]:
    """A local model folder's files, as `craken train` checks them before launch (modelcheck)."""
    from . import modelcheck

    folder = Path(name).expanduser()
    if not (folder / "config.json").is_file():
        return []
    tokenizer = folder if (folder / "tokenizer.json").is_file() else None
    problems = modelcheck.folder_problems(f"--model {name}", folder, False, tokenizer, f"--model {name}")
    if not problems:
        return [Check("run", "model files", "ok", f"{folder}: config.json, tokenizer and weights headers read")]
    return [Check("run", "model files", "fail", p, "fix the file named, or choose another --model") for p in problems]


# ---------------------------------------------------------------------------------------------
# gathering facts (impure, cheap: no heavy imports)


def gather(hw: Hardware, view: RunView | None, environ: Mapping[str, str] | None = None) -> Facts:
    import importlib.metadata as md

    environ = dict(os.environ if environ is None else environ)
    versions: dict[str, str | None] = {}
    requires: dict[str, list[str]] = {}
    for dist in dict.fromkeys((*STACK, *DECLARERS)):  # ordered, no duplicates
        try:
            d = md.distribution(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
            continue
        versions[dist] = d.version
        requires[dist] = list(d.requires or [])
    python_requires = None
    try:
        python_requires = md.metadata("craken").get("Requires-Python")
    except md.PackageNotFoundError:
        pass
    # what the stack declares on other packages (numpy, huggingface-hub, ...): their versions too
    for declarer in DECLARERS:
        for r in _requirements(requires.get(declarer, [])):
            name = r.name
            if name not in versions:
                try:
                    versions[name] = md.version(name)
                except md.PackageNotFoundError:
                    pass  # an unmet requirement of the declarer; pip would have said so
    for pkg, _, other, *_ in KNOWN_BAD:
        for name in (pkg, other):
            if name not in versions:
                try:
                    versions[name] = md.version(name)
                except md.PackageNotFoundError:
                    versions[name] = None
    try:
        versions["torchao"] = md.version("torchao")  # precision fp8 (craken[fp8])
    except md.PackageNotFoundError:
        versions["torchao"] = None
    torch_build = torch_build_of(versions.get("torch"), requires.get("torch", []))

    tools = {
        "ninja": shutil.which("ninja"),
        "c++": shutil.which(environ.get("CXX", "c++")),
        "pdsh": shutil.which("pdsh"),
        "ssh": shutil.which("ssh"),
    }
    # torch.utils.cpp_extension's search, without importing torch: CUDA_HOME, CUDA_PATH, nvcc, /usr/local/cuda
    cuda_home = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    nvcc_on_path = shutil.which("nvcc")
    if not cuda_home and nvcc_on_path:
        cuda_home = str(Path(os.path.realpath(nvcc_on_path)).parent.parent)
    if not cuda_home and os.path.isdir("/usr/local/cuda"):
        cuda_home = "/usr/local/cuda"
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    tools["nvcc"] = nvcc if nvcc and os.access(nvcc, os.X_OK) else None
    cuda_toolkit = _toolkit_version(cuda_home) if tools["nvcc"] else None

    prebuilt, jit = _deepspeed_ops(environ)
    locks = stale_build_locks(list(OP_BUILDERS), environ)
    try:
        interfaces = tuple(sorted(os.listdir("/sys/class/net")))
    except OSError:
        interfaces = ()

    facts = Facts(hardware=hw, versions=versions, requires=requires, python=tuple(sys.version_info[:3]),
                  python_requires=python_requires, torch_build=torch_build, environ=environ, tools=tools,
                  cuda_home=cuda_home, cuda_toolkit=cuda_toolkit, prebuilt_ops=prebuilt, jit_cache=jit,
                  jit_locks=locks, interfaces=interfaces)
    if view is None:
        return facts
    from .preflight import TRACKER_PACKAGES

    for name in TRACKER_PACKAGES.get(view.report_to, ()):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    if "async_io" in needed_ops(view):
        facts.aio_library, facts.aio_header, facts.aio_link = find_libaio(environ)
    facts.paths["output"] = path_state(view.output_dir)
    if view.nvme_path:
        facts.paths["nvme"] = path_state(view.nvme_path)
    facts.params, facts.params_source = model_params(view.model, environ)  # reads a config.json at most
    if view.machines > 1 and view.main_ip:
        facts.address, facts.address_error = resolve_address(view.main_ip)
    if view.rank == 0:
        facts.port_checked = True
        facts.port_error = port_error(view.port)
    return facts


def _toolkit_version(cuda_home: str) -> tuple[int, int] | None:
    """nvcc's release from the toolkit's version.json (CUDA >= 11.1) or version.txt, without running it."""
    try:
        data = json.loads(Path(cuda_home, "version.json").read_text())
        return _pair((data.get("cuda_nvcc") or data.get("cuda") or {}).get("version", ""))
    except (OSError, ValueError, AttributeError):
        pass
    try:
        return _pair(re.sub(r"^\D+", "", Path(cuda_home, "version.txt").read_text()))
    except OSError:
        return None


def _deepspeed_ops(environ: Mapping[str, str]) -> tuple[dict[str, bool], dict[str, str]]:
    """DeepSpeed's pre-built ops (from its installed git_version_info, read not imported) and JIT builds
    cached by torch.utils.cpp_extension."""
    import ast
    import importlib.util

    prebuilt: dict[str, bool] = {}
    try:
        spec = importlib.util.find_spec("deepspeed")  # locates the package without importing it
        folder = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None
    except (ImportError, ValueError):
        folder = None
    if folder:
        try:
            tree = ast.parse(Path(folder, "git_version_info_installed.py").read_text())
            for node in tree.body:
                if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "installed_ops" for t in node.targets):
                    prebuilt = {k: bool(v) for k, v in ast.literal_eval(node.value).items()}
        except (OSError, SyntaxError, ValueError):
            pass
    jit = {}
    for root in extension_roots(environ):
        for op in OP_BUILDERS:
            if op not in jit and glob.glob(os.path.join(root, op, f"{op}*.so")):
                jit[op] = os.path.join(root, op)
    return prebuilt, jit


def find_libaio(environ: Mapping[str, str]) -> tuple[str | None, str | None, str | None]:
    """libaio's (shared library the loader finds, libaio.h, libaio.so for the linker), each None when
    missing. Where DeepSpeed's build looks: the compiler's usual folders, CPATH/LIBRARY_PATH and
    CFLAGS -I / LDFLAGS -L (its own libaio test links with $LDFLAGS)."""
    import ctypes.util
    import shlex

    def flag_dirs(var: str, flag: str) -> list[str]:
        try:
            words = shlex.split(environ.get(var, ""))
        except ValueError:
            words = environ.get(var, "").split()
        return [w[len(flag):] for w in words if w.startswith(flag) and len(w) > len(flag)]

    def path_dirs(*names: str) -> list[str]:
        return [d for n in names for d in environ.get(n, "").split(os.pathsep) if d]

    include = [*flag_dirs("CFLAGS", "-I"), *flag_dirs("CXXFLAGS", "-I"),
               *path_dirs("CPATH", "C_INCLUDE_PATH", "CPLUS_INCLUDE_PATH"),
               "/usr/local/include", "/usr/include", *sorted(glob.glob("/usr/include/*-linux-gnu"))]
    lib = [*flag_dirs("LDFLAGS", "-L"), *path_dirs("LIBRARY_PATH"), "/usr/local/lib", "/usr/local/lib64",
           "/usr/lib64", "/usr/lib", "/lib64", "/lib", *sorted(glob.glob("/usr/lib/*-linux-gnu")),
           *sorted(glob.glob("/lib/*-linux-gnu"))]
    header = next((p for d in include if os.path.isfile(p := os.path.join(d, "libaio.h"))), None)
    link = next((p for d in lib if os.path.exists(p := os.path.join(d, "libaio.so"))), None)
    try:
        library = ctypes.util.find_library("aio")  # ldconfig's cache and LD_LIBRARY_PATH, as the loader
    except Exception:  # a broken ldconfig/gcc: fall back to the linker's copy
        library = None
    return library or link, header, link


def path_state(path: str) -> PathState:
    """Can the run write at `path` (created if missing, as DeepSpeed and craken do)? Tested by
    writing a temporary file in the nearest existing folder, since permissions and read-only
    mounts both show only then."""
    p = Path(path).absolute()
    exists = p.exists()
    probe = nearest_existing(p)
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        free = None
    error = None
    if not probe.is_dir():
        error = f"{probe} is not a folder"
    else:
        try:
            fd, name = tempfile.mkstemp(prefix=".craken-doctor-", dir=probe)
            os.close(fd)
            os.unlink(name)
        except OSError as exc:
            error = exc.strerror or str(exc)
    return PathState(str(path), exists, error is None, free, _fstype(probe), error)


def _fstype(path: Path) -> str | None:
    """File system type of the mount holding `path` (longest mount point prefix in /proc/mounts)."""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, kind = "", None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, kind = mount, parts[2]
    return kind


def resolve_address(host: str) -> tuple[str | None, str | None]:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return None, f"does not resolve ({exc.args[-1] if exc.args else exc})"
    return (infos[0][4][0] if infos else None), None


def port_error(port: int) -> str | None:
    """Why the rendezvous could not listen on `port` here (None: it can). Bound the way torch's
    TCPStore binds it (all addresses, SO_REUSEADDR), then released at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
            s.listen(1)
        except OSError as exc:
            return "already in use" if exc.errno == 98 else (exc.strerror or str(exc))
    return None


# ---------------------------------------------------------------------------------------------
# --deep: import torch and DeepSpeed, build the ops


def deep_checks(view: RunView | None) -> list[Check]:
    """Slow (seconds to minutes): what torch really sees, and whether the ops the run needs really
    build and load (with invalid settings, `view` None: cpu_adam, and fused_adam on CUDA)."""
    out = []
    try:
        import torch
    except Exception as exc:  # a broken install shows here, that's the point
        return [Check("deep", "import torch", "fail", f"{type(exc).__name__}: {exc}", "reinstall torch")]
    cuda = torch.cuda.is_available()
    out.append(Check("deep", "torch", "ok", f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                     f"{torch.cuda.device_count() if cuda else 0} GPU(s) visible to torch"))
    try:
        from deepspeed.accelerator import get_accelerator
    except Exception as exc:
        return out + [Check("deep", "import deepspeed", "fail", f"{type(exc).__name__}: {exc}", "reinstall deepspeed")]
    acc = get_accelerator()
    out.append(Check("deep", "accelerator", "ok", f"DeepSpeed accelerator: {acc._name}"))
    out += _fp8_probe_check(view, cuda)
    ops = needed_ops(view) if view is not None else ["cpu_adam", "fused_adam"]
    ops = [op for op in ops if op != "fused_adam" or acc._name == "cuda"]  # DeepSpeed's FusedAdam is CUDA's
    if not ops:
        out.append(Check("deep", "ops", "ok", "these settings load no DeepSpeed op: nothing to build"))
    for op in ops:
        name = OP_BUILDERS[op]
        builder = acc.create_op_builder(name)
        if builder is None:
            out.append(Check("deep", op, "fail", f"DeepSpeed has no {name} for {acc._name}", "reinstall deepspeed"))
            continue
        try:
            builder.load(verbose=False)
        except BaseException as exc:  # build failures come as SystemExit/RuntimeError/CalledProcessError
            if isinstance(exc, KeyboardInterrupt):
                raise
            msg = str(exc).strip().splitlines()
            fix = ("read the compiler output above; check ninja, the C++ compiler and CUDA_HOME"
                   + ("; " + _aio_fix(view) if op == "async_io" else ""))
            out.append(Check("deep", builder.NAME, "fail", f"build failed: {msg[-1] if msg else type(exc).__name__}",
                             fix))
        else:
            out.append(Check("deep", builder.NAME, "ok", "built and loaded"))
    return out


def _fp8_probe_check(view: RunView | None, cuda: bool) -> list[Check]:
    """--deep: one float8 matmul through torchao on GPU 0, where the run asks for fp8 or could use it."""
    import importlib.util

    import torch

    from .train import fp8

    asked = view is not None and view.precision == "fp8"
    capable = cuda and torch.cuda.get_device_capability(0) >= fp8.MIN_CAPABILITY
    if not capable or not (asked or importlib.util.find_spec("torchao")):
        return []
    why = fp8.probe("cuda:0")
    if why is None:
        return [Check("deep", "fp8 matmul", "ok", "one float8 matmul (torchao, forward and backward) ran on GPU 0")]
    return [Check("deep", "fp8 matmul", "fail" if asked else "warn", f"torchao's float8 matmul failed: {why}",
                  "install the torchao release built for this torch (pip install 'craken[fp8]'), or --precision bf16")]


# ---------------------------------------------------------------------------------------------
# output


def hardware_dict(hw: Hardware) -> dict:
    d = asdict(hw)
    d["nvlink_pairs"] = sorted(map(list, hw.nvlink_pairs))
    d["p2p_pairs"] = sorted(map(list, hw.p2p_pairs))
    for g, raw in zip(d["gpus"], hw.gpus):
        g["capability"] = list(raw.capability)
        g["bf16"], g["fp8"] = raw.bf16, raw.fp8
    d["links"] = hw.links()
    return d


def report_dict(checks: list[Check], facts: Facts) -> dict:
    v = verdict(checks)
    return {
        "verdict": v, "exit_code": EXIT_CODES[v],
        "counts": {s: sum(c.status == s for c in checks) for s in EXIT_CODES},
        "checks": [asdict(c) for c in checks],
        "hardware": hardware_dict(facts.hardware),
        "versions": {k: facts.versions.get(k) for k in STACK},
        "torch_build": facts.torch_build,
    }


def verdict_line(checks: list[Check]) -> str:
    v = verdict(checks)
    n = {s: sum(c.status == s for c in checks) for s in EXIT_CODES}
    if v == "ok":
        return f"verdict: ok, all {len(checks)} checks passed (exit 0)"
    parts = [f"{n['fail']} failure(s)"] if n["fail"] else []
    parts += [f"{n['warn']} warning(s)"] if n["warn"] else []
    word = "FAIL" if v == "fail" else "WARN"
    return f"verdict: {word}, {', '.join(parts)} in {len(checks)} checks (exit {EXIT_CODES[v]})"


def render_plain(checks: list[Check]) -> str:
    """Text for pipes and logs: no colours, no box drawing, one line per check (+ its fix)."""
    lines = []
    area = None
    for c in checks:
        if c.area != area:
            area = c.area
            lines.append(f"[{area}]")
        lines.append(f"  {c.status.upper():4}  {c.name}: {c.detail}")
        if c.fix and c.status != "ok":
            lines.append(f"        fix: {c.fix}")
    lines.append(verdict_line(checks))
    return "\n".join(lines)
