"""The two engines a run trains with, behind one small interface.

- `PlainEngine` (ZeRO stage 0 on GPUs): Accelerate DDP, fp32 master weights under bf16/fp16 autocast,
  torch's fused AdamW, the lr schedule stepped here once per optimizer step.
- `DeepSpeedEngine` (ZeRO 1-3, and every stage on CPU processes): DeepSpeed owns the optimizer, the
  fp32 master copy and the schedule, all built from the rendered JSON.

Whatever dtype the checkpoint holds, both train fp32 master weights with fp32 optimizer states;
`precision_record` measures that on the live optimizer for the metrics start line.
"""

from __future__ import annotations

# Where DeepSpeed's optimizers keep their fp32 master copies (ZeRO-1/2, BF16 optimizer, ZeRO-3, FP16).
DEEPSPEED_MASTERS = ("single_partition_of_fp32_groups", "fp32_groups_flat_partition",
                     "fp32_partitioned_groups_flat", "fp32_groups_flat")


def _dtype_name(dtypes) -> str | None:
    names = sorted({str(d).removeprefix("torch.") for d in dtypes})
    return "+".join(names) if names else None


def innermost_optimizer(optimizer):
    """The torch optimizer that steps the master weights, under Accelerate's and DeepSpeed's wrappers."""
    seen = set()
    while getattr(optimizer, "optimizer", None) is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


def _deepspeed_masters(optimizer) -> list:
    """The fp32 master tensors of a DeepSpeed optimizer (in any of its wrappers), or []."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        for name in DEEPSPEED_MASTERS:
            tensors = getattr(optimizer, name, None)
            if tensors:
                return [t for group in tensors for t in (group if isinstance(group, (list, tuple)) else [group])]
        optimizer = getattr(optimizer, "optimizer", None)
    return []


def precision_record(optimizer, model) -> dict:
    """The dtypes that train, measured on the live objects: the master weights the optimizer steps,
    its states (Adam moments; the step counter is not one), and the weights the forward reads."""
    import torch

    inner = innermost_optimizer(optimizer)
    masters = _deepspeed_masters(optimizer) or [p for group in inner.param_groups for p in group["params"]]
    states = [value for state in inner.state.values() for key, value in state.items()
              if torch.is_tensor(value) and key != "step" and value.numel() > 1]
    return {"master_dtype": _dtype_name(t.dtype for t in masters if t.numel()),
            "optimizer_state_dtype": _dtype_name(t.dtype for t in states),
            "module_dtype": _dtype_name(p.dtype for p in model.parameters() if p.requires_grad)}


def plain_optimizer(spec, param_groups):
    """torch's fused AdamW on the fp32 master weights, its states created now (as DeepSpeed's are at
    set-up) so that the start line can show their dtype and a run too large fails before step 1."""
    import torch

    o = spec.optimizer
    optimizer = torch.optim.AdamW(param_groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=True)
    materialize_states(optimizer)
    return optimizer


def materialize_states(optimizer) -> None:
    """One AdamW step at lr 0 on zero gradients: creates every state (zero moments) and changes no
    weight (the update and the decoupled weight decay are both scaled by lr); the step counters are
    then set back to 0, so the first real step is the same as on a fresh optimizer."""
    import torch

    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    for p in params:
        p.grad = None
        step = optimizer.state[p].get("step")
        if torch.is_tensor(step):
            step.zero_()
        elif step is not None:
            optimizer.state[p]["step"] = 0
