"""`craken doctor --deep`: imports torch and DeepSpeed, builds the ops the run needs (seconds to minutes)."""

from __future__ import annotations

from .dsops import OP_BUILDERS
from .model import Check, RunView, needed_ops
from .ops import aio_fix


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
                   + ("; " + aio_fix(view) if op == "async_io" else ""))
            out.append(Check("deep", builder.NAME, "fail", f"build failed: {msg[-1] if msg else type(exc).__name__}",
                             fix))
        else:
            out.append(Check("deep", builder.NAME, "ok", "built and loaded"))
    return out


def _fp8_probe_check(view: RunView | None, cuda: bool) -> list[Check]:
    """--deep: one float8 matmul through torchao on GPU 0, where the run asks for fp8 or could use it."""
    import importlib.util

    import torch

    from ..train import fp8

    asked = view is not None and view.precision == "fp8"
    capable = cuda and torch.cuda.get_device_capability(0) >= fp8.MIN_CAPABILITY
    if not capable or not (asked or importlib.util.find_spec("torchao")):
        return []
    why = fp8.probe("cuda:0")
    if why is None:
        return [Check("deep", "fp8 matmul", "ok", "one float8 matmul (torchao, forward and backward) ran on GPU 0")]
    return [Check("deep", "fp8 matmul", "fail" if asked else "warn", f"torchao's float8 matmul failed: {why}",
                  "install the torchao release built for this torch (pip install 'craken[fp8]'), or --precision bf16")]
