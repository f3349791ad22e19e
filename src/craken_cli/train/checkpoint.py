"""Checkpoints that survive a kill at any moment, and a final model that is never empty.

Layout of a run folder:
    model_meta/                    model config + tokenizer, written once at start (what export needs)
    checkpoints/step_00000010/     accelerate `save_state` (DeepSpeed shards, RNG, scheduler)
                 hf/                 copy of model_meta/: a checkpoint can be exported on its own
                 craken_state.json   step, data position, world size, file manifest; written last
    checkpoints/latest             name of the newest complete checkpoint (updated last)
    final/                         HF model + tokenizer in safetensors, in the checkpoint's own dtype
    final_check.pt                 the trained model's logits on a fixed batch (compare a reload)

Every checkpoint is written into a hidden temporary folder, fsynced, then renamed; the `latest`
pointer is replaced atomically after that. A folder without `craken_state.json` is partial, and
one whose files do not match the manifest in it (a file missing or truncated) is corrupt: neither
is ever loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "craken_state.json"
LATEST = "latest"
PREFIX = "step_"
META_DIR = "model_meta"  # in the run folder
CKPT_META = "hf"  # in each checkpoint
SHARDS = "pytorch_model"  # accelerate's DeepSpeed checkpoint tag (folder of the shards)
_NAME = re.compile(r"^step_(\d+)$")
# Lets DeepSpeed's ds_to_universal convert Accelerate-saved checkpoints (resume on another GPU count).
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed, per process
    world_size: int = 0
    universal: bool = False  # converted by ds_to_universal: load with "load_universal"
    converted_from: str | None = None
    # written by DeepSpeed's BF16 optimizer (ZeRO-1, zero.fp32_grad_accum), whose files only it and the
    # universal converter read; its file names alone do not tell (every bf16 run writes bf16_zero_*)
    fp32_grad_accum: bool = False
    # the run's ZeRO stage (0 also for a run without DeepSpeed) and optimizer offload device: what
    # decides the optimizer state's layout. None in checkpoints of older craken
    zero_stage: int | None = None
    offload_optimizer: str | None = None
    files: dict[str, int] = field(default_factory=dict)  # manifest: relative path -> size in bytes

    @classmethod
    def from_dict(cls, data: dict) -> "TrainState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_of(path: Path) -> int | None:
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def manifest(root: Path) -> dict[str, int]:
    """Every file under `root` (but the state file) with its size."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if rel != STATE_FILE:
                out[rel] = full.stat().st_size
    return dict(sorted(out.items()))


def problems(path: Path) -> list[str]:
    """Why `path` is not a loadable checkpoint; empty when it is complete."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a folder"]
    try:
        raw = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        return [f"no {STATE_FILE} (the save did not finish)"]
    except (OSError, ValueError) as exc:
        return [f"{STATE_FILE} is unreadable ({exc.__class__.__name__})"]
    if not isinstance(raw, dict) or not isinstance(raw.get("step"), int):
        return [f"{STATE_FILE} has no step"]
    if not (path / SHARDS).is_dir() and not is_plain(path):
        return [f"no {SHARDS}/ folder of DeepSpeed shards (nor model weights of a run without DeepSpeed)"]
    out = []
    for rel, size in (raw.get("files") or {}).items():
        f = path / rel
        if not f.is_file():
            out.append(f"{rel} is missing")
        elif f.stat().st_size != size:
            out.append(f"{rel} has {f.stat().st_size} bytes, {size} were written")
    return out


def is_plain(path: Path) -> bool:
    """Written by a run without DeepSpeed (Accelerate's save_state): model weights in safetensors, no
    folder of DeepSpeed shards."""
    path = Path(path)
    return not (path / SHARDS).is_dir() and any(path.glob("model*.safetensors"))


def saved_step(path: Path) -> int:
    """The step a checkpoint holds; -1 once it is gone (pruned by keep_checkpoints) or unreadable."""
    try:
        return read_state(path).step
    except (OSError, ValueError):
        return -1


def is_complete(path: Path) -> bool:
    return not problems(path)


def list_checkpoints(run_dir: Path, complete_only: bool = True) -> list[Path]:
    """Checkpoints of a run folder, oldest first (complete ones only, unless told otherwise)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    if complete_only:
        found = [p for p in found if is_complete(p)]
    return sorted(found, key=step_of)


def latest_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint, and warnings about broken ones skipped on the way."""
    root = checkpoint_dir(run_dir)
    warnings = []
    pointer = root / LATEST
    good = list_checkpoints(run_dir)
    named = None
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if is_complete(named) and (not good or step_of(named) == step_of(good[-1])):
            return named, warnings
    for p in list_checkpoints(run_dir, complete_only=False):
        why = problems(p)
        if why and (not good or step_of(p) > step_of(good[-1])):
            warnings.append(f"skipping partial or corrupt checkpoint {p}: {'; '.join(why[:3])}")
    if good and warnings:
        warnings.append(f"resuming from the previous good checkpoint {good[-1]}")
    return (good[-1] if good else None), warnings


def find_step(run_dir: Path, step: int) -> Path | None:
    for p in list_checkpoints(run_dir):
        if step_of(p) == step:
            return p
    return None


def read_state(path: Path) -> TrainState:
    return TrainState.from_dict(json.loads((Path(path) / STATE_FILE).read_text()))


def write_state(path: Path, state: TrainState) -> None:
    """Seal a checkpoint folder: the manifest of everything in it, written last."""
    state = dataclasses.replace(state, files=manifest(path))
    _write_atomic(path / STATE_FILE, json.dumps(asdict(state), indent=1))


def as_dtype(dtype):
    """A torch dtype from a torch dtype or a precision name (bf16, fp16, fp32)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)


