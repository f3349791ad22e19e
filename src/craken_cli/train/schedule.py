"""The learning-rate schedule, one fact for both engines.

The schedule is one DeepSpeed scheduler block (`run_block`: craken's `deepspeed_block`, or a block
imported verbatim): DeepSpeed runs it from the rendered JSON, the plain engine the same block through
`lr_lambda`, a port of DeepSpeed's WarmupLR / WarmupDecayLR / WarmupCosineLR (linear warm-up) that
gives a torch LambdaLR the factor DeepSpeed's class would set after the same number of optimizer
steps. tests/test_schedule.py steps DeepSpeed's own classes beside it.
"""

from __future__ import annotations

import math
from typing import Callable

SCHEDULERS = {"cosine": "WarmupCosineLR", "linear": "WarmupDecayLR", "constant": "WarmupLR"}


def deepspeed_block(spec) -> dict:
    """The `scheduler` block of the DeepSpeed JSON. DeepSpeed refuses 0 warm-up steps, so no warm-up
    is written as one step that starts at the full lr."""
    schedule, lr, total = spec.schedule, spec.optimizer.lr, spec.train.max_steps
    warmup = min(schedule.warmup_steps, total)
    start = 0.0 if warmup else 1.0  # share of lr at step 0
    warmup = max(1, warmup)
    if schedule.kind == "cosine":
        return {"type": "WarmupCosineLR", "params": {
            "total_num_steps": total, "warmup_num_steps": warmup, "warmup_min_ratio": start,
            "cos_min_ratio": schedule.min_lr_ratio, "warmup_type": "linear"}}
    params = {"warmup_num_steps": warmup, "warmup_min_lr": start * lr, "warmup_max_lr": lr, "warmup_type": "linear"}
    if schedule.kind == "linear":
        return {"type": "WarmupDecayLR", "params": {"total_num_steps": total, **params}}
    return {"type": "WarmupLR", "params": params}


def run_block(spec) -> dict:
    """The scheduler block the run trains with, on either engine: a block of deepspeed.extra (imported from
    the user's DeepSpeed JSON, its "auto" filled from the run) replaces craken's whole; render writes
    this block into ds_config.json."""
    extra = spec.deepspeed.extra.get("scheduler") if spec.deepspeed.extra else None
    if not isinstance(extra, dict):
        return deepspeed_block(spec)
    from ..config.importers import AutoFill, fill_auto

    return fill_auto({"scheduler": extra}, AutoFill.of(spec))["scheduler"]


def lr_lambda(block: dict, lr: float) -> Callable[[int], float]:
    """factor(step) for torch's LambdaLR on an optimizer of base lr `lr`: the lr DeepSpeed's scheduler
    of `block` sets after `step` optimizer steps, divided by `lr`. DeepSpeed's classes count from -1
    (before the first step) and their formulas read that count, so step k is their iteration k - 1."""
    kind, params = block["type"], dict(block.get("params") or {})
    if params.get("warmup_type", "log") != "linear" or kind not in SCHEDULERS.values():
        raise ValueError(f"scheduler {kind} with warmup_type {params.get('warmup_type', 'log')}: the engine "
                         "without DeepSpeed runs WarmupLR, WarmupDecayLR or WarmupCosineLR with linear warm-up")
    warmup = max(2, int(params.get("warmup_num_steps", 1000)))  # DeepSpeed's own floor
    if kind == "WarmupCosineLR":
        return _cosine(warmup, int(params["total_num_steps"]), params.get("warmup_min_ratio", 0.0),
                       params.get("cos_min_ratio", 0.0001))
    low = params.get("warmup_min_lr", 0.0) / lr
    high = params.get("warmup_max_lr", lr) / lr
    total = int(params["total_num_steps"]) if kind == "WarmupDecayLR" else None

    def factor(step: int) -> float:
        iteration = step - 1
        if iteration < 0:
            return low  # what the class sets when it is built
        if iteration < warmup:
            gamma = iteration / warmup
        elif total is None:
            gamma = 1.0
        else:
            gamma = max(0.0, (total - iteration) / max(1.0, total - warmup))
        return low + (high - low) * gamma

    return factor


def _cosine(warmup: int, total: int, start: float, floor: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        iteration = step - 1
        if iteration < 0:
            return 0.0  # the class sets 0 when it is built, whatever warmup_min_ratio says
        if iteration < warmup:
            return start + (iteration / warmup) * (1.0 - start)
        progress = min(1.0, (iteration - warmup + 1) / max(1, total - warmup))
        return max(0.0, floor + (1.0 - floor) * (1 + math.cos(math.pi * progress)) / 2)

    return factor
