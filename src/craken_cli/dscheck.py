"""Hand a rendered DeepSpeed config to DeepSpeed's own parser, as the engine would see it.

`DeepSpeedConfig` takes its world size from an initialised process group, so this sets up a
one-process gloo group once and states the data-parallel size through a minimal `mpu`. Imports
deepspeed: only `config validate` and the tests call it.
"""

from __future__ import annotations

import contextlib
import io
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
    with contextlib.redirect_stdout(io.StringIO()):
        from deepspeed.runtime.config import DeepSpeedConfig

        _ensure_process_group()
        parsed = DeepSpeedConfig(recording, mpu=_DataParallel(world_size))
    return parsed, set(recording.read)


def deepspeed_problems(exc: Exception) -> list[str]:
    """What DeepSpeed's parser said, one problem per pydantic error, each naming the key and value."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return [f"DeepSpeed refuses it: {' '.join(str(exc).split())[:300]}: fix the file"]
    from .importers import _section_models

    section = next((name for name, model in _section_models().items() if model.__name__ == exc.title), exc.title)
    out = []
    for err in exc.errors():
        key = ".".join([section, *(str(p) for p in err["loc"])])
        fix = "remove or rename it" if err["type"] == "extra_forbidden" else "fix the value"
        out.append(f"{key} = {err.get('input')!r}: DeepSpeed's {exc.title} refuses it ({err['msg']}): {fix}")
    return out
