"""Checkpoints that survive a kill at any moment, and a final model that is never empty.

Layout of a run folder:
    checkpoints/step_00000010/     accelerate `save_state` (DeepSpeed shards, RNG, scheduler)
                 craken_state.json   step, data position, world size; written last = "complete"
    checkpoints/latest             name of the newest complete checkpoint (updated last)
    final/                         HF model + tokenizer in safetensors

Every checkpoint is written into a hidden temporary folder, fsynced, then renamed; the `latest`
pointer is replaced atomically after that. A folder without `craken_state.json` is partial and
never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "craken_state.json"
LATEST = "latest"
PREFIX = "step_"
# Lets DeepSpeed's ds_to_universal convert Accelerate-saved checkpoints (resume on another GPU count).
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed, per process
    world_size: int = 0


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


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


def is_complete(path: Path) -> bool:
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "step" in state and (path / "pytorch_model").is_dir()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.name.startswith(PREFIX) and is_complete(p)),
                  key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint, and warnings about broken ones skipped on the way."""
    root = checkpoint_dir(run_dir)
    warnings = []
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if is_complete(named):
            return named, warnings
        warnings.append(f"{named} (named by {pointer}) is partial or corrupt; using the previous good checkpoint")
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(PREFIX) and not is_complete(p):
                warnings.append(f"skipping partial checkpoint {p}")
    good = list_checkpoints(run_dir)
    return (good[-1] if good else None), warnings


def read_state(path: Path) -> TrainState:
    return TrainState(**json.loads((path / STATE_FILE).read_text()))


def save(accelerator, run_dir: Path, state: TrainState, keep: int) -> Path:
    """Collective: every process writes its shards, then the main process seals the checkpoint."""
    root = checkpoint_dir(run_dir)
    name = f"{PREFIX}{state.step:08d}"
    final = root / name
    tmp = root / f".tmp_{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), client_state=UNIVERSAL_INFO)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = TrainState(state.step, state.epoch, state.batch_in_epoch, accelerator.num_processes)
        _write_atomic(tmp / STATE_FILE, json.dumps(asdict(state)))
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
    accelerator.load_state(str(path))
    return read_state(path)


def save_final(accelerator, model, tokenizer, run_dir: Path, spec, check_batch=None) -> Path:
    """Gather the full 16-bit weights (ZeRO-3 included) and write an HF model atomically.

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
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _fsync_tree(tmp)
        if final.exists():
            old = run_dir / ".final.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        if logits is not None:
            torch.save({"input_ids": check_batch.cpu(), "logits": logits}, run_dir / "final_check.pt")
    accelerator.wait_for_everyone()
    return final
