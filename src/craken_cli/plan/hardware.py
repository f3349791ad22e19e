"""What this machine has: GPUs (through NVML, no torch import), links, CPU, RAM, /dev/shm, disk.

`detect()` is the only entry point. GPU facts come from a `GpuProbe`; the real one talks to NVML
and tests pass a fake (`FakeProbe`), the one place where a GPU is mocked. A machine without GPUs or
without NVML is a normal case: zero GPUs, never an error.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Protocol

GiB = 1024**3


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    memory_total: int  # bytes
    memory_free: int  # bytes
    capability: tuple[int, int]
    uuid: str | None = None  # "GPU-..." as CUDA_VISIBLE_DEVICES may name it

    @property
    def bf16(self) -> bool:
        return self.capability >= (8, 0)

    @property
    def fp8(self) -> bool:
        return self.capability >= (8, 9)


@dataclass(frozen=True)
class Hardware:
    gpus: tuple[GPU, ...] = ()
    # unordered GPU index pairs joined by NVLink
    nvlink_pairs: frozenset[tuple[int, int]] = frozenset()
    # pairs that can reach each other peer-to-peer (NVLink or PCIe P2P)
    p2p_pairs: frozenset[tuple[int, int]] = frozenset()
    driver_version: str | None = None
    cuda_driver_version: tuple[int, int] | None = None  # highest CUDA the driver supports
    cpu_count: int = 1
    ram_total: int = 0  # bytes
    ram_available: int = 0
    shm_total: int | None = None  # bytes of /dev/shm, None where it does not exist
    disk_free: dict[str, int] = field(default_factory=dict)  # path -> free bytes at its nearest existing parent
    nvml_error: str | None = None  # why NVML gave nothing (no driver, no library): informational
    hidden_gpus: int = 0  # GPUs NVML sees that CUDA_VISIBLE_DEVICES hides from the training processes
    # the training processes' caching allocator grows segments in place (launch.command.grows_segments),
    # so the gradients a backward makes can take the blocks its freed activations leave (plan/memory.py)
    grown_segments: bool = True

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    @property
    def all_bf16(self) -> bool:
        return bool(self.gpus) and all(g.bf16 for g in self.gpus)

    def nvlink_between(self, first: int, second: int) -> bool:
        return (min(first, second), max(first, second)) in self.nvlink_pairs

    def pairs(self) -> list[tuple[int, int]]:
        count = self.gpu_count
        return [(i, j) for i in range(count) for j in range(i + 1, count)]

    @property
    def nvlink_all(self) -> bool:
        """Every pair of GPUs joined by NVLink (False with fewer than two GPUs)."""
        return self.gpu_count > 1 and all(p in self.nvlink_pairs for p in self.pairs())

    def links(self) -> str:
        """One line on how the GPUs reach each other, for reports."""
        pairs = self.pairs()
        if not pairs:
            return "single GPU" if self.gpus else "no GPU"
        nv = sum(p in self.nvlink_pairs for p in pairs)
        p2p = sum(p in self.p2p_pairs or p in self.nvlink_pairs for p in pairs)
        if nv == len(pairs):
            return f"NVLink between all {len(pairs)} pairs"
        parts = [f"NVLink {nv}/{len(pairs)} pairs"] if nv else []
        parts.append(f"peer-to-peer {p2p}/{len(pairs)} pairs" if p2p else "no peer-to-peer (through host memory)")
        return ", ".join(parts)


class GpuProbe(Protocol):
    """The small interface behind which GPU facts come; NVML in real life, a fake in tests."""

    def read(self) -> tuple[list[GPU], set[tuple[int, int]], set[tuple[int, int]], str | None,
                            tuple[int, int] | None]:
        """(gpus, nvlink pairs, p2p pairs, driver version, CUDA driver version); raise OSError if absent."""
        ...


class NvmlProbe:
    def read(self):
        try:
            import pynvml
        except ImportError as exc:  # nvidia-ml-py not installed
            raise OSError(f"nvidia-ml-py is not installed ({exc})") from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise OSError(f"NVML unavailable: {exc}") from None
        try:
            return self._read(pynvml)
        except pynvml.NVMLError as exc:
            raise OSError(f"NVML query failed: {exc}") from None
        finally:
            pynvml.nvmlShutdown()

    @staticmethod
    def _read(pynvml):
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        cuda_version = (cuda // 1000, (cuda % 1000) // 10)
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        gpus = []
        for i, h in enumerate(handles):
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append(GPU(i, _text(pynvml.nvmlDeviceGetName(h)), int(mem.total), int(mem.free),
                            tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h)),
                            _text(pynvml.nvmlDeviceGetUUID(h))))
        nvlink, p2p = set(), set()
        for i in range(len(handles)):
            for j in range(i + 1, len(handles)):
                # int(): some nvidia-ml-py releases define these indices as enums that ctypes
                # cannot pass ("Don't know how to convert parameter 3"). A link we cannot read is
                # reported as absent, never as a crash.
                for index, found in ((pynvml.NVML_P2P_CAPS_INDEX_NVLINK, nvlink),
                                     (pynvml.NVML_P2P_CAPS_INDEX_READ, p2p)):
                    try:
                        status = pynvml.nvmlDeviceGetP2PStatus(handles[i], handles[j], int(index))
                    except (pynvml.NVMLError, TypeError, ValueError, ctypes.ArgumentError):
                        continue
                    if int(status) == int(pynvml.NVML_P2P_STATUS_OK):
                        found.add((i, j))
        return gpus, nvlink, p2p, driver, cuda_version


@dataclass
class FakeProbe:
    """Hardware that this machine does not have, for tests and `craken plan --gpus N`."""

    gpus: list[GPU] = field(default_factory=list)
    nvlink: set[tuple[int, int]] = field(default_factory=set)
    p2p: set[tuple[int, int]] = field(default_factory=set)
    driver: str | None = "550.54.15"
    cuda: tuple[int, int] | None = (12, 4)

    def read(self):
        return list(self.gpus), set(self.nvlink), set(self.p2p | self.nvlink), self.driver, self.cuda


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _meminfo() -> tuple[int, int]:
    total = avail = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key == "MemTotal":
                total = int(rest.split()[0]) * 1024
            elif key == "MemAvailable":
                avail = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return total, avail


def nearest_existing(path: str | os.PathLike) -> Path:
    """`path` itself if it exists, else its nearest existing parent: where it would be created."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def free_disk(path: str | os.PathLike) -> int:
    """Free bytes where `path` would be created (its nearest existing parent)."""
    return shutil.disk_usage(nearest_existing(path)).free


