"""`craken ckpt list|export|convert`: inspect a run's checkpoints, export HF weights, convert for
another number of processes. The work is in `craken_cli.ckpt.manage`; this module parses and prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="Checkpoints: list them, export HF safetensors weights, convert for another number of processes.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)

_RUN_DIR = typer.Argument(metavar="RUN_DIR",
    help="Run folder written by `craken train` (holds checkpoints/).", show_default=False)
_RUN_OR_CKPT = typer.Argument(metavar="RUN_DIR",
    help="Run folder written by `craken train`, or one of its checkpoints/step_* folders.", show_default=False)


@app.command("list", epilog="Example: craken ckpt list runs/default --json")
def list_(
    run_dir: Annotated[Path, _RUN_DIR],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array, one object per checkpoint.")] = False,
) -> None:
    """List a run's checkpoints: step, processes that wrote it, complete or not (and why), size."""
    from ..ckpt.manage import rows
    from ..runfolder import human_bytes

    found = rows(run_dir)
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    if not found:
        typer.echo(f"no checkpoints in {run_dir / 'checkpoints'}")
        return
    # Plain lines, path last and never cut: it is what gets copied into --resume or --step.
    typer.echo(f"{'step':>8}  {'procs':>5}  {'size':>9}  {'path':<40}  state")
    for r in found:
        state = "complete" if r["complete"] else "BROKEN: " + "; ".join(r["problems"][:2])
        if r["universal"]:
            state += " (universal)"
        if r.get("plain"):
            state += " (no DeepSpeed)"
        if r["latest"]:
            state += " (latest)"
        typer.echo(f"{r['step']:>8}  {r['processes'] or '?':>5}  {human_bytes(r['size_bytes']):>9}  {r['path']:<40}  {state}")


@app.command("export", epilog="Examples: craken ckpt export runs/default --out exported/ | "
                              "craken ckpt export runs/default --step 100 --dtype fp32 --out exported-fp32/")
def export(
    run_dir: Annotated[Path, _RUN_OR_CKPT],
    out: Annotated[Path, typer.Option("--out", metavar="DIR",
        help="Folder to write the model into (must not exist or be empty).",
                                      show_default=False)],
    step: Annotated[Optional[int], typer.Option("--step", metavar="N",
        help="Checkpoint step (default: the latest good one).",
                                                show_default=False)] = None,
    dtype: Annotated[str, typer.Option("--dtype", metavar="auto|fp32|bf16|fp16",
        help="auto (the training precision), fp32, bf16 or fp16.")]
    = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out folder.")] = False,
) -> None:
    """Write a consolidated HF safetensors model (config, weights, tokenizer) from a checkpoint's
    DeepSpeed shards, ZeRO-3 included, or from the model.safetensors of a run without DeepSpeed;
    `AutoModelForCausalLM.from_pretrained(OUT)` loads it."""
    from ..ckpt.manage import export as do_export
    from ..ckpt.manage import pick, require_new_output

    require_new_output(out, force, "cannot export", reads=(run_dir,))  # before the slow imports
    ckpt = pick(run_dir, step)
    path = do_export(ckpt, out, dtype=dtype, force=force)
    typer.echo(f"exported {ckpt} -> {path}")


@app.command("convert", epilog="Example: craken ckpt convert runs/default/checkpoints/step_00000100 && "
                               "craken train --num-processes 4 --resume runs/default/checkpoints/universal/step_00000100")
def convert(
    ckpt: Annotated[Path, typer.Argument(metavar="CKPT",
        help="A checkpoint folder (RUN/checkpoints/step_N).", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", metavar="DIR", help="Where to write it (default: "
                                                "RUN/checkpoints/universal/step_N).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out folder.")] = False,
) -> None:
    """Convert a checkpoint to DeepSpeed's universal format, which resumes on any number of processes.

    `craken train --resume` does this by itself when the number of processes changed. A checkpoint
    of a run without DeepSpeed (ZeRO stage 0) needs no conversion: resume from it directly."""
    from ..ckpt.manage import convert as do_convert

    path = do_convert(ckpt, out, force=force)
    typer.echo(f"converted {ckpt} -> {path}\nresume with: craken train --resume {path}")
