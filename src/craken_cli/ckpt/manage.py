"""What `craken ckpt list|export|convert` and `craken train --resume` do with checkpoints, as plain
functions (the command module only parses and prints):

    rows(run_dir)                    -> one dict per checkpoint folder: step, processes, state, size
    pick(run_dir, step)              -> the checkpoint to export (latest good one when step is None)
    universal_argv(ckpt, out)        -> DeepSpeed's ds_to_universal command, an argv list (no shell)
    convert(ckpt, out)               -> a universal checkpoint, loadable on any number of processes
    export(ckpt, out)                -> an HF safetensors folder that `from_pretrained` loads

A plain checkpoint (ZeRO stage 0 on GPUs: no DeepSpeed) holds the whole model in model.safetensors and the
whole optimizer state in optimizer.bin: export reads the weights from there, and it needs no conversion
to resume on another number of processes.

Every check happens before anything is written; outputs are built in a hidden temporary folder
beside the target and renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import CrakenError
from ..plan.hardware import nearest_existing
from ..runfolder import (CHECKPOINTS, FINAL, WRITTEN_LIST, disk_message, free_bytes, fsync_tree, is_disk_full,
                         protected)
from ..train import checkpoint as ck

UNIVERSAL_DIR = "universal"  # RUN/checkpoints/universal/step_N: converted copies
DTYPES = ("auto", "fp32", "bf16", "fp16")
# Files of an HF model folder that come from the model itself (the rest of model_meta is the tokenizer).
_MODEL_FILES = {"config.json", "generation_config.json"}
PLAIN_WEIGHTS = "model.safetensors"  # accelerate `save_state` of a run without DeepSpeed (its first model)
# Prefixes of the keys `save_state` writes for a wrapped model (DistributedDataParallel, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def require_run_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CrakenError(f"{run_dir}: no such run folder; give the folder `craken train` wrote (runs/<name>)",
                          title="cannot read checkpoints")
    if not ck.checkpoint_dir(run_dir).is_dir():
        # RUN/checkpoints or RUN/checkpoints/step_N given for RUN: name the run folder around it
        above = next((p for p in list(run_dir.parents)[:3] if ck.checkpoint_dir(p).is_dir()), None)
        if above is not None:
            raise CrakenError(f"{run_dir} is inside the run folder {above}: give the run folder itself ({above})",
                              title="cannot read checkpoints")
        raise CrakenError(f"{run_dir} holds no checkpoints/ folder: is it a run folder? Checkpoints are "
                          "written every --save-every steps and at the end", title="cannot read checkpoints")
    return run_dir


def rows(run_dir: Path) -> list[dict]:
    """Every checkpoint folder of a run, complete or not, oldest first, with converted copies last."""
    run_dir = require_run_dir(run_dir)
    root = ck.checkpoint_dir(run_dir)
    pointer = root / ck.LATEST
    latest = pointer.read_text().strip() if pointer.is_file() else None
    found = ck.list_checkpoints(run_dir, complete_only=False)
    uni = root / UNIVERSAL_DIR
    if uni.is_dir():
        found += sorted((p for p in uni.iterdir() if ck.step_of(p) is not None), key=ck.step_of)
    out = []
    for path in found:
        why = ck.problems(path, verify=True)
        state = ck.read_state(path) if not why else None
        out.append({
            "step": ck.step_of(path), "path": str(path), "complete": not why, "problems": why,
            "processes": state.world_size if state else None,
            "universal": bool(state and state.universal),
            "plain": not why and ck.is_plain(path),
            "latest": path.parent == root and path.name == latest,
            "size_bytes": _size(path),
        })
    return out


def pick(run_dir: Path, step: int | None) -> Path:
    """The checkpoint of `run_dir` at `step`, or its latest good one; a checkpoint folder itself (what a
    refused resume names) is taken as it is."""
    if Path(run_dir).is_dir() and ck.step_of(run_dir) is not None and not ck.checkpoint_dir(run_dir).is_dir():
        state = require_checkpoint(run_dir, "cannot export")
        if step is not None and step != state.step:
            raise CrakenError(f"--step {step}: {run_dir} is the checkpoint of step {state.step}; drop --step, or give "
                              "the run folder", title="cannot export")
        return Path(run_dir)
    run_dir = require_run_dir(run_dir)
    if step is None:
        found, _ = ck.latest_checkpoint(run_dir)
        if found is None:
            raise CrakenError(f"{run_dir} has no complete checkpoint (`craken ckpt list {run_dir}` shows them)",
                              title="cannot export")
        return found
    found = ck.find_step(run_dir, step)
    if found is None:
        steps = [ck.step_of(p) for p in ck.list_checkpoints(run_dir)]
        raise CrakenError(f"--step {step}: no complete checkpoint of that step in {run_dir} (complete: "
                          f"{', '.join(map(str, steps)) or 'none'})", title="cannot export")
    return found


def require_checkpoint(ckpt: Path, title: str) -> ck.TrainState:
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise CrakenError(f"{ckpt}: no such checkpoint folder (`craken ckpt list RUN_DIR` shows them)", title=title)
    if ckpt.is_dir() and ck.checkpoint_dir(ckpt).is_dir():
        raise CrakenError(f"{ckpt} is a run folder, not a checkpoint: name one of its checkpoints/step_* folders "
                          f"(`craken ckpt list {ckpt}`)", title=title)
    why = ck.problems(ckpt, verify=True)
    if why:
        raise CrakenError(f"{ckpt} is not a complete checkpoint ({'; '.join(why[:3])}): use an earlier one "
                          "from `craken ckpt list RUN_DIR`", title=title)
    return ck.read_state(ckpt)


EXPORT_MARKER = "craken_export.json"  # in every exported model folder


def require_new_output(out: Path, force: bool, title: str, reads: tuple[Path, ...] = ()) -> None:
    """`out` may be written: new, empty, or (with --force) an earlier export or conversion of craken's,
    never a folder above the working folder, the home folder or what this command reads."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CrakenError(f"--out {out} is a file: choose a folder", title=title)
    why = protected(out, reads=tuple(reads))
    if why:
        raise CrakenError(f"--out {out} is {why}: craken never replaces it; choose a new folder", title=title)
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise CrakenError(f"--out {out} exists and is not empty: choose another folder or pass --force to "
                              "replace it", title=title)
        if not ((out / EXPORT_MARKER).is_file() or (out / ck.STATE_FILE).is_file()):
            raise CrakenError(f"--out {out} holds files craken did not write (no {EXPORT_MARKER} or "
                              f"{ck.STATE_FILE}): --force replaces only an earlier export or conversion; choose a "
                              "new folder", title=title)
    parent = nearest_existing(out.absolute().parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CrakenError(f"--out {out}: {parent} is not writable; choose another folder", title=title)


# ---------------------------------------------------------------------------------------------
# convert: DeepSpeed universal checkpoints (resume on another number of processes)


def default_universal_out(ckpt: Path) -> Path:
    """RUN/checkpoints/universal/step_N for RUN/checkpoints/step_N, else CKPT-universal beside it."""
    ckpt = Path(ckpt)
    if ckpt.parent.name == CHECKPOINTS:
        return ckpt.parent / UNIVERSAL_DIR / ckpt.name
    return ckpt.with_name(f"{ckpt.name}-universal")


def universal_argv(ckpt: Path, out_shards: Path) -> list[str]:
    return [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
            "--input_folder", str(Path(ckpt) / ck.SHARDS), "--output_folder", str(out_shards)]


def convert(ckpt: Path, out: Path | None = None, force: bool = False, env=None) -> Path:
    """A universal copy of `ckpt` (a craken checkpoint folder itself, with `universal: true`)."""
    title = "cannot convert"
    ckpt = Path(ckpt)
    state = require_checkpoint(ckpt, title)
    if state.universal:
        raise CrakenError(f"{ckpt} is already a universal checkpoint: resume from it directly", title=title)
    if ck.is_plain(ckpt):
        raise CrakenError(f"{ckpt} was written without DeepSpeed (ZeRO stage 0: {PLAIN_WEIGHTS} holds the whole "
                          "model and every process the whole optimizer state), so it needs no conversion: resume "
                          f"from it directly on any number of processes (craken train --resume {ckpt})", title=title)
    out = Path(out) if out is not None else default_universal_out(ckpt)
    require_new_output(out, force, title, reads=(ckpt,))
    needed = _size(ckpt)
    require_space(out, needed, "the universal checkpoint", title)
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        with _built_beside(out, needed, "the universal checkpoint", title) as tmp:
            tmp.mkdir()
            argv = universal_argv(ckpt, tmp / ck.SHARDS)
            proc = subprocess.run(argv, env=dict(env if env is not None else os.environ), capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                lines = [x.strip() for x in (proc.stdout + proc.stderr).splitlines() if x.strip()]
                raise CrakenError(f"DeepSpeed's ds_to_universal failed on {ckpt} (exit {proc.returncode}: "
                                  f"{lines[-1] if lines else 'no output'})", title=title)
            (tmp / "latest_universal").unlink(missing_ok=True)  # written by ds_to_universal beside its output
            for item in ckpt.iterdir():  # RNG states, model config + tokenizer; the shards were converted
                if item.name in (ck.SHARDS, ck.STATE_FILE, "latest") or item.name.startswith("zero_to_"):
                    continue
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
            (tmp / "latest").write_text(ck.SHARDS)
            ck.write_state(tmp, dataclasses.replace(state, universal=True, converted_from=str(ckpt.absolute())))
            fsync_tree(tmp)
            ck.replace_dir(tmp, out)
            ok = True
    finally:
        if not ok:
            for folder in created:  # innermost first: leave nothing behind
                try:
                    folder.rmdir()
                except OSError:
                    break
    return out


# ---------------------------------------------------------------------------------------------
# export: consolidated HF safetensors


def meta_dir(ckpt: Path) -> Path | None:
    """Model config + tokenizer for `ckpt`: its own copy, else the run folder's."""
    ckpt = Path(ckpt)
    for candidate in (ckpt / ck.CKPT_META, ckpt.parent.parent / ck.META_DIR, ckpt.parent.parent / FINAL):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def _universal_state_dict(ckpt: Path) -> dict:
    import torch

    zero = ckpt / ck.SHARDS / "zero"
    out = {}
    for param in sorted(p for p in zero.iterdir() if p.is_dir()):
        blob = torch.load(param / "fp32.pt", map_location="cpu", weights_only=True)
        out[param.name] = blob["param"] if isinstance(blob, dict) else blob
    return out


def _plain_state_dict(ckpt: Path) -> dict:
    """The weights a run without DeepSpeed saved (in its master dtype), keys as the unwrapped model names
    them; a tied weight (lm_head sharing embed_tokens) is there once, as accelerate removes aliases."""
    from safetensors.torch import load_file

    path = Path(ckpt) / PLAIN_WEIGHTS
    if not path.is_file():
        found = ", ".join(sorted(p.name for p in Path(ckpt).glob("model*.safetensors")))
        raise CrakenError(f"{ckpt} has no {PLAIN_WEIGHTS} (only {found}): not a checkpoint craken wrote",
                          title="cannot export")
    out = {}
    for key, tensor in load_file(path, device="cpu").items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = tensor
    return out


def fp32_state_dict(ckpt: Path, state: ck.TrainState) -> dict:
    """The full weights: gathered from the ZeRO shards of every process (stage 1, 2 and 3) in fp32, or
    read from model.safetensors of a run without DeepSpeed."""
    if ck.is_plain(ckpt):
        return _plain_state_dict(ckpt)
    if state.universal:
        return _universal_state_dict(ckpt)
    if state.fp32_grad_accum:
        # DeepSpeed's BF16 optimizer wrote it: zero_to_fp32 reads only the ZeRO optimizer's files, the
        # universal converter reads both.
        import tempfile

        with tempfile.TemporaryDirectory(prefix="craken-export-") as tmp:
            return _universal_state_dict(convert(ckpt, Path(tmp) / ckpt.name))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=ck.SHARDS)


def export(ckpt: Path, out: Path, dtype: str = "auto", force: bool = False) -> Path:
    title = "cannot export"
    if dtype not in DTYPES:
        raise CrakenError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}", title=title)
    ckpt = Path(ckpt)
    state = require_checkpoint(ckpt, title)
    meta = meta_dir(ckpt)
    if meta is None:
        raise CrakenError(f"{ckpt} has no model config ({ck.CKPT_META}/config.json) and its run folder has neither "
                          f"{ck.META_DIR}/ nor final/: it was written by an older craken; nothing to export from",
                          title=title)
    out = Path(out)
    require_new_output(out, force, title, reads=(ckpt,))

    import contextlib
    import io

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(meta)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype) \
        or getattr(config, "dtype", None) or torch.float32
    if isinstance(torch_dtype, str):
        torch_dtype = getattr(torch, torch_dtype)
    with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 prints per-parameter progress
        weights = fp32_state_dict(ckpt, state)
    if not weights:
        raise CrakenError(f"{ckpt}: the gathered state dict is empty; refusing to write an empty model", title=title)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    weights = {k: v.to(torch_dtype) for k, v in weights.items()}
    tied = getattr(model, "_tied_weights_keys", None)
    if getattr(config, "tie_word_embeddings", False) and isinstance(tied, dict):
        for target, source in tied.items():  # a checkpoint that kept the other name of a tied pair
            if source not in weights and target in weights:
                weights[source] = weights[target]
    result = model.load_state_dict(weights, strict=False, assign=True)
    if result.unexpected_keys:
        raise CrakenError(f"{ckpt}: the checkpoint holds weights this model does not have: "
                          f"{', '.join(result.unexpected_keys[:5])}", title=title)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise CrakenError(f"{ckpt}: no weights for {', '.join(still_meta[:5])}", title=title)
    model.config.dtype = torch_dtype

    needed = sum(t.numel() * t.element_size() for t in weights.values())
    require_space(out, needed, "the exported model", title)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    with _built_beside(out, needed, "the exported model", title) as tmp:
        write_export(model, meta, tmp, out, ckpt, state, torch_dtype)
    return out