def visible(gpus: list[GPU], nvlink: set, p2p: set, spec: str | None) -> tuple[list[GPU], set, set]:
    """The GPUs a CUDA process sees under CUDA_VISIBLE_DEVICES=`spec`, renumbered from 0 as CUDA does.

    NVML ignores that variable, so without this `--auto` would start one process per GPU of the
    machine while torch sees fewer. Entries are indices or (prefixes of) "GPU-..." UUIDs; CUDA stops
    at the first entry it cannot match, and so does this. Unset: all GPUs.
    """
    if spec is None:
        return gpus, nvlink, p2p
    chosen: list[GPU] = []
    for raw in spec.split(","):
        entry = raw.strip()
        if entry.isdigit() or entry.startswith("-") and entry[1:].isdigit():
            match = [g for g in gpus if g.index == int(entry)]
        elif entry.startswith("GPU-"):
            match = [g for g in gpus if g.uuid and g.uuid.startswith(entry)][:1]
        else:  # MIG-..., empty, garbage: CUDA stops enumerating here
            match = []
        if not match or match[0] in chosen:
            break
        chosen.append(match[0])
    renumber = {g.index: i for i, g in enumerate(chosen)}

    def remap(pairs: set) -> set:
        out = set()
        for a, b in pairs:
            if a in renumber and b in renumber:
                x, y = renumber[a], renumber[b]
                out.add((min(x, y), max(x, y)))
        return out

    return ([GPU(renumber[g.index], g.name, g.memory_total, g.memory_free, g.capability, g.uuid) for g in chosen],
            remap(nvlink), remap(p2p))


def detect(probe: GpuProbe | None = None, paths: tuple[str, ...] = (),
           environ: Mapping[str, str] | None = None) -> Hardware:
    """What this machine gives a training process. `environ` (default os.environ) is read for
    CUDA_VISIBLE_DEVICES and the allocator's setting only."""
    from ..launch.command import grows_segments

    probe = NvmlProbe() if probe is None else probe
    environ = os.environ if environ is None else environ
    gpus: list[GPU] = []
    nvlink: set = set()
    p2p: set = set()
    driver = cuda = error = None
    try:
        gpus, nvlink, p2p, driver, cuda = probe.read()
    except OSError as exc:
        error = str(exc)
    seen = len(gpus)
    gpus, nvlink, p2p = visible(gpus, nvlink, p2p, environ.get("CUDA_VISIBLE_DEVICES"))
    ram_total, ram_avail = _meminfo()
    shm = shutil.disk_usage("/dev/shm").total if os.path.isdir("/dev/shm") else None
    disk = {}
    for path in paths:
        try:
            disk[path] = free_disk(path)
        except OSError:
            pass
    return Hardware(
        gpus=tuple(gpus), nvlink_pairs=frozenset(nvlink), p2p_pairs=frozenset(p2p), driver_version=driver,
        cuda_driver_version=cuda, cpu_count=os.cpu_count() or 1, ram_total=ram_total, ram_available=ram_avail,
        shm_total=shm, disk_free=disk, nvml_error=error, hidden_gpus=seen - len(gpus),
        grown_segments=grows_segments(environ),
    )