def write_model_meta(accelerator, run_dir: Path, model, tokenizer, dtype) -> None:
    """Once per run: the model config and the tokenizer, for export. The config's `dtype` is what
    final/ and `ckpt export --dtype auto` write (`modeling.saved_dtype`: the checkpoint's own), not
    the dtype that trains (fp32 master weights)."""
    if not accelerator.is_main_process:
        return
    target = Path(run_dir) / META_DIR
    tmp = Path(run_dir) / f".{META_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    config = copy.deepcopy(model.config)
    config.dtype = as_dtype(dtype)
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _fsync_tree(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def save(accelerator, run_dir: Path, state: TrainState, keep: int) -> Path:
    """Collective: every process writes its shards, then the main process seals the checkpoint."""
    run_dir = Path(run_dir)
    root = checkpoint_dir(run_dir)
    name = f"{PREFIX}{state.step:08d}"
    final = root / name
    tmp = root / f".tmp_{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp_*"):  # left by a process killed while saving
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    if accelerator.state.deepspeed_plugin is not None:
        accelerator.save_state(str(tmp), client_state=UNIVERSAL_INFO)
    else:
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if (run_dir / META_DIR).is_dir():
            shutil.copytree(run_dir / META_DIR, tmp / CKPT_META)
        write_state(tmp, TrainState(state.step, state.epoch, state.batch_in_epoch, accelerator.num_processes,
                                    fp32_grad_accum=state.fp32_grad_accum, zero_stage=state.zero_stage,
                                    offload_optimizer=state.offload_optimizer))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, name)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: Path) -> TrainState:
    """Load a checkpoint into the prepared objects; the data position is rescaled when the
    number of processes changed (the same number of samples counts as consumed)."""
    accelerator.load_state(str(path))
    state = read_state(path)
    world = accelerator.num_processes
    if state.world_size and state.world_size != world:
        state = dataclasses.replace(state, batch_in_epoch=state.batch_in_epoch * state.world_size // world,
                                    world_size=world)
    return state


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out`; an existing `out` is swapped out, never half-replaced."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def save_final(accelerator, model, tokenizer, run_dir: Path, spec, check_batch=None, dtype=None) -> Path:
    """Gather the full weights (ZeRO-3's 16-bit ones included) and write an HF model atomically, in
    `dtype` (the checkpoint's own, `modeling.saved_dtype`) when given.

    When `check_batch` is given, the trained model's logits on it are stored beside the model
    (final_check.pt), so a reload can be compared with what was trained.
    """
    import torch

    final = run_dir / "final"
    tmp = run_dir / ".final.tmp"
    state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3
    logits = None
    if check_batch is not None:
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=check_batch).logits.float().cpu()  # collective under ZeRO-3
        model.train()
    if accelerator.is_main_process:
        if not state_dict:
            raise RuntimeError("the gathered state dict is empty: refusing to save an empty model")
        if tmp.exists():
            shutil.rmtree(tmp)
        unwrapped = accelerator.unwrap_model(model)
        if dtype is not None:
            state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if dtype is not None:
            # save_pretrained names the dtype of the module (fp32 master weights), not of what it wrote
            config = copy.deepcopy(unwrapped.config)
            config.dtype = dtype
            config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _fsync_tree(tmp)
        replace_dir(tmp, final)
        if logits is not None:
            torch.save({"input_ids": check_batch.cpu(), "logits": logits}, run_dir / "final_check.pt")
    accelerator.wait_for_everyone()
    return final
