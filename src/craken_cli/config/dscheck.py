"""Hand a rendered DeepSpeed config to DeepSpeed's own parser, as the engine would see it.

`DeepSpeedConfig` takes its world size from an initialised process group, so this sets up a
one-process gloo group once and states the data-parallel size through a minimal `mpu`
(`parse_deepspeed_config`: `config validate`), or parses without a group in the launching process
(`parse_unlaunched`: the pre-launch checks of deepspeed.extra). deepspeed and torch are imported inside
the functions that need them.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import logging
import os
import socket


class _DataParallel:
    def __init__(self, world_size: int):
        self.world_size = world_size

    def get_data_parallel_world_size(self) -> int:
        return self.world_size


def _ensure_process_group() -> None:
    import deepspeed.comm as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)


def parse_deepspeed_config(cfg: dict, world_size: int):
    """DeepSpeed's parsed config; raises what DeepSpeed raises for a bad one."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed prints op-build notes on stdout ("... built successfully"); stdout is for results.
    with contextlib.redirect_stdout(io.StringIO()):
        from deepspeed.runtime.config import DeepSpeedConfig

        _ensure_process_group()
        return DeepSpeedConfig(dict(cfg), mpu=_DataParallel(world_size))


class _RecordingDict(dict):
    """A config dict that remembers which top-level keys DeepSpeed looks up while parsing it."""

    def __init__(self, data: dict):
        super().__init__(data)
        self.read: set[str] = set()

    def get(self, key, *default):
        self.read.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def parse_recording(cfg: dict, world_size: int):
    """DeepSpeed's parsed config and the top-level keys its parser reads (the keys it knows)."""
    recording = _RecordingDict(cfg)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # torch says "No CUDA runtime is found" when DeepSpeed's op builders load: nothing about the user's file
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        from deepspeed.runtime.config import DeepSpeedConfig

        _ensure_process_group()
        parsed = DeepSpeedConfig(recording, mpu=_DataParallel(world_size))
    return parsed, set(recording.read)


