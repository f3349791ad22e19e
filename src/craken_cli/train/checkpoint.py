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
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..runfolder import (CHECKPOINTS, FINAL, FINAL_CHECK, MODEL_META, atomic_write, disk_message, foreign_files,
                         free_bytes, fsync_tree, is_disk_full, note_written)

STATE_FILE = "craken_state.json"
LATEST = "latest"
PREFIX = "step_"
META_DIR = MODEL_META  # in the run folder
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
    # the losses summed since the last logged line, per process, and how many micro-batches they cover:
    # the first line logged after a resume covers the same steps as in a run never stopped
    loss_sums: list[float] = field(default_factory=list)
    loss_count: int = 0
    # what the data position and the weights depend on (None in checkpoints of older craken)
    seq_len: int | None = None
    micro_batch: int | None = None
    global_batch: int | None = None
    seed: int | None = None
    precision: str | None = None
    # what the lr of the next steps depends on: a resume with another schedule says how it changes
    max_steps: int | None = None
    lr: float | None = None
    lr_schedule: dict | None = None  # the DeepSpeed scheduler block (train/schedule.deepspeed_block)
    data: dict | None = None  # what the data position counts in (train/data.fingerprint)
    files: dict[str, int] = field(default_factory=dict)  # manifest: relative path -> size in bytes
    sha256: dict[str, str] = field(default_factory=dict)  # relative path -> content digest (older craken: none)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_of(path: Path) -> int | None:
    parsed = _NAME.match(Path(path).name)
    return int(parsed.group(1)) if parsed else None


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


def state_type_problems(raw: dict) -> list[str]:
    """Values of the wrong type in a state file (hand-edited, or not craken's): each would crash a
    process after launch."""
    out = []
    for item in dataclasses.fields(TrainState):
        if item.name not in raw or item.name in ("files", "sha256"):
            continue
        value, kind = raw[item.name], str(item.type)
        if value is None and "None" in kind:
            continue
        if kind.startswith("int"):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        elif kind.startswith("bool"):
            ok = isinstance(value, bool)
        elif kind.startswith("str"):
            ok = isinstance(value, str)
        elif kind.startswith("float"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif kind.startswith("dict"):
            ok = isinstance(value, dict)
        elif kind.startswith("list"):
            ok = isinstance(value, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)
        else:
            ok = True
        if not ok:
            out.append(f"{STATE_FILE}: {item.name} is {value!r}, not a valid {kind.split(' |')[0]}")
    return out


def sha256_file(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)  # releases the GIL: files hash in parallel threads
    return digest.hexdigest()


def digests(root: Path, rels) -> dict[str, str]:
    """sha256 of each file (relative to `root`), several files at once: about 0.85 GB/s per core
    measured on the CI machine, so a 10 GB checkpoint costs seconds, not minutes."""
    from concurrent.futures import ThreadPoolExecutor

    rels = sorted(rels)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(rels, pool.map(lambda rel: sha256_file(Path(root) / rel), rels)))


def content_problems(path: Path, raw: dict) -> list[str]:
    """Files whose content is not what was written (a scrambled or stale shard of the same size)."""
    expected = raw.get("sha256") or {}
    if not isinstance(expected, dict):
        return [f"{STATE_FILE} has no valid checksums"]
    found = digests(path, [rel for rel in expected if (Path(path) / rel).is_file()])
    return [f"{rel} does not hold what was written (checksum differs)" for rel, digest in expected.items()
            if rel in found and found[rel] != digest]


def problems(path: Path, verify: bool = False) -> list[str]:
    """Why `path` is not a loadable checkpoint; empty when it is complete. Files are checked by size,
    and with `verify` by content too (their sha256)."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a folder"]
    try:
        raw = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        return [f"no {STATE_FILE} (the save did not finish)"]
    except (OSError, ValueError) as exc:
        return [f"{STATE_FILE} is unreadable ({exc.__class__.__name__})"]
    if not isinstance(raw, dict) or "step" not in raw:
        return [f"{STATE_FILE} has no step"]
    wrong = state_type_problems(raw)
    if wrong:
        return wrong
    if not (path / SHARDS).is_dir() and not is_plain(path):
        return [f"no {SHARDS}/ folder of DeepSpeed shards (nor model weights of a run without DeepSpeed)"]
    files = raw.get("files") or {}
    if not isinstance(files, dict) or not all(isinstance(v, int) for v in files.values()):
        return [f"{STATE_FILE} has no valid file manifest"]
    out = []
    for rel, size in files.items():
        file = path / rel
        if not file.is_file():
            out.append(f"{rel} is missing")
        elif file.stat().st_size != size:
            out.append(f"{rel} has {file.stat().st_size} bytes, {size} were written")
    return out or (content_problems(path, raw) if verify else [])


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


def latest_checkpoint(run_dir: Path, verify: bool = True) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint (with `verify`: whose files hold what was written), and warnings
    about broken ones skipped on the way."""
    warnings = []
    for path in reversed(list_checkpoints(run_dir, complete_only=False)):
        why = problems(path, verify=verify)
        if not why:
            if warnings:
                warnings.append(f"resuming from the previous good checkpoint {path}")
            return path, warnings
        warnings.append(f"skipping partial or corrupt checkpoint {path}: {'; '.join(why[:3])}")
    return None, warnings


