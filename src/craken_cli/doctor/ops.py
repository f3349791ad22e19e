"""Checks of the DeepSpeed ops a run loads: pre-built, cached JIT builds, the tools to build them."""

from __future__ import annotations

from .dsops import libaio_missing, nvme_offload_flags, stale_lock_message
from .model import DS_CUDA_MINOR_OK, Check, Facts, RunView, Status, major_minor, needed_ops


def check_ops(facts: Facts, view: RunView | None) -> list[Check]:
    hw = facts.hardware
    needed = needed_ops(view) if view is not None else []
    out = []
    if facts.versions.get("deepspeed") is None:
        return out  # reported under packages
    prebuilt = {op for op, on in facts.prebuilt_ops.items() if on}
    jit = [op for op in needed if op not in prebuilt]
    if "async_io" in needed and "async_io" in prebuilt and facts.prebuilt_ops.get("pin_memory") is False:
        jit.append("pin_memory")  # a pre-built async_io still loads pin_memory first (DeepSpeed >= 0.18)
    gpu_build = bool(hw.gpus) and facts.torch_build not in (None, "cpu")
    # what building each op needs
    need_tools = bool(jit)
    sev: Status = "fail" if need_tools else "warn"
    later = "" if need_tools else " (no op is built for these settings; --offload-optimizer cpu would need it)"
    ninja = facts.tools.get("ninja")
    out.append(Check("ops", "ninja", "ok" if ninja else sev, ninja or f"not found: DeepSpeed cannot build ops{later}",
                     "" if ninja else "pip install ninja"))
    cxx_name = facts.environ.get("CXX", "c++")
    cxx = facts.tools.get("c++")
    out.append(Check("ops", "C++ compiler", "ok" if cxx else sev,
                     cxx or f"{cxx_name} not found: DeepSpeed cannot build ops{later}",
                     "" if cxx else "install g++ (apt-get install build-essential) or set CXX"))
    cuda_ok = True
    if gpu_build:
        cuda_needed = "fused_adam" in jit
        csev: Status = "fail" if cuda_needed else "warn"
        tb = major_minor(facts.torch_build or "")
        if not facts.cuda_home or not facts.tools.get("nvcc"):
            cuda_ok = False
            out.append(Check("ops", "CUDA toolkit", csev, "nvcc not found (CUDA_HOME unset, nvcc not on PATH): "
                             "CUDA ops (fused_adam) cannot be built",
                             f"install the CUDA toolkit {facts.torch_build} and set CUDA_HOME, or use --set "
                             "optimizer.fused=false"))
        elif facts.cuda_toolkit is None or tb is None:
            out.append(Check("ops", "CUDA toolkit", "ok", f"{facts.cuda_home} (nvcc version unknown)"))
        else:
            tk = facts.cuda_toolkit
            tks, tbs = f"{tk[0]}.{tk[1]}", f"{tb[0]}.{tb[1]}"
            minor_ok = tk[0] == tb[0] and tks in DS_CUDA_MINOR_OK.get(tk[0], ()) and tbs in DS_CUDA_MINOR_OK.get(tk[0], ())
            if tk == tb or minor_ok or facts.environ.get("DS_SKIP_CUDA_CHECK") == "1":
                out.append(Check("ops", "CUDA toolkit", "ok",
                                 f"nvcc {tks} at {facts.cuda_home}, torch built for {tbs}"))
            else:
                cuda_ok = False
                out.append(Check("ops", "CUDA toolkit", csev, f"nvcc {tks} at {facts.cuda_home} but torch is built for "
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
        if op in facts.jit_locks and op not in prebuilt:
            lock, age = facts.jit_locks[op]
            out.append(Check("ops", op, "fail" if op in needed else "warn", f"{stale_lock_message(op, lock, age)}; {use}",
                             f"delete {lock} (when no build is running)"))
            continue
        if op in prebuilt:
            out.append(Check("ops", op, "ok", f"pre-built into deepspeed; {use}"))
            continue
        tools_ok = bool(ninja and cxx) and (op != "fused_adam" or cuda_ok)
        cached = f" (cached build in {facts.jit_cache[op]})" if op in facts.jit_cache else ""
        if tools_ok:
            first = "" if cached else ", about a minute at first use"
            out.append(Check("ops", op, "ok", f"can be built{first}{cached}; {use}"))
        else:
            status: Status = "fail" if op in needed else "warn"
            out.append(Check("ops", op, status, f"cannot be built (see above); {use}",
                             "fix the build tools above, or run `craken doctor --deep` for the build log"))
    if "async_io" in needed:
        out.append(_async_io_check(facts, view, prebuilt, bool(ninja and cxx), gpu_build))
    if facts.environ.get("DS_ACCELERATOR") == "cpu" and hw.gpus:
        out.append(Check("ops", "DS_ACCELERATOR", "warn", "DS_ACCELERATOR=cpu: DeepSpeed ignores the GPUs",
                         "unset DS_ACCELERATOR"))
    return out


def aio_fix(view: RunView | None) -> str:
    flags = nvme_offload_flags(view and view.offload_optimizer, view and view.offload_param)
    return ("apt install libaio-dev (or conda install libaio and point CFLAGS=-I / LDFLAGS=-L at it), "
            f"or offload to CPU RAM instead of NVMe: {' '.join(f + ' cpu' for f in flags) or '--offload-optimizer cpu'}")


def _async_io_check(facts: Facts, view: RunView | None, prebuilt: set[str], tools_ok: bool, gpu_build: bool) -> Check:
    """DeepSpeed's async_io op, which every NVMe offload loads: built against libaio (header and
    library) at first use, or pre-built (DS_BUILD_AIO=1), then it needs libaio's shared library only."""
    op, use = "async_io", "used by NVMe offload"
    fails = "the run would fail after launch with 'Unable to JIT load the async_io op'"
    if op in prebuilt:
        if not libaio_missing(True, facts.aio_library, facts.aio_header, facts.aio_link):
            return Check("ops", op, "ok", f"pre-built into deepspeed, {facts.aio_library} found; {use}")
        return Check("ops", op, "fail", f"pre-built into deepspeed but libaio's shared library is not found: it "
                     f"cannot load; {use}", aio_fix(view))
    if op in facts.jit_locks:
        lock, age = facts.jit_locks[op]
        return Check("ops", op, "fail", f"{stale_lock_message(op, lock, age)}; {use}",
                     f"delete {lock} (when no build is running)")
    missing = libaio_missing(False, facts.aio_library, facts.aio_header, facts.aio_link)
    if missing:
        return Check("ops", op, "fail", f"cannot be built: libaio is missing ({' and '.join(missing)} not found); "
                     f"{fails}", aio_fix(view))
    if not tools_ok:
        return Check("ops", op, "fail", f"cannot be built (see above); {use}",
                     "fix the build tools above, or run `craken doctor --deep` for the build log")
    if gpu_build and not facts.cuda_home:
        return Check("ops", op, "fail", f"cannot be built: DeepSpeed builds it against the CUDA headers and "
                     f"CUDA_HOME is unknown; {fails}", "install the CUDA toolkit and set CUDA_HOME")
    cached = f" (cached build in {facts.jit_cache[op]})" if op in facts.jit_cache else ", about a minute at first use"
    return Check("ops", op, "ok", f"can be built{cached}, libaio at {facts.aio_header}; {use}")