def deepspeed_problems(exc: Exception, cfg: dict, world_size: int) -> list[str]:
    """What DeepSpeed's parser said, one problem per pydantic error, each naming the key and its value."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return pydantic_problems(exc, cfg)
    said = " ".join(str(exc).split())[:300]
    gb, mb, ga = (cfg.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                       "gradient_accumulation_steps"))
    if "Check batch related parameters" in said:
        return [f"train_batch_size {gb} is not train_micro_batch_size_per_gpu {mb} x gradient_accumulation_steps "
                f"{ga} x {world_size} process(es) (DeepSpeed: {said}): make them agree, or give the process count "
                "with --num-processes N"]
    if "bfloat16 and fp16 modes cannot be simultaneously enabled" in said:
        return [f"bf16.enabled and fp16.enabled are both true (DeepSpeed: {said}): keep one"]
    if "Either train_batch_size or train_micro_batch_size_per_gpu needs to be provided" in said:
        return [f"neither train_batch_size nor train_micro_batch_size_per_gpu is given (DeepSpeed: {said}): set one, "
                "or \"auto\" to take craken's --micro-batch"]
    listed = [k for k, v in cfg.items() if isinstance(v, list)]
    if listed:  # DeepSpeed reads no top-level list; its error then names an operator, not the key
        return [f"{k} is a list ({json.dumps(cfg[k])[:40]}): DeepSpeed refuses it ({said}): give a number, or a "
                "mapping for a section" for k in listed]
    return [f"DeepSpeed refuses it: {said}: fix the file"]


def pydantic_problems(exc, cfg: dict) -> list[str]:
    import difflib

    from .importers import section_models

    models = section_models()
    section = next((name for name, model in models.items() if model.__name__ == exc.title), None)
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        where = section or next((k for k, v in cfg.items() if isinstance(v, dict) and loc and loc[0] in v), exc.title)
        fix = "fix the value"
        if err["type"] == "extra_forbidden":
            fields = list(models[section].model_fields) if section in models else []
            close = difflib.get_close_matches(loc[-1], fields, n=1)
            fix = f"did you mean {close[0]}? else remove it" if close else "remove or rename it"
        out.append(f"{'.'.join([where, *loc])} = {err.get('input')!r}: DeepSpeed's {exc.title} refuses it "
                   f"({err['msg']}): {fix}")
    return out


def parse_unlaunched(cfg: dict):
    """DeepSpeed's parsed config in the process that launches the run: no process group and no
    environment variable set (the launch passes os.environ on to the workers). Without a group DeepSpeed
    counts one process, so train_batch_size is left for it to work out from the micro-batch and
    accumulation steps (craken renders the three consistent for the run's process count)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig({k: v for k, v in cfg.items() if k != "train_batch_size"})


def refusal_problems(exc: Exception, key: str, value, stated) -> list[str]:
    """What DeepSpeed's parser said about the top-level key `key` of deepspeed.extra (`value` as rendered,
    `stated` as the user gave it), one problem per pydantic error, each naming the dotted key."""
    from pydantic import ValidationError

    name = f"deepspeed.extra.{key}"
    if isinstance(exc, ValidationError):
        return [f"deepspeed.extra.{'.'.join(error_path({key: value}, [str(p) for p in err['loc']]))} = "
                f"{err.get('input')!r}: DeepSpeed's {exc.title} refuses it ({err['msg']}): fix the value"
                for err in exc.errors()]
    shown = json.dumps(stated, default=str)
    if not isinstance(value, dict) and isinstance(exc, (AttributeError, TypeError)):
        # DeepSpeed calls .get() on a section; its error names neither the key nor the fix
        return [f"{name} is {shown[:80]}: DeepSpeed reads {key} as a section, a mapping of its own keys: write it as "
                "one, or remove it"]
    said = " ".join(str(exc).split())[:300]
    return [f"{name} = {shown[:120]}: DeepSpeed refuses it ({exc.__class__.__name__}: {said}): fix or remove it"]


def error_path(root: dict, loc: list[str]) -> list[str]:
    """The key path in `root` of a pydantic error's location: DeepSpeed builds its models from sections
    at different depths (the monitor model from the whole file, the throughput timer's from
    timers.throughput), so the location is looked for under each mapping, the shallowest first."""
    queue = [[]]
    while queue:
        prefix = queue.pop(0)
        node = _at(root, prefix)
        parent = _at(node, loc[:-1])
        if loc and isinstance(parent, dict) and loc[-1] in parent:
            return prefix + loc
        queue += [prefix + [k] for k, v in node.items() if isinstance(v, dict)]
    return [*root, *loc]


def _at(node, path: list[str]):
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node


# DeepSpeed's optimizer names whose classes come from the mup package (engine._configure_basic_optimizer
# logs "Install mup" without it, then fails on the missing class in every process).
MUP_OPTIMIZERS = {"muadam": "MuAdam", "muadamw": "MuAdamW", "musgd": "MuSGD"}


def unknown_class_problems(parsed) -> list[str]:
    """The optimizer and scheduler types the engine cannot build: DeepSpeedConfig keeps any name, and
    deepspeed.initialize looks it up among its own classes, then torch's (engine._configure_basic_optimizer,
    _scheduler_from_config), failing in every process."""
    import torch
    from deepspeed.runtime import lr_schedules
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    out = []
    optimizer = parsed.optimizer_name
    if optimizer is not None and optimizer not in DEEPSPEED_OPTIMIZERS:
        out += torch_optimizer_problems(optimizer, parsed.optimizer_params or {}, DEEPSPEED_OPTIMIZERS)
    if optimizer in MUP_OPTIMIZERS and importlib.util.find_spec("mup") is None:
        out.append(f"deepspeed.extra.optimizer.type {optimizer!r} is DeepSpeed's wrapper of mup's "
                   f"{MUP_OPTIMIZERS[optimizer]}, and mup is not installed here: pip install mup (its optimizers "
                   "also need mup.set_base_shapes on the model), or use another optimizer")
    scheduler = parsed.scheduler_name
    if scheduler is not None and not hasattr(lr_schedules, scheduler) \
            and not hasattr(torch.optim.lr_scheduler, scheduler):
        out.append(f"deepspeed.extra.scheduler.type {scheduler!r}: DeepSpeed knows no such scheduler (its own: "
                   f"{', '.join(lr_schedules.VALID_LR_SCHEDULES)}; else a class of torch.optim.lr_scheduler): fix "
                   "the name")
    return out


def untested_optimizer_problems(parsed) -> list[str]:
    """An optimizer class DeepSpeed has not tested with ZeRO (FusedLamb, mup's, most of torch.optim): at ZeRO
    stage 1-3 engine._do_optimizer_sanity_check refuses it in every process unless
    zero_allow_untested_optimizer is true (a key of its own: judged on the whole JSON). The class is the one
    the engine builds for the name, imported without building any op; one that cannot be imported is named
    by the other checks."""
    import torch
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    name = parsed.optimizer_name
    if name is None or not parsed.zero_enabled or parsed.zero_allow_untested_optimizer:
        return []
    if name == "lamb":
        from deepspeed.ops.lamb import FusedLamb as built

        shown = "DeepSpeed's FusedLamb"
    elif name in MUP_OPTIMIZERS:
        try:
            built = getattr(importlib.import_module("mup"), MUP_OPTIMIZERS[name])
        except (ImportError, AttributeError):
            return []
        shown = f"mup's {MUP_OPTIMIZERS[name]}"
    else:
        built, shown = torch_optimizer_class(name), f"torch.optim.{name}"
        if built is None:  # DeepSpeed's Adam, Lion, Adagrad, Muon, or no class at all
            return []
    if issubclass(built, tuple(ZERO_SUPPORTED_OPTIMIZERS)):
        return []
    return [f"deepspeed.extra.optimizer.type {name!r} is {shown}, which DeepSpeed has not tested with ZeRO and "
            f"refuses at ZeRO stage {parsed.zero_optimization_stage}: set deepspeed.extra.zero_allow_untested_optimizer "
            "to true to run it anyway, or use Adam, AdamW, Adagrad or Lion"]


def torch_optimizer_class(name) -> type | None:
    """The torch.optim class DeepSpeed's engine builds for an optimizer type it does not know (looked up by
    the name as written), or None where torch.optim has no such optimizer class."""
    import torch

    found = getattr(torch.optim, str(name), None)
    return found if isinstance(found, type) and issubclass(found, torch.optim.Optimizer) else None


def torch_optimizer_problems(name, params: dict, own: list[str]) -> list[str]:
    """A torch.optim class the engine would build as torch_optimizer(parameters, **params): built here on
    one parameter, so that torch itself says which parameter it does not take."""
    import torch

    found = torch_optimizer_class(name)
    if found is None:
        return [f"deepspeed.extra.optimizer.type {name!r}: DeepSpeed knows no such optimizer (its own: "
                f"{', '.join(own)}; else a class of torch.optim): fix the name"]
    try:
        found([torch.nn.Parameter(torch.zeros(1))], **params)
    except (TypeError, ValueError) as exc:
        return [f"deepspeed.extra.optimizer.type {name!r}: torch.optim.{name} refuses these optimizer.params "
                f"({exc}; craken passes it those of its own it takes, and deepspeed.extra.optimizer.params): fix "
                f"deepspeed.extra.optimizer.params, or use one of DeepSpeed's own optimizers ({', '.join(own)})"]
    return []