def find_step(run_dir: Path, step: int) -> Path | None:
    for p in list_checkpoints(run_dir):
        if step_of(p) == step:
            return p
    return None


def read_state(path: Path) -> TrainState:
    return TrainState.from_dict(json.loads((Path(path) / STATE_FILE).read_text()))


def write_state(path: Path, state: TrainState) -> None:
    """Seal a checkpoint folder: the manifest of everything in it (sizes and checksums), written last."""
    files = manifest(path)
    state = dataclasses.replace(state, files=files, sha256=digests(path, files))
    atomic_write(path / STATE_FILE, json.dumps(asdict(state), indent=1))


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
    fsync_tree(tmp)
    replace_dir(tmp, target)


class DiskFull(Exception):
    """The run folder's disk cannot hold what is about to be written; the message says which disk and
    how many bytes. Raised on every process at once (require_space is collective)."""


# Bytes per parameter in a checkpoint: a 16-bit (or fp32) model copy, fp32 master weights and Adam's
# two moments; a margin for RNG states, scheduler and the model config.
CHECKPOINT_BYTES_PER_PARAM = 16
MARGIN = 1.1
KEEP_HINT = " (fewer --keep-checkpoints)"


def parameter_count(accelerator) -> int:
    return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
               for model in accelerator._models for p in model.parameters())


def checkpoint_bytes(run_dir: Path, accelerator) -> int:
    """About what the next checkpoint takes: the size of the last one, else from the parameter count."""
    previous = list_checkpoints(run_dir)
    if previous:
        return sum(f.stat().st_size for f in previous[-1].rglob("*") if f.is_file())
    return parameter_count(accelerator) * CHECKPOINT_BYTES_PER_PARAM


def require_space(accelerator, folder: Path, needed: int, what: str) -> None:
    """Collective: raise DiskFull on every process when `folder`'s disk has less than `needed` bytes
    free on any of them (a partial checkpoint would fill it, and DeepSpeed would fail with 'unexpected
    pos' or a lost connection instead of saying so)."""
    import torch

    needed = int(needed * MARGIN)
    short = float(free_bytes(folder) < needed)
    short = accelerator.reduce(torch.tensor([short], device=accelerator.device), reduction="sum").item()
    if short:
        raise DiskFull(f"craken: cannot write {what}: {disk_message(folder, needed, 'it', KEEP_HINT)}")


def data_shape(spec) -> dict:
    """What a checkpoint's data position and weights depend on, recorded in its state."""
    from .schedule import deepspeed_block

    return {"seq_len": spec.data.seq_len, "micro_batch": spec.batch.micro_batch,
            "global_batch": spec.train_batch_size, "seed": spec.train.seed, "precision": spec.precision,
            "max_steps": spec.train.max_steps, "lr": spec.optimizer.lr, "lr_schedule": deepspeed_block(spec)}


def gathered_loss(accelerator, partial_loss) -> tuple[list[float], int]:
    """Collective: every process's loss sum since the last logged line (exact: float64), and its count."""
    import torch

    if partial_loss is None:
        return [], 0
    loss_sum, count = partial_loss
    sums = accelerator.gather(loss_sum.detach().reshape(1).to(torch.float64))
    return [float(x) for x in sums.cpu().tolist()], int(count)


def partial_loss(state: TrainState, accelerator, device):
    """(loss sum, count) this process continues from after a resume: its own sum from the checkpoint
    (on another number of processes, their mean)."""
    import torch

    if not state.loss_count or not state.loss_sums:
        return torch.zeros((), device=device), 0
    sums = state.loss_sums
    mine = sums[accelerator.process_index] if len(sums) == accelerator.num_processes else sum(sums) / len(sums)
    return torch.tensor(mine, dtype=torch.float32, device=device), state.loss_count


