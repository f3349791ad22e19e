"""Reading the facts from this machine (impure, cheap: package metadata, PATH, sockets, disks; no
heavy imports)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Mapping

from ..plan.hardware import Hardware, nearest_existing
from .dsops import OP_BUILDERS, deepspeed_ops, find_libaio, stale_build_locks
from .model import DECLARERS, KNOWN_BAD, STACK, Facts, PathState, RunView, major_minor, needed_ops
from .network import port_error, resolve_address
from .packages import applicable_requirements, torch_build_of
from .resources import model_params


def gather(hw: Hardware, view: RunView | None, environ: Mapping[str, str] | None = None) -> Facts:
    environ = dict(os.environ if environ is None else environ)
    versions, requires, python_requires = package_versions()
    tools, cuda_home, cuda_toolkit = build_tools(environ)
    prebuilt, jit = deepspeed_ops(environ)
    try:
        interfaces = tuple(sorted(os.listdir("/sys/class/net")))
    except OSError:
        interfaces = ()
    facts = Facts(hardware=hw, versions=versions, requires=requires, python=tuple(sys.version_info[:3]),
                  python_requires=python_requires,
                  torch_build=torch_build_of(versions.get("torch"), requires.get("torch", [])), environ=environ,
                  tools=tools, cuda_home=cuda_home, cuda_toolkit=cuda_toolkit, prebuilt_ops=prebuilt, jit_cache=jit,
                  jit_locks=stale_build_locks(list(OP_BUILDERS), environ), interfaces=interfaces)
    if view is not None:
        add_run_facts(facts, view)
    return facts


def _version(name: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def package_versions() -> tuple[dict[str, str | None], dict[str, list[str]], str | None]:
    """(distribution -> version or None, distribution -> Requires-Dist lines, craken's Requires-Python)
    for the stack, what it declares (numpy, huggingface-hub, ...), KNOWN_BAD's packages and torchao."""
    import importlib.metadata as md

    versions: dict[str, str | None] = {}
    requires: dict[str, list[str]] = {}
    for dist in dict.fromkeys((*STACK, *DECLARERS)):  # ordered, no duplicates
        try:
            distribution = md.distribution(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
            continue
        versions[dist] = distribution.version
        requires[dist] = list(distribution.requires or [])
    try:
        python_requires = md.metadata("craken").get("Requires-Python")
    except md.PackageNotFoundError:
        python_requires = None
    for declarer in DECLARERS:
        for requirement in applicable_requirements(requires.get(declarer, [])):
            if requirement.name not in versions and (found := _version(requirement.name)) is not None:
                versions[requirement.name] = found  # a missing one is an unmet requirement: pip would have said so
    for pkg, _, other, *_ in KNOWN_BAD:
        for name in (pkg, other):
            if name not in versions:
                versions[name] = _version(name)
    versions["torchao"] = _version("torchao")  # precision fp8 (craken[fp8])
    return versions, requires, python_requires


def build_tools(environ: Mapping[str, str]) -> tuple[dict[str, str | None], str | None, tuple[int, int] | None]:
    """(tool -> path, CUDA home, nvcc's version) as torch.utils.cpp_extension searches them, without
    importing torch: CUDA_HOME, CUDA_PATH, nvcc on PATH, /usr/local/cuda."""
    tools = {name: shutil.which(name) for name in ("ninja", "pdsh", "ssh")}
    tools["c++"] = shutil.which(environ.get("CXX", "c++"))
    cuda_home = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    nvcc_on_path = shutil.which("nvcc")
    if not cuda_home and nvcc_on_path:
        cuda_home = str(Path(os.path.realpath(nvcc_on_path)).parent.parent)
    if not cuda_home and os.path.isdir("/usr/local/cuda"):
        cuda_home = "/usr/local/cuda"
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    tools["nvcc"] = nvcc if nvcc and os.access(nvcc, os.X_OK) else None
    return tools, cuda_home, (_toolkit_version(cuda_home) if tools["nvcc"] else None)


def add_run_facts(facts: Facts, view: RunView) -> None:
    """What only this run needs read: its tracker's package, libaio, its folders, model size, address, port."""
    from ..launch.preflight import TRACKER_PACKAGES

    for name in TRACKER_PACKAGES.get(view.spec.logging.report_to, ()):
        facts.versions[name] = _version(name)
    if "async_io" in needed_ops(view):
        facts.aio_library, facts.aio_header, facts.aio_link = find_libaio(facts.environ)
    facts.paths["output"] = path_state(view.spec.output.run_dir())
    if view.nvme_path:
        facts.paths["nvme"] = path_state(view.nvme_path)
    model = view.spec.model.name_or_path
    facts.params, facts.params_source = model_params(model, facts.environ)  # reads a config.json at most
    if view.machines > 1 and view.spec.cluster.main_process_ip:
        facts.address, facts.address_error = resolve_address(view.spec.cluster.main_process_ip)
    if view.spec.cluster.machine_rank == 0:
        facts.port_checked = True
        facts.port_error = port_error(view.spec.cluster.main_process_port)


def _toolkit_version(cuda_home: str) -> tuple[int, int] | None:
    """nvcc's release from the toolkit's version.json (CUDA >= 11.1) or version.txt, without running it."""
    try:
        data = json.loads(Path(cuda_home, "version.json").read_text())
        return major_minor((data.get("cuda_nvcc") or data.get("cuda") or {}).get("version", ""))
    except (OSError, ValueError, AttributeError):
        pass
    try:
        return major_minor(re.sub(r"^\D+", "", Path(cuda_home, "version.txt").read_text()))
    except OSError:
        return None


def path_state(path: str) -> PathState:
    """Can the run write at `path` (created if missing, as DeepSpeed and craken do)? Tested by
    writing a temporary file in the nearest existing folder, since permissions and read-only
    mounts both show only then."""
    target = Path(path).absolute()
    exists = target.exists()
    probe = nearest_existing(target)
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
