"""The two engines a run trains with, behind one small interface (`Engine`):

    engine = make_engine(spec, accelerator)
    model, train_dl, eval_dl = engine.prepare(model, train_dl, eval_dl)
    with accelerator.accumulate(model):
        engine.backward_step(model(**batch).loss)     # backward; at a boundary clip, step, schedule
    engine.grad_norm(), engine.lr(), engine.save(...), engine.load(...), engine.precision_record()

- `PlainEngine` (ZeRO stage 0 on GPUs): Accelerate DDP, fp32 master weights under bf16/fp16 autocast,
  torch's fused AdamW, the schedule of train/schedule.py stepped here once per optimizer step.
- `DeepSpeedEngine` (ZeRO 1-3, and every stage on CPU processes): DeepSpeed owns the optimizer, the
  fp32 master copy and the schedule, all built from the rendered JSON.

`RunSpec.uses_deepspeed` picks one. Whatever dtype the checkpoint holds, both train fp32 master
weights with fp32 optimizer states; `precision_record` measures that on the live optimizer.
"""

from __future__ import annotations

from pathlib import Path

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
    """torch's fused AdamW on the fp32 master weights."""
    import torch

    settings = spec.optimizer
    return torch.optim.AdamW(param_groups, lr=settings.lr, betas=settings.betas, eps=settings.eps, fused=True)


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


def param_groups(model, spec) -> list[dict]:
    """AdamW groups: no weight decay on biases and norms."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": spec.optimizer.weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class Engine:
    """What the loop asks of an engine. `prepare` wraps the model and the loaders for Accelerate;
    `backward_step` runs inside `accelerator.accumulate(model)` on every micro-batch."""

    def __init__(self, spec, accelerator):
        self.spec = spec
        self.accelerator = accelerator
        self.model = self.optimizer = self.scheduler = None

    def prepare(self, model, train_dl, eval_dl=None):
        optimizer, scheduler, prepare_scheduler = self._optimizer(model)
        loaders = [train_dl] + ([eval_dl] if eval_dl is not None else [])
        prepared = self.accelerator.prepare(model, optimizer, *loaders, *([scheduler] if prepare_scheduler else []))
        self.model, self.optimizer = prepared[0], prepared[1]
        self.scheduler = prepared[-1] if prepare_scheduler else scheduler
        train_dl = prepared[2]
        eval_dl = prepared[3] if eval_dl is not None else None
        self._prepared()
        return self.model, train_dl, eval_dl

    def _prepared(self) -> None:
        """After Accelerate has placed everything on the process's device."""

    def _optimizer(self, model):
        """(optimizer, scheduler, whether Accelerate prepares the scheduler)."""
        raise NotImplementedError

    def backward_step(self, loss) -> None:
        raise NotImplementedError

    def grad_norm(self):
        """The gradient norm of the last optimizer step (a tensor or float), or None if unknown."""
        raise NotImplementedError

    def lr(self) -> float:
        raise NotImplementedError

    def save(self, run_dir: Path, state, keep: int, partial_loss=None) -> Path:
        from . import checkpoint

        return checkpoint.save(self.accelerator, run_dir, state, keep, partial_loss=partial_loss)

    def load(self, path: Path, micro_batch: int | None = None):
        from . import checkpoint

        return checkpoint.load(self.accelerator, path, micro_batch)

    def precision_record(self) -> dict:
        return precision_record(self.optimizer, self.model)


class PlainEngine(Engine):
    """No DeepSpeed: fp32 masters, torch's fused AdamW, clipping and the schedule done here (Accelerate
    would step a prepared scheduler once per process)."""

    def __init__(self, spec, accelerator):
        super().__init__(spec, accelerator)
        self._norm = None

    def _optimizer(self, model):
        import torch

        from . import schedule

        optimizer = plain_optimizer(self.spec, param_groups(model, self.spec))
        factor = schedule.lr_lambda(schedule.run_block(self.spec), self.spec.optimizer.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        self.accelerator.register_for_checkpointing(scheduler)
        return optimizer, scheduler, False

    def _prepared(self) -> None:
        # The AdamW states are made now, on the device (as DeepSpeed's are at set-up): the start line
        # shows their dtype, and a run whose states do not fit fails before its first step.
        materialize_states(innermost_optimizer(self.optimizer))

    def backward_step(self, loss) -> None:
        import torch

        acc, spec = self.accelerator, self.spec
        acc.backward(loss)
        if acc.sync_gradients and spec.optimizer.clip > 0:
            self._norm = acc.clip_grad_norm_(self.model.parameters(), spec.optimizer.clip)
            if spec.train.on_nonfinite == "skip" and not bool(torch.isfinite(self._norm)):
                self.optimizer.zero_grad(set_to_none=True)  # no gradients: AdamW skips the update
        self.optimizer.step()
        self.optimizer.zero_grad()
        if acc.sync_gradients:
            self.scheduler.step()

    def grad_norm(self):
        return self._norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


class DeepSpeedEngine(Engine):
    """DeepSpeed owns optimizer, fp32 masters, clipping and schedule, built from the rendered JSON."""

    def _optimizer(self, model):
        from accelerate.utils import DummyOptim, DummyScheduler

        optimizer = DummyOptim(param_groups(model, self.spec), lr=self.spec.optimizer.lr)
        scheduler = DummyScheduler(optimizer, total_num_steps=self.spec.train.max_steps,
                                   warmup_num_steps=self.spec.schedule.warmup_steps)
        return optimizer, scheduler, True

    def backward_step(self, loss) -> None:
        self.accelerator.backward(loss)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()

    def grad_norm(self):
        return self.model.get_global_grad_norm()

    def lr(self) -> float:
        return float(self.model.get_lr()[0])


def make_engine(spec, accelerator) -> Engine:
    return DeepSpeedEngine(spec, accelerator) if spec.uses_deepspeed else PlainEngine(spec, accelerator)