def save(accelerator, run_dir: Path, state: TrainState, keep: int, partial_loss=None) -> Path:
    """Collective: every process writes its shards, then the main process seals the checkpoint.
    `partial_loss`: (loss sum tensor, micro-batches) since the last logged line, kept for the resume."""
    run_dir = Path(run_dir)
    loss_sums, loss_count = gathered_loss(accelerator, partial_loss)
    root = checkpoint_dir(run_dir)
    name = f"{PREFIX}{state.step:08d}"
    final = root / name
    tmp = root / f".tmp_{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp_*"):  # left by a process killed while saving
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    require_space(accelerator, root, checkpoint_bytes(run_dir, accelerator), f"the checkpoint of step {state.step}")
    try:
        if accelerator.state.deepspeed_plugin is not None:
            accelerator.save_state(str(tmp), client_state=UNIVERSAL_INFO)
        else:
            accelerator.save_state(str(tmp))
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        needed = checkpoint_bytes(run_dir, accelerator)
        raise DiskFull(f"craken: the disk filled up while writing the checkpoint of step {state.step} (partial "
                       f"files removed): {disk_message(root, needed, 'a checkpoint', KEEP_HINT)}") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if (run_dir / META_DIR).is_dir():
            shutil.copytree(run_dir / META_DIR, tmp / CKPT_META)
        write_state(tmp, dataclasses.replace(state, world_size=accelerator.num_processes, loss_sums=loss_sums,
                                             loss_count=loss_count, files={}, sha256={}))
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write(root / LATEST, name)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: Path, micro_batch: int | None = None) -> TrainState:
    """Load a checkpoint into the prepared objects; the data position is rescaled when the
    number of processes changed (the same number of samples counts as consumed)."""
    accelerator.load_state(str(path))
    for optimizer in cpu_adams(accelerator):
        replay_cpu_adam_steps(optimizer)
    state = read_state(path)
    return dataclasses.replace(state, batch_in_epoch=data_position(state, accelerator.num_processes, micro_batch),
                               world_size=accelerator.num_processes)


def data_position(state: TrainState, world: int, micro_batch: int | None) -> int:
    """Micro-batches per process already consumed in this epoch, on `world` processes of `micro_batch`
    samples: the same number of samples counts as consumed (`resume` refuses a resume where it does
    not divide)."""
    old_micro = state.micro_batch or micro_batch or 1
    samples = state.batch_in_epoch * (state.world_size or world) * old_micro
    return samples // (world * (micro_batch or old_micro))


def cpu_adams(accelerator) -> list:
    """DeepSpeed's CPU Adam optimizers of this process (optimizer offload), found below the wrappers."""
    found = []
    for wrapper in accelerator._optimizers:
        inner = wrapper
        for _ in range(4):
            if inner is None or (hasattr(inner, "ds_opt_adam") and hasattr(inner, "opt_id")):
                break
            inner = getattr(inner, "optimizer", None)
        if inner is not None and hasattr(inner, "ds_opt_adam"):
            found.append(inner)
    return found


def replay_cpu_adam_steps(optimizer) -> None:
    """DeepSpeed's CPU Adam keeps beta1**step and beta2**step inside its C++ op, multiplied by beta once
    per step, and computes them with pow() when the step does not follow the last one: a resumed run's
    bias correction then differs from the uninterrupted run's in the last bits, and the losses drift
    apart (ZeRO-3 + offload: 4.959733 against 4.959732 at step 13, 4.487576 against 4.487411 at step 19).
    Stepping the op through steps 1..N on a one-element scratch tensor rebuilds the very same products;
    the model's own parameters and moments are not touched."""
    import torch

    steps = [int(entry["step"]) for entry in optimizer.state.values() if isinstance(entry, dict) and "step" in entry]
    if not steps:
        return
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    scratch = [torch.zeros(1, dtype=torch.float32) for _ in range(4)]  # param, grad, exp_avg, exp_avg_sq
    for step in range(1, max(steps) + 1):
        optimizer.ds_opt_adam.adam_update(optimizer.opt_id, step, group["lr"], beta1, beta2, group["eps"],
                                          group["weight_decay"], group.get("bias_correction", True), *scratch)


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out`; an existing `out` is swapped out, never half-replaced. The
    new folder lists what craken wrote in it; files of an existing `out` that craken did not write move into
    the new one (a name the new folder also has keeps the other file as NAME.user)."""
    note_written(tmp)
    for rel in foreign_files(out) if out.is_dir() else []:
        dest = tmp / rel
        if dest.exists():
            dest = dest.with_name(f"{dest.name}.user")
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out / rel, dest)
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

    final = run_dir / FINAL
    tmp = run_dir / f".{FINAL}.tmp"
    state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3
    logits = None
    if check_batch is not None:
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=check_batch).logits.float().cpu()  # collective under ZeRO-3
        model.train()
    needed = sum(t.numel() * t.element_size() for t in state_dict.values()) if accelerator.is_main_process else 0
    require_space(accelerator, run_dir, needed, "the final model")
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
        fsync_tree(tmp)
        replace_dir(tmp, final)
        if logits is not None:
            torch.save({"input_ids": check_batch.cpu(), "logits": logits}, run_dir / FINAL_CHECK)
    accelerator.wait_for_everyone()
    return final
