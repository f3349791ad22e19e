"""Hand a rendered DeepSpeed config to DeepSpeed's own parser, as the engine would see it.

`DeepSpeedConfig` takes its world size from an initialised process group, so this sets up a
one-process gloo group once and states the data-parallel size through a minimal `mpu`. Imports
deepspeed: only `config validate` and the tests call it.
"""

from __future__ import annotations

import contextlib
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