@contextlib.contextmanager
def _built_beside(out: Path, needed: int, what: str, title: str):
    """The hidden folder beside `out` in which an output is built before its rename into place: removed
    whatever happens, and a full disk while writing it is one message with the room `what` needs."""
    tmp = out.absolute().with_name(f".tmp_{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise CrakenError(f"{disk_message(out, needed, what)} (partial files removed)", title=title) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def require_space(out: Path, needed: int, what: str, title: str) -> None:
    if free_bytes(out) < needed:
        raise CrakenError(disk_message(out, needed, what), title=title)


def write_export(model, meta: Path, tmp: Path, out: Path, ckpt: Path, state, torch_dtype) -> None:
    """The export's files into `tmp`, then `tmp` renamed to `out`."""
    model.save_pretrained(tmp, safe_serialization=True)
    for item in meta.iterdir():  # the tokenizer files
        if item.is_file() and item.name not in (*_MODEL_FILES, WRITTEN_LIST) and not (tmp / item.name).exists():
            shutil.copy2(item, tmp / item.name)
    (tmp / EXPORT_MARKER).write_text(json.dumps(
        {"checkpoint": str(ckpt.absolute()), "step": state.step, "dtype": str(torch_dtype).split(".")[-1]},
        indent=1) + "\n")
    fsync_tree(tmp)
    ck.replace_dir(tmp, out)
