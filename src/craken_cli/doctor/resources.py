"""Checks of host memory (offload, /dev/shm) and disk room for checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from .model import BUILTIN_PARAMS_BOUND, SHM_MIN, Check, Facts, RunView, fmt_count, fmt_gib


def model_params(name: str, environ: Mapping[str, str]) -> tuple[int | None, str]:
    """Parameter count from the model's config (the built-in one, or a config.json on disk), counted as the
    planner counts it (plan/modelinfo.config_params)."""
    if name.startswith("builtin:"):
        try:
            from ..plan.modelinfo import builtin_config

            return params_from_config(builtin_config(name)), "built-in model"
        except Exception:  # an unknown built-in name, or train/builtin.py changed: an upper bound still answers
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
        count = params_from_config(cfg) if isinstance(cfg, dict) else None  # the model check names a bad file
        if count:
            return count, f"estimated from {path}"
    return None, f"no config.json for {name!r} on this machine"


def params_from_config(cfg: Mapping[str, Any]) -> int | None:
    """Parameters from a HF config: the planner's count (modelinfo.config_params)."""
    from ..plan.modelinfo import config_params

    return config_params(dict(cfg))


def offload_bytes(view: RunView, params: int) -> tuple[int, int]:
    """(CPU RAM, NVMe) bytes per machine that the offloaded states take, NVMe's host buffers included: the
    planner's count (plan.memory.offload_host_bytes), partitioned over all processes."""
    from ..plan.memory import SwapSettings, offload_host_bytes

    cpu, nvme = offload_host_bytes(params, view.processes, view.per_machine, view.offload_optimizer,
                                   view.offload_param, 4 if view.precision == "fp32" else 2,
                                   SwapSettings.from_extra(view.spec.deepspeed.extra))
    return int(cpu), int(nvme)


def offload_ram(view: RunView, params: int) -> int:
    """CPU RAM per machine that the offloaded states take."""
    return offload_bytes(view, params)[0]


def check_memory(facts: Facts, view: RunView) -> list[Check]:
    hw = facts.hardware
    out = []
    many = view.per_machine > 1 or view.num_workers > 0
    if hw.shm_total is None:
        out.append(Check("memory", "/dev/shm", "warn" if many else "ok", "/dev/shm does not exist",
                         "mount a tmpfs at /dev/shm (docker: --shm-size=16g or --ipc=host)" if many else ""))
    elif hw.shm_total < SHM_MIN:
        out.append(Check("memory", "/dev/shm", "fail" if many else "warn",
                         f"{fmt_gib(hw.shm_total)}: NCCL and DataLoader workers need more (Bus error, NCCL "
                         "'unhandled system error')",
                         "docker run --shm-size=16g (or --ipc=host); Kubernetes: an emptyDir with medium: Memory "
                         "mounted at /dev/shm"))
    else:
        out.append(Check("memory", "/dev/shm", "ok", fmt_gib(hw.shm_total)))
    offloads = [(what, device) for what, device in (("optimizer", view.offload_optimizer),
                                                    ("parameters", view.offload_param)) if device != "none"]
    if not offloads:
        out.append(Check("memory", "RAM for offload", "ok", "no offload asked for"))
    elif facts.params is None:
        out.append(Check("memory", "RAM for offload", "warn",
                         f"cannot estimate the model's size: {facts.params_source}",
                         "download the model first (or give a local folder) so its size is known"))
    else:
        need = offload_ram(view, facts.params)
        what = "+".join(f"{what} ({device})" for what, device in offloads)
        buffers = " with NVMe's swap buffers" if any(device == "nvme" for _, device in offloads) else ""
        detail = (f"{what} offload of ~{fmt_count(facts.params)} params needs ~{fmt_gib(need)} per machine"
                  f"{buffers}; {fmt_gib(hw.ram_available)} available")
        if need > hw.ram_available:
            out.append(Check("memory", "RAM for offload", "fail", detail, _less_ram_fix(view)))
        elif need > 0.8 * hw.ram_available:
            out.append(Check("memory", "RAM for offload", "warn", detail + " (little headroom)",
                             "close other programs, or offload to nvme" if view.offload_optimizer == "cpu"
                             else "close other programs"))
        else:
            out.append(Check("memory", "RAM for offload", "ok", detail))
    return out


def _less_ram_fix(view: RunView) -> str:
    """What lowers the offload's RAM, for the offload asked for (each NVMe buffer named by its DeepSpeed key)."""
    if view.offload_optimizer == "cpu":
        return "use --offload-optimizer nvme --nvme-path DIR, more machines, or a smaller model"
    if view.offload_param != "none":
        # DeepSpeed keeps up to max_in_cpu parameter elements of each process in RAM even with NVMe
        how = "--offload-param nvme --nvme-path DIR with" if view.offload_param == "cpu" else "set"
        return (f"{how} a lower deepspeed.extra zero_optimization.offload_param.max_in_cpu, more machines, "
                "or a smaller model")
    # Adam needs offload_optimizer.buffer_count >= 4, so the buffers shrink through the sub-group size
    return "set a lower deepspeed.extra zero_optimization.sub_group_size, more machines, or a smaller model"


def check_disk(facts: Facts, view: RunView) -> list[Check]:
    out = []
    output = facts.paths.get("output")
    if output is not None:
        ckpt = (None if facts.params is None
                else facts.params * 14 * (view.keep_checkpoints + 1) // max(1, view.machines))
        if not output.writable:
            out.append(Check("disk", "output folder", "fail",
                             f"{output.path}: not writable ({output.error or 'permission'})",
                             "choose another folder with --output-dir"))
        elif ckpt is not None and output.free is not None and ckpt > output.free:
            out.append(Check("disk", "output folder", "fail", f"{output.path}: {fmt_gib(output.free)} free, "
                             f"{view.keep_checkpoints + 1} checkpoints need ~{fmt_gib(ckpt)}",
                             "free space, use --output-dir elsewhere, or lower --keep-checkpoints"))
        else:
            need = f", checkpoints need ~{fmt_gib(ckpt)}" if ckpt else ""
            out.append(Check("disk", "output folder", "ok", f"{output.path}: {fmt_gib(output.free)} free{need}"))
    nvme = facts.paths.get("nvme")
    if view.nvme_path and nvme is not None:
        need = None if facts.params is None else offload_bytes(view, facts.params)[1]
        fs = f" ({nvme.fstype})" if nvme.fstype else ""
        if not nvme.writable:
            out.append(Check("disk", "NVMe path", "fail",
                             f"{nvme.path}{fs}: not writable ({nvme.error or 'permission'})",
                             f"mkdir -p {nvme.path} && chown $USER {nvme.path}, or choose another --nvme-path"))
        elif need is not None and nvme.free is not None and need > nvme.free:
            out.append(Check("disk", "NVMe path", "fail", f"{nvme.path}{fs}: {fmt_gib(nvme.free)} free, offload needs "
                             f"~{fmt_gib(need)}", "free space or choose another --nvme-path"))
        elif nvme.fstype in ("nfs", "nfs4", "cifs", "smb3", "fuse", "fuse.sshfs", "tmpfs", "overlay"):
            out.append(Check("disk", "NVMe path", "warn", f"{nvme.path}{fs}: not a local disk; "
                             f"{fmt_gib(nvme.free)} free", "point --nvme-path at a local NVMe drive"))
        else:
            need_s = f", offload needs ~{fmt_gib(need)}" if need is not None else ""
            out.append(Check("disk", "NVMe path", "ok",
                             f"{nvme.path}{fs}: writable, {fmt_gib(nvme.free)} free{need_s}"))
    return out
