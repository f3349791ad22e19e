"""Checks of the GPUs, the driver and torch's CUDA build, and FP8 support."""

from __future__ import annotations

from ..plan.hardware import GiB, Hardware
from .model import Check, Facts, RunView, Status, fmt_gib, major_minor


def check_gpus(facts: Facts, view: RunView | None) -> list[Check]:
    hw = facts.hardware
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
                             f"{g.name}, {fmt_gib(g.memory_total)} ({fmt_gib(g.memory_free)} free), "
                             f"compute capability {g.capability[0]}.{g.capability[1]}, {feats}",
                             f"{fmt_gib(used)} in use by other processes: find them with nvidia-smi" if busy else ""))
        if hw.gpu_count > 1:
            missing_p2p = [p for p in hw.pairs() if p not in hw.p2p_pairs and p not in hw.nvlink_pairs]
            out.append(Check("gpu", "links", "warn" if missing_p2p else "ok", hw.links(),
                             "check `nvidia-smi topo -p2p r`; in VMs and containers enable PCIe ACS/IOMMU "
                             "pass-through so NCCL can use peer-to-peer" if missing_p2p else ""))
    build = facts.torch_build
    if facts.versions.get("torch") is None:
        pass  # reported under packages
    elif build is None:
        out.append(Check("gpu", "torch build", "ok", f"torch {facts.versions['torch']}: CUDA version unknown"))
    elif build == "cpu":
        if hw.gpus:
            out.append(Check("gpu", "torch build", "fail", f"torch {facts.versions['torch']} is a CPU-only build but "
                             f"{hw.gpu_count} GPU(s) are here", torch_fix(hw)))
        else:
            out.append(Check("gpu", "torch build", "ok",
                             f"torch {facts.versions['torch']}: CPU-only build, no GPU here"))
    elif build.startswith("rocm"):
        out.append(Check("gpu", "torch build", "fail" if hw.gpus else "ok",
                         f"torch {facts.versions['torch']} is a ROCm build"
                         + (" but the GPUs are NVIDIA" if hw.gpus else ""),
                         torch_fix(hw) if hw.gpus else ""))
    else:
        tb = major_minor(build)
        drv = hw.cuda_driver_version
        if not hw.gpus:
            out.append(Check("gpu", "torch build", "ok", f"torch {facts.versions['torch']}: CUDA {build} build, no GPU "
                             "here (CPU processes)"))
        elif drv is None or tb is None:
            out.append(Check("gpu", "torch build", "ok", f"CUDA {build} build; driver's CUDA version unknown"))
        elif tb[0] > drv[0]:
            out.append(Check("gpu", "torch build", "fail", f"torch is built for CUDA {build} but driver "
                             f"{hw.driver_version} supports CUDA {drv[0]}.{drv[1]} at most: torch sees no GPU",
                             f"upgrade the NVIDIA driver, or {torch_fix(hw)}"))
        elif tb > drv:
            out.append(Check("gpu", "torch build", "warn", f"torch is built for CUDA {build}, driver supports "
                             f"{drv[0]}.{drv[1]}: runs through minor-version compatibility, but kernels that need "
                             "PTX JIT fail", f"upgrade the NVIDIA driver, or {torch_fix(hw)}"))
        else:
            out.append(Check("gpu", "torch build", "ok", f"CUDA {build} build, driver supports CUDA "
                             f"{drv[0]}.{drv[1]}"))
    return out


def check_fp8(facts: Facts, view: RunView | None) -> list[Check]:
    """FP8 readiness on GPU machines: float8 tensor cores (compute capability >= 8.9) and torchao; a
    failure only where the run asks for fp8 (its refusal on CPU processes is the run area's)."""
    from ..train import fp8

    gpus = facts.hardware.gpus
    asked = view is not None and view.precision == "fp8"
    if not gpus:
        return []
    need = ".".join(map(str, fp8.MIN_CAPABILITY))
    old = [g for g in gpus if not g.fp8]
    if old:
        cap = ".".join(map(str, old[0].capability))
        return [] if asked else [Check("gpu", "fp8", "ok", f"not available: {old[0].name} has compute capability "
                                       f"{cap}, float8 matmuls need {need} (bf16 is what this GPU runs)")]
    torchao = facts.versions.get("torchao")
    if torchao is None:
        return [Check("gpu", "fp8", "fail" if asked else "ok", "float8 tensor cores, but torchao is not installed"
                      + ("" if asked else f" ({fp8.INSTALL_HINT} for --precision fp8)"),
                      fp8.INSTALL_HINT if asked else "")]
    use = "this run trains in fp8" if asked else "--precision fp8 to use it"
    return [Check("gpu", "fp8", "ok", f"ready: compute capability >= {need}, torchao {torchao} ({use}; "
                  "`craken doctor --deep` runs one float8 matmul)")]


def torch_fix(hw: Hardware) -> str:
    drv = hw.cuda_driver_version
    cap = f" for CUDA {drv[0]}.{drv[1]} or older" if drv else ""
    return f"install a torch CUDA build{cap}: pip install torch --index-url https://download.pytorch.org/whl/cuXYZ"
