"""The DeepSpeed ops a run loads (cpu_adam, fused_adam, async_io), where their builds live, left-over
build locks and libaio: facts that `preflight` (refusals before launch) and `doctor` (the report) both
read, without importing torch or DeepSpeed."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Mapping


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


def deepspeed_ops(environ: Mapping[str, str]) -> tuple[dict[str, bool], dict[str, str]]:
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


# About how long a first JIT build of each op takes on a 2-core machine (measured), for the note before launch.
BUILD_SECONDS = {"cpu_adam": 70, "fused_adam": 60, "async_io": 40}


def ops_to_build(spec, environ: Mapping[str, str]) -> list[str]:
    """The ops this run loads that are neither pre-built nor in torch's JIT cache: the first processes
    compile them (a minute or more, silent): `craken train` says so before launch."""
    ops = ops_for(spec.offload.optimizer.device, bool(spec.cluster.use_cpu), spec.optimizer.fused,
                  spec.offload.param.device)
    prebuilt, cached = deepspeed_ops(environ)
    return [op for op in ops if not prebuilt.get(op) and op not in cached]


def build_note(op: str, width: int) -> str:
    """Wrapped at `width`, as the summary it follows is (report/summary.WIDTH)."""
    import textwrap

    return textwrap.fill(f"craken: DeepSpeed's {op} op is built on first use (about {BUILD_SECONDS.get(op, 60)} s, "
                         "once; later runs load the cached build)", width, subsequent_indent="  ")
