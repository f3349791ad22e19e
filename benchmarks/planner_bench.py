"""The planner against measured peak reserved GPU memory, over real architectures (issue 16).

    python3 benchmarks/planner_bench.py --out "$OUT" --budget 440   # the grid, on this machine's GPU
    python3 benchmarks/planner_bench.py --dry-run                    # the rows and their predictions, no GPU
    python3 benchmarks/planner_bench.py --fit [--apply]              # fit on the training rows: constants, errors
    python3 benchmarks/planner_bench.py --docs docs/planner.md       # rewrite its tables (plan/memory.py's constants)

Models are config-only (benchmarks/model_configs/*.json, the public config.json values of ten families, and
the 32k-vocabulary Llama shapes of the first grid), built with random weights, nothing downloaded. Each row
runs in a child forked from one worker process (torch, transformers and DeepSpeed imported once; no engine
leaves memory for the next row) and builds the engine as craken trains: no ZeRO = fp32 weights under bf16
autocast and torch's fused AdamW (fp32 master weights), `modeling.compile_regions` when compiled;
ZeRO 1-3 = `deepspeed.initialize` with the DeepSpeed JSON craken renders (a 16-bit module, fp32 masters in
the optimizer). Peak = `torch.cuda.max_memory_reserved()` over 2 warm-up and 3 timed steps.

Rows are declared before anything is measured: GRID's `split` says which ones the constants may be fitted
on ("train") and which are only reported ("held-out", docs/planner.md). A row whose micro-batch is "auto"
takes the one `craken train --auto --global-batch 32` would pick; strategy "auto" takes --auto's whole
choice. Each row is written to <out>/planner_bench.jsonl as it finishes, with the commit; the table prints last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
CONFIGS = ROOT / "benchmarks" / "model_configs"
RESULTS = ROOT / "benchmarks" / "results"

SHAPES = {  # the first grid's Llama shapes: RMSNorm, SwiGLU, GQA, vocabulary 32000
    "llama-160m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4),
    "llama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4),
    "llama-2.7b": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8),
}
AUTO_GLOBAL_BATCH = 32
WARMUP_STEPS, TIMED_STEPS = 2, 3
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


@dataclass(frozen=True)
class Row:
    model: str
    seq: int
    strategy: str  # a planner strategy name ("zero2+offload_optimizer_cpu"), or "auto": --auto's choice
    micro_batch: int | str  # or "auto": the largest --auto would pick for this strategy
    compiled: bool | None  # None: as --auto decides
    split: str  # "train" (the fit may use it) or "held-out" (reported only)
    extra: tuple[str, ...] = ()  # --set values of the row (e.g. "model.loss=model")
    grad_accum: int = 1  # micro-batches per optimizer step


# Held-out first, the one the issue names at the top: the call may end before the last rows.
GRID = [
    Row("qwen2.5-0.5b", 2048, "auto", "auto", None, "held-out"),  # `craken train --auto --global-batch 32`
    Row("llama-3.2-1b", 2048, "auto", "auto", None, "held-out"),  # 128k vocabulary, tied
    Row("gemma-2-2b", 1024, "auto", "auto", None, "held-out"),  # 256k vocabulary, soft-capped logits, 4 norms
    Row("gpt2-medium", 1024, "auto", "auto", None, "held-out"),  # GPT-2 layout, eager, dropout
    Row("pythia-1.4b", 2048, "auto", "auto", None, "held-out"),  # GPT-NeoX: fused qkv, parallel residual
    Row("phi-3-mini", 2048, "auto", "auto", None, "held-out"),  # fused qkv and gate/up, 3.8B
    Row("mistral-7b", 1024, "auto", "auto", None, "held-out"),  # 7B at the card's edge
    # The model's own loss compiled at a large vocabulary (what the chunked loss replaces): the term
    # COMPILED_LOSS_FP32_BYTES had no training row of its own but issue 16's out-of-memory bound. First of the
    # training rows: the ones the refit needs most.
    Row("qwen2.5-0.5b", 2048, "zero0", 16, True, "train", ("model.loss=model",)),
    Row("llama-3.2-1b", 2048, "zero0", 8, True, "train", ("model.loss=model",)),
    Row("qwen2.5-0.5b", 1024, "zero0", "auto", False, "train"),
    Row("smollm2-1.7b", 2048, "zero0", "auto", True, "train"),
    Row("llama-3.2-1b", 1024, "zero2", "auto", False, "train"),
    Row("smollm2-1.7b", 1024, "zero1", "auto", True, "train"),
    Row("llama-3.2-1b", 1024, "zero3", "auto", False, "train"),
    Row("gemma-2-2b", 2048, "zero0", "auto", False, "train"),
]
# Where the gradients outweigh what the backward frees (7-8B on one GPU), the crossing between the backward's
# start and end (phi-3-mini at small micro-batches), and accumulation, which holds the gradients through each
# backward: every row held out from the fit that gave the plain engine's gradients their own peak.
GRADIENT_GRID = [
    Row("mistral-7b", 1024, "auto", "auto", None, "held-out"),  # what --auto picks now
    Row("llama-3.1-8b", 1024, "auto", "auto", None, "held-out"),  # 128k vocabulary, 8B
    Row("qwen2.5-7b", 1024, "auto", "auto", None, "held-out"),  # 152k vocabulary, biased q/k/v
    Row("mistral-7b", 2048, "zero0", "auto", True, "held-out"),
    Row("mistral-7b", 1024, "zero0", 1, True, "held-out", grad_accum=2),  # gradients held through the backward
    Row("mistral-7b", 1024, "zero0", 2, False, "held-out"),  # eager at 7B
    Row("phi-3-mini", 2048, "zero0", 2, True, "held-out"),
    Row("phi-3-mini", 2048, "zero0", 4, True, "held-out"),
    Row("llama-3.2-1b", 2048, "zero0", 8, True, "held-out", grad_accum=2),
    Row("mistral-7b", 1024, "zero0", 2, True, "held-out", grad_accum=2),
    Row("mistral-7b", 1024, "zero0", 8, True, "held-out"),
]
GRIDS = {"families": GRID, "gradients": GRADIENT_GRID}
if os.environ.get("PLANNER_BENCH_SMOKE"):  # a CPU run of the code path (gloo, DS_ACCELERATOR=cpu): no numbers
    SHAPES = {"llama-160m": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2)}
    GRID = [Row("llama-160m", 64, "zero0", 2, False, "held-out"),
            Row("llama-160m", 64, "zero2", 2, False, "train", ("model.loss=chunked",))]
    GRIDS = {"families": GRID, "gradients": [Row("llama-160m", 64, "zero0", 2, False, "held-out", grad_accum=2)]}


def model_config(name: str) -> dict:
    """The config.json of a benchmark model: a family's public config, or one of SHAPES."""
    if name in SHAPES:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
                "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                "hidden_act": "silu", "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, **SHAPES[name]}
    return json.loads((CONFIGS / f"{name}.json").read_text())


def write_config(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model_config(name), indent=1))
    return folder


def spec_for(folder: Path, seq: int, strategy: str, micro: int, compiled: bool, world: int, extra=(), hw=None,
             global_batch: int | None = None, grad_accum: int = 1):
    """The spec `craken train --model F --seq-len S --zero N --micro-batch M ...` resolves to, with exactly
    the offloads the strategy name holds (the presets' own offloads never leak into a row)."""
    from craken_cli.config.options import SpecArgs, load_run

    stage = int(strategy.split("+")[0].removeprefix("zero"))
    offload = "cpu" if "offload_optimizer_cpu" in strategy else "none"
    param_offload = "cpu" if "offload_param_cpu" in strategy else "none"
    flags = {"--model": str(folder), "--seq-len": seq, "--zero": stage, "--micro-batch": micro,
             "--num-processes": world, "--precision": "bf16", "--activation-checkpointing": "+ac" in strategy}
    if global_batch:
        flags["--global-batch"] = global_batch
    else:
        flags["--grad-accum"] = grad_accum
    sets = [f"offload.optimizer.device={offload}", f"offload.param.device={param_offload}",
            f"model.compile={str(compiled).lower()}", *extra]
    resolved, _ = load_run(SpecArgs(flags=flags, sets=sets), hardware=hw, environ={})
    return resolved.spec


def plan_for(spec, folder: Path, hw):
    from craken_cli.plan.modelinfo import model_info
    from craken_cli.plan.memory import plan

    return plan(model_info(str(folder)), spec, hw, search_micro_batch=False)


def predict(spec, folder: Path, hw):
    return plan_for(spec, folder, hw).requested


def resolve_row(row: Row, folder: Path, hw, world: int = 1) -> tuple[str, int, bool]:
    """(strategy, micro-batch, compiled) of a row, with "auto" parts chosen as --auto chooses them."""
    from craken_cli.plan.modelinfo import model_info
    from craken_cli.plan.memory import compiled_where_measured, compiles_by_default, plan

    info = model_info(str(folder))
    compiled = row.compiled
    if compiled is None:
        compiled = compiles_by_default(info, hw)
    stage_name = "zero0" if row.strategy == "auto" else row.strategy
    for try_compiled in ([compiled, False] if compiled else [False]):
        spec = spec_for(folder, row.seq, stage_name, 1, try_compiled, world, row.extra, hw=hw,
                        global_batch=AUTO_GLOBAL_BATCH)
        planned = plan(info, spec, hw)
        if row.strategy == "auto":
            pick = planned.choice
            if pick is None or (try_compiled and not compiled_where_measured(pick)):
                continue
        else:
            pick = next(s for s in planned.strategies if s.name == row.strategy)
        micro = pick.micro_batch if row.micro_batch == "auto" else int(row.micro_batch)
        return pick.name, micro, try_compiled
    return stage_name, 1 if row.micro_batch == "auto" else int(row.micro_batch), False


def commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------- worker


def launch_env(run_dir: Path, port: int) -> dict[str, str]:
    """The ACCELERATE_* variables `accelerate launch --config_file RUN/accelerate.yaml` gives each
    process of this run (mixed precision, DeepSpeed and its config file, ...), computed by accelerate's
    own launcher functions from the same rendered files `craken train` launches with. The process
    group itself is the bench's (torchrun's worker, one fork per row)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import launch as accelerate_launch

    args = launch_command_parser().parse_args(["--config_file", str(run_dir / "accelerate.yaml"), "--main_process_port",
                                               str(port), "-m", "craken_cli.train.loop", str(run_dir / "run.yaml")])
    args, defaults, mp_from_config_flag = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command prepares its deepspeed_launcher
        fields = list(defaults.deepspeed_config.keys()) if defaults else []
        args.deepspeed_fields_from_accelerate_config = ",".join(fields + (["mixed_precision"] if mp_from_config_flag
                                                                          else []))
        env = accelerate_launch.prepare_deepspeed_cmd_env(args)[1]
    elif args.multi_gpu:
        env = accelerate_launch.prepare_multi_gpu_env(args)
    else:
        env = accelerate_launch.prepare_simple_launcher_cmd_env(args)[1]
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}


def write_run_folder(spec, run_dir: Path) -> Path:
    """run.yaml, accelerate.yaml and (DeepSpeed) ds_config.json, rendered as `craken train` renders them."""
    from craken_cli.launch.render import rendered_files, write_files

    write_files(rendered_files(spec, {}, run_dir), run_dir, force=True)
    return run_dir


def random_loader(spec, vocab: int, rank: int, steps: int):
    """`steps` micro-batches of random tokens in the loop's batch format (input_ids, labels)."""
    import torch

    from craken_cli.train.loop import collate

    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, vocab, (steps * spec.batch.micro_batch, spec.data.seq_len), generator=gen)
    return torch.utils.data.DataLoader([{"input_ids": row} for row in ids], batch_size=spec.batch.micro_batch,
                                       collate_fn=collate)


def run_row(spec, run_dir: Path, rank: int, world: int) -> dict:
    """One row through `craken train`'s own code: the Accelerator of the rendered launch, the model built,
    converted and compiled by modeling (load_model, ready_for_training), the engine's prepare and the
    Trainer's micro-step; random tokens instead of the data set, peak reserved memory over the steps."""
    import torch

    from craken_cli.train import modeling
    from craken_cli.train.engine import make_engine
    from craken_cli.train.loop import Trainer

    trainer = Trainer(spec, run_dir / "run.yaml")
    trainer.setup_accelerator()
    acc = trainer.accelerator
    model = modeling.load_model(spec, None, modeling.init_device(spec, acc.device))
    model, record = modeling.ready_for_training(model, spec)
    trainer.engine = make_engine(spec, acc)
    loader = random_loader(spec, model.config.vocab_size, rank, WARMUP_STEPS + TIMED_STEPS)
    trainer.model, loader, _ = trainer.engine.prepare(model, loader)
    trainer.model.train()
    on_gpu = acc.device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    sync()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(acc.device)
    for i, batch in enumerate(loader):
        if i == WARMUP_STEPS:
            sync()
            start = time.time()
        trainer.micro_step(batch)
    sync()
    tps = TIMED_STEPS * spec.batch.micro_batch * spec.data.seq_len / (time.time() - start)
    out = {"ran": record, "tokens_per_s": round(tps)}
    if not on_gpu:
        return {**out, "smoke": "CPU run: no GPU memory to measure"}
    return {**out, "measured_gib": round(torch.cuda.max_memory_reserved(acc.device) / 2**30, 3),
            "allocated_gib": round(torch.cuda.max_memory_allocated(acc.device) / 2**30, 3)}


def child(conn, spec, run_dir: Path, rank: int, world: int, port: int) -> None:
    """One row in a fresh (forked) process: nothing a previous engine left behind can be counted."""
    import datetime

    import torch
    import torch.distributed as dist

    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # each row its own store, on its own port
    os.environ["MASTER_PORT"] = str(port)
    try:
        os.environ.update(launch_env(run_dir, port))
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            torch.cuda.set_device(rank)
        dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=120),
                                device_id=torch.device("cuda", rank) if on_gpu else None)
        conn.send(run_row(spec, run_dir, rank, world))
    except torch.OutOfMemoryError as exc:
        conn.send({"oom": str(exc)[:300]})
    except Exception as exc:  # a failed row is a row too
        conn.send({"failed": f"{exc.__class__.__name__}: {exc}"[:400]})
    conn.close()
    os._exit(0)  # skip NCCL and DeepSpeed teardown: the process is done


def measure(ctx, spec, run_dir: Path, rank: int, world: int, port: int, timeout: float) -> dict:
    parent_end, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=child, args=(child_end, spec, run_dir, rank, world, port))
    proc.start()
    child_end.close()
    result = parent_end.recv() if parent_end.poll(timeout) else {"failed": f"timeout after {timeout:.0f} s"}
    proc.join(5)
    if proc.is_alive():
        proc.kill()
    return result


def row_record(row: Row, strategy: str, micro: int, compiled: bool, pred, hw, world: int, head: str) -> dict:
    return {"gpus": world, "model": row.model, "seq": row.seq, "strategy": strategy + ("+compile" if compiled else ""),
            "base_strategy": strategy.split("+")[0], "compiled": compiled, "extra": list(row.extra), "micro_batch": micro,
            "split": row.split, "asked": {"strategy": row.strategy, "micro_batch": row.micro_batch},
            "grad_accum": row.grad_accum, "allocator": "grown segments" if hw.grown_segments else "fixed segments",
            "predicted_gib": round(pred.reserved_gib, 3), "predicted_total_gib": round(pred.total_gib, 3),
            "device": hw.gpus[0].name if hw.gpus else "cpu", "commit": head, "measured_on": time.strftime("%Y-%m-%d")}


def worker(args) -> int:
    """One per GPU (torchrun). Imports once, then forks a child per row, so rows start in seconds."""
    import multiprocessing as mp

    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # keep CUDA uninitialised here, so fork is safe
    import deepspeed  # noqa: F401  (imported once, for the children)
    import torch
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    from craken_cli.plan.hardware import detect
    from craken_cli.launch.command import normalized_arch_list
    from craken_cli.train import engine, loop, modeling  # noqa: F401  (the children's training code)
    from accelerate.commands import launch  # noqa: F401

    arch = normalized_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    if arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch  # DeepSpeed's op builder (CPU Adam) cannot parse "9.0a"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    ctx = mp.get_context("spawn" if torch.cuda.is_initialized() else "fork")
    hw, head, began = detect(), commit(), time.time()
    card = min((g.memory_total for g in hw.gpus), default=2**40) / 2**30
    log = open(Path(args.out) / "planner_bench.jsonl", "a") if rank == 0 else None
    for i, row in enumerate(GRIDS[args.grid]):
        folder = write_config(Path(args.models) / row.model, row.model)
        strategy, micro, compiled = resolve_row(row, folder, hw, world)
        spec = spec_for(folder, row.seq, strategy, micro, compiled, world, row.extra, hw=hw, grad_accum=row.grad_accum)
        pred = predict(spec, folder, hw)
        rec = row_record(row, strategy, micro, compiled, pred, hw, world, head)
        rec["loss"] = spec.model.loss  # the setting; rec["ran"]["loss_kind"]: the loss that trained
        left = args.budget - (time.time() - began)
        if pred.total_gib > card:
            rec["skipped"] = f"predicted {pred.total_gib:.1f} GiB > {card:.1f} GiB card"
        elif left < args.min_row_s:
            rec["skipped"] = f"time budget: {left:.0f} s left"
        else:
            started = time.time()
            run_dir = write_run_folder(spec, Path(args.models) / "runs" / f"row{i}-rank{rank}")
            rec.update(measure(ctx, spec, run_dir, rank, world, args.port + i, min(args.row_timeout, left)))
            if "measured_gib" in rec:
                rec["error"] = round(rec["predicted_gib"] / rec["measured_gib"] - 1, 4)
            rec["wall_s"] = round(time.time() - started, 1)
        if log:
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- rows


def recorded_rows(paths=None) -> list[dict]:
    """Every recorded row (benchmarks/results/*.jsonl, or the given files); superseded ones left out."""
    files = [Path(p) for p in paths] if paths else sorted(RESULTS.glob("*.jsonl"))
    rows = [json.loads(x) for f in files for x in f.read_text().splitlines() if x.strip()]
    return [r for r in rows if not r.get("superseded")]


def ran_loss(row: dict) -> str:
    """The model.loss a recorded row is re-predicted with: the loss it trained with where the row says
    ("ran", written since the bench trains through modeling.ready_for_training), else its setting; rows
    from before train/loss.py have none (the model's own)."""
    return row.get("ran", {}).get("loss_kind") or row.get("loss", "model")


def supersede(keys: list[str], reason: str, files=None) -> int:
    """Mark the recorded rows named MODEL:SEQ:MICRO_BATCH:MEASURED_ON ("all": every row of `files`)
    superseded (kept, with the reason, and no longer re-predicted): rows of a program craken no longer runs,
    or re-measured. Returns how many were marked."""
    if keys == ["all"] and not files:
        raise SystemExit("--supersede all needs --rows FILE: the files whose rows are superseded")
    wanted = {tuple(k.split(":")) for k in keys}
    marked = 0
    for f in [Path(p) for p in files] if files else sorted(RESULTS.glob("*.jsonl")):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        for r in rows:
            key = (r["model"], str(r["seq"]), str(r["micro_batch"]), r.get("measured_on", ""))
            if (keys == ["all"] or key in wanted) and not r.get("superseded"):
                r["superseded"], marked = reason, marked + 1
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return marked


def hypothetical_hardware(rows: list[dict]):
    """One GPU of the rows' card (the prediction depends on its memory only where the row is skipped)."""
    from craken_cli.plan.hardware import GPU, GiB, Hardware

    return Hardware(gpus=(GPU(0, "recorded", int(139.8 * GiB), int(139.8 * GiB), (9, 0)),), ram_total=1024 * GiB)


def prepared(rows: list[dict], root: Path, hw) -> list[tuple[dict, object]]:
    """(row, a function returning the current planner's prediction of it in GiB reserved)."""
    from craken_cli.plan.modelinfo import model_info
    from craken_cli.plan.memory import Candidate, estimate, shape_of

    from dataclasses import replace

    out = []
    for r in rows:
        hw_row = replace(hw, grown_segments=grew_segments(r))
        folder = write_config(root / r["model"], r["model"])
        extra = (*r.get("extra", ()), f"model.loss={ran_loss(r)}")
        spec = spec_for(folder, r["seq"], r["strategy"].replace("+compile", ""), r["micro_batch"], r["compiled"],
                        r["gpus"], extra, hw_row, grad_accum=r.get("grad_accum", 1))
        info = model_info(str(folder))
        shape = shape_of(info, spec, hw_row, r["gpus"], hw.gpus[0].memory_total)
        cand = Candidate(spec.zero.stage, spec.offload.optimizer.device, spec.offload.param.device,
                         spec.model.activation_checkpointing)
        accum = spec.batch.accumulation(r["gpus"])
        out.append((r, lambda info=info, cand=cand, micro=r["micro_batch"], accum=accum, shape=shape:
                    estimate(info, cand, micro, accum, shape).reserved_gib))
    return out


def grew_segments(row: dict) -> bool:
    """Whether a recorded row ran with grown allocator segments: rows measured before craken's GPU workers
    started with them (8cd7a28, 2026-12-02) say "allocator": "fixed segments"."""
    return row.get("allocator", "grown segments") == "grown segments"


def errors(pairs) -> list[tuple[dict, float]]:
    """(row, signed error): predicted / measured - 1; an out-of-memory row with a known lower bound counts
    only when the prediction is below that bound."""
    out = []
    for r, predict_gib in pairs:
        if "measured_gib" in r:
            out.append((r, predict_gib() / r["measured_gib"] - 1))
        elif "measured_at_least_gib" in r:
            out.append((r, min(0.0, predict_gib() / r["measured_at_least_gib"] - 1)))
    return out


# ---------------------------------------------------------------------------------------------- fit

# The planner's fitted constants and the values the fit tries (plan/memory.py marks them "Fitted").
FITTED = {
    "FRAGMENTATION": [round(0.02 * i, 2) for i in range(16)],  # one value for every stage
    "COMPILED_FRAGMENTATION": [round(0.025 * i, 3) for i in range(17)],
    "STEP_REUSE_OF_ACTIVATIONS": [round(0.05 * i, 2) for i in range(13)],
    "UPCAST_LOSS_FP32_BYTES": [4, 6, 8, 10, 12, 14],
    "COMPILED_LOSS_FP32_BYTES": [0, 2, 4, 6, 8, 10, 12, 14],
    "COMPILED_MLP_SAVED": [2, 3, 4],
    "EAGER_WEIGHT_COPY_SHARE": [0.0, 0.25, 0.5, 0.75, 1.0],
    "COMPILED_WEIGHT_COPY_SHARE": [0.0, 0.25, 0.5, 0.75, 1.0],
}


def set_constant(name: str, value) -> None:
    from craken_cli.plan import memory as planner

    setattr(planner, name, {stage: value for stage in range(4)} if name == "FRAGMENTATION" else value)


def current(name: str):
    from craken_cli.plan import memory as planner

    value = getattr(planner, name)
    return value[0] if name == "FRAGMENTATION" else value


def training(pairs) -> list:
    """The pairs the fit may use: every row not declared held-out."""
    return [(r, predict_gib) for r, predict_gib in pairs if r.get("split", "train") != "held-out"]


def objective(pairs) -> tuple[float, float]:
    errs = [e for _, e in errors(pairs)]
    return (max(abs(e) for e in errs), sum(e * e for e in errs)) if errs else (0.0, 0.0)


# Where a second descent starts: each constant's derived value (docs/planner.md), no slack.
DERIVED = {"FRAGMENTATION": 0.0, "COMPILED_FRAGMENTATION": 0.0, "STEP_REUSE_OF_ACTIVATIONS": 0.25,
           "UPCAST_LOSS_FP32_BYTES": 12, "COMPILED_LOSS_FP32_BYTES": 2, "COMPILED_MLP_SAVED": 2,
           "EAGER_WEIGHT_COPY_SHARE": 1.0, "COMPILED_WEIGHT_COPY_SHARE": 1.0}


def descend(train_pairs, rounds: int, start: dict) -> tuple[tuple[float, float], dict]:
    """Coordinate descent over FITTED from `start`: (objective reached, the values)."""
    for name, value in start.items():
        set_constant(name, value)
    for _ in range(rounds):
        for name, values in FITTED.items():
            before, scores = current(name), []
            for value in values:
                set_constant(name, value)
                scores.append((objective(train_pairs), value != before, value))
            set_constant(name, min(scores)[2])
    return objective(train_pairs), {name: current(name) for name in FITTED}


def fit(train_pairs, rounds: int = 3, start: dict | None = None) -> dict:
    """The smallest largest error on the training rows (then the smallest sum of squares), by coordinate
    descent over FITTED from several starts, the best kept: the planner's own values (or `start`), and
    DERIVED with each count of the compiled MLP's saved tensors (a discrete choice that one-at-a-time
    steps cannot leave: it moves together with the compiled slack). A constant no training row moves
    keeps its value. Leaves the planner module set to the result."""
    own = {name: current(name) for name in FITTED} | (start or {})
    begins = [own] + [DERIVED | {"COMPILED_MLP_SAVED": k} for k in FITTED["COMPILED_MLP_SAVED"]]
    results = [descend(train_pairs, rounds, begin) for begin in begins]
    best = min(results, key=lambda r: r[0])[1]
    for name, value in best.items():
        set_constant(name, value)
    return best


def apply_constants(values: dict, path: Path = ROOT / "src" / "craken_cli" / "plan" / "memory.py") -> list[str]:
    """Write fitted values into plan/memory.py's `NAME = value` lines (FRAGMENTATION: the same value for every
    stage); returns the lines changed, as "NAME: old -> new"."""
    import re

    text, changed = path.read_text(), []
    for name, value in values.items():
        new = "{" + ", ".join(f"{stage}: {value}" for stage in range(4)) + "}" if name == "FRAGMENTATION" else repr(value)
        match = re.compile(rf"^{name} = (.*?)$", re.M).search(text)
        if match is None:
            raise SystemExit(f"plan/memory.py has no line `{name} = ...`")
        old = match.group(1).split("  #")[0].strip()
        if old != new:
            changed.append(f"{name}: {old} -> {new}")
            text = text[:match.start(1)] + new + text[match.end(1):]
    path.write_text(text)
    return changed


# ---------------------------------------------------------------------------------------------- tables


def table(rows_errors: list[tuple[dict, float]], pairs_by_id: dict) -> list[str]:
    lines = ["| model | seq | strategy | micro-batch | predicted GiB | measured GiB | error | device | commit |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r, err in rows_errors:
        pred = pairs_by_id[id(r)]()
        meas = f"{r['measured_gib']:.2f}" if "measured_gib" in r else f">= {r['measured_at_least_gib']:.2f} (OOM)"
        lines.append(f"| {r['model']} | {r['seq']} | {r['strategy']} | {r['micro_batch']} | {pred:.2f} | {meas} | "
                     f"{err:+.1%} | {r['device']} | {r.get('commit', '-')} |")
    return lines


def summary(rows_errors) -> str:
    errs = [abs(e) for _, e in rows_errors]
    if not errs:
        return "no rows measured"
    return (f"{len(errs)} rows; largest error {max(errs):.1%}; {sum(e <= 0.10 for e in errs)} of {len(errs)} "
            "within +-10%")


def report(pairs) -> str:
    by_id = {id(r): p for r, p in pairs}
    train = errors([(r, p) for r, p in pairs if r.get("split", "train") != "held-out"])
    held = errors([(r, p) for r, p in pairs if r.get("split") == "held-out"])
    not_run = [r for r, _ in pairs if r.get("split") == "held-out" and "measured_gib" not in r
               and "measured_at_least_gib" not in r]
    lines = [START, "", "Re-predicted by the current planner (`planner_bench.py --docs`); error = predicted / "
             "measured - 1 of the peak reserved GiB on GPU 0.", "", f"**Training rows** ({summary(train)}):", "",
             *table(train, by_id), "", f"**Held-out rows** ({summary(held)}):", ""]
    lines += table(held, by_id) if held else pending()
    if not_run:
        lines += ["", "Held-out rows without a measurement: " + ", ".join(
            f"{r['model']} seq {r['seq']} ({r.get('skipped') or r.get('oom') or r.get('failed', 'not run')})"
            for r in not_run)]
    return "\n".join(lines + ["", END])


def pending(models: Path = Path(os.environ.get("TMPDIR", "/tmp")) / "craken-bench-models") -> list[str]:
    """GRID's held-out rows as --auto would run them on one H200, predicted, the measurement left open."""
    from craken_cli.plan.hardware import GPU, GiB, Hardware

    hw = Hardware(gpus=(GPU(0, "NVIDIA H200", int(139.8 * GiB), int(139.8 * GiB), (9, 0)),), ram_total=128 * GiB)
    lines = ["<!-- GPU: the held-out rows below are not measured yet; the lead's planner_bench.py call fills them -->",
             "| model | seq | strategy (--auto, global batch 32) | micro-batch | predicted GiB | measured GiB | error |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in (r for r in GRID if r.split == "held-out"):
        folder = write_config(models / row.model, row.model)
        strategy, micro, compiled = resolve_row(row, folder, hw)
        pred = predict(spec_for(folder, row.seq, strategy, micro, compiled, 1, row.extra, hw=hw), folder, hw)
        lines.append(f"| {row.model} | {row.seq} | {strategy + ('+compile' if compiled else '')} | {micro} | "
                     f"{pred.reserved_gib:.2f} | **GPU: pending** | **pending** |")
    return lines


def write_docs(text: str, path: Path) -> None:
    doc = path.read_text() if path.exists() else ""
    if START in doc and END in doc:
        doc = doc[:doc.index(START)] + text + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip() + "\n\n" + text + "\n"
    path.write_text(doc)


def compact(rows: list[dict]) -> str:
    out = [f"{'model':14} {'seq':>5} {'strategy':34} {'mb':>3} {'split':8} {'pred':>7} {'meas':>7} {'err':>7}"]
    for r in rows:
        meas = f"{r['measured_gib']:7.2f}" if "measured_gib" in r else ("    OOM" if "oom" in r else "      -")
        err = f"{r['error']:+7.1%}" if "error" in r else f" {r.get('skipped') or r.get('failed', '')[:40]}"
        out.append(f"{r['model']:14} {r['seq']:5} {r['strategy']:34} {r['micro_batch']:3} {r['split']:8} "
                   f"{r['predicted_gib']:7.2f} {meas} {err}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- census

CENSUS = {"gpt2-medium": (1024, 32), "gemma-2-2b": (1024, 8), "qwen2.5-0.5b": (2048, 8), "llama-3.2-1b": (2048, 8),
          "pythia-1.4b": (2048, 16)}  # model: (seq, micro-batch), one GPU


def held_bytes(name: str, layers: int, seq: int, micro: int, compiled: bool) -> tuple[float, float]:
    """(bytes held after the forward, peak bytes in the backward) above the built model, one micro-batch of
    a `layers`-layer copy of the model, trained as a no-ZeRO craken run: fp32 weights under bf16 autocast,
    the model's own loss (modeling.ready_for_training, model.loss=model)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from craken_cli.train import modeling

    cfg = AutoConfig.for_model(**{k: v for k, v in model_config(name).items() if k != "architectures"})
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, key):
            setattr(cfg, key, layers)
    cfg.use_cache = False
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the code path only, every figure 0
    gpu = device == "cuda"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    spec = spec_for(write_config(Path("/tmp/craken-census") / name, name), seq, "zero0", micro, compiled, 1,
                    ("model.loss=model",), hw=census_hardware())
    model, _ = modeling.ready_for_training(model, spec)
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (micro, seq), device=device)
    allocated = torch.cuda.memory_allocated if gpu else (lambda: 0)
    for _ in range(2):  # the first compiles
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = allocated()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        held = allocated() - base
        loss.backward()
        peak = (torch.cuda.max_memory_allocated() if gpu else 0) - base
        model.zero_grad(set_to_none=True)
        del loss
    return held, peak


def census_hardware():
    from craken_cli.plan.hardware import GPU, GiB, Hardware

    return Hardware(gpus=(GPU(0, "NVIDIA H200", int(139.8 * GiB), int(139.8 * GiB), (9, 0)),), ram_total=128 * GiB)


def census(names: list[str], out: Path) -> int:
    """What one decoder layer and the logits hold on the GPU, measured (1- and 2-layer copies of each model)
    against the planner's per-token terms: the family traits behind a row's error, in about a minute."""
    from craken_cli.plan.modelinfo import model_info
    from craken_cli.plan.memory import layer_activation_bytes_per_token, loss_bytes, residual_bytes

    out.mkdir(parents=True, exist_ok=True)
    lines = [f"{'model':14} {'mode':8} {'layer B/token':>14} {'planner':>9} {'rest B/logit':>13} {'bwd B/logit':>12} "
             f"{'planner loss B/logit':>21}"]
    for name in names:
        seq, micro = CENSUS[name]
        info = model_info(str(write_config(Path("/tmp/craken-census") / name, name)))
        tokens = seq * micro
        for compiled in ((False,) if info.family == "gpt" else (False, True)):  # GPT-2/NeoX never compile
            try:
                (h1, p1), (h2, _) = (held_bytes(name, n, seq, micro, compiled) for n in (1, 2))
            except Exception as exc:  # a failed model is a line too
                lines.append(f"{name:14} {'compiled' if compiled else 'eager':8} {type(exc).__name__}: {exc}"[:200])
                continue
            layer, logits = (h2 - h1) / tokens, tokens * info.vocab_size
            rest, backward = (h1 - (h2 - h1)) / logits, (p1 - h1) / logits
            on = compiled and info.family != "gpt"
            rec = {"model": name, "seq": seq, "micro_batch": micro, "compiled": compiled, "layer_bytes_per_token":
                   round(layer), "planner_layer": round(layer_activation_bytes_per_token(info, 2, on, residual_bytes(0, 2))),
                   "rest_bytes_per_logit": round(rest, 2), "backward_bytes_per_logit": round(backward, 2),
                   "planner_loss_bytes_per_logit": round(loss_bytes(info, tokens, 2, on) / logits, 2)}
            with open(out / "census.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            lines.append(f"{name:14} {'compiled' if compiled else 'eager':8} {layer:14,.0f} {rec['planner_layer']:9,} "
                         f"{rest:13.2f} {backward:12.2f} {rec['planner_loss_bytes_per_logit']:21.2f}")
            print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


# ---------------------------------------------------------------------------------------------- main


def run_grid(args) -> int:
    from craken_cli.plan.hardware import detect
    from craken_cli.launch.command import allocator_env  # the rows reserve memory as craken train's workers do

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hw = detect()
    if not hw.gpus:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(allocator_env(os.environ) if hw.gpus else {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}",
           __file__, "--worker", "--out", str(out), "--models", str(args.models), "--row-timeout",
           str(args.row_timeout), "--port", str(args.port), "--budget", str(args.budget), "--grid", args.grid,
           "--min-row-s", str(args.min_row_s)]
    with open(out / "worker.log", "w") as fh:
        try:
            subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=args.budget + 40)
        except subprocess.TimeoutExpired:
            print(f"worker stopped after {args.budget + 40} s; its rows so far are kept", flush=True)
    file = out / "planner_bench.jsonl"
    rows = [json.loads(x) for x in file.read_text().splitlines() if x.strip()] if file.exists() else []
    print(compact(rows))
    return 0


def dry_run(args) -> int:
    from craken_cli.plan.hardware import GPU, GiB, Hardware

    hw = Hardware(gpus=(GPU(0, "H200 (assumed)", int(139.8 * GiB), int(139.8 * GiB), (9, 0)),), ram_total=128 * GiB)
    for row in GRIDS[args.grid]:
        folder = write_config(Path(args.models) / row.model, row.model)
        strategy, micro, compiled = resolve_row(row, folder, hw)
        spec = spec_for(folder, row.seq, strategy, micro, compiled, 1, row.extra, hw=hw, grad_accum=row.grad_accum)
        pred = predict(spec, folder, hw)
        print(f"{row.split:8} {row.model:14} seq {row.seq:5} {strategy + ('+compile' if compiled else ''):34} "
              f"mb {micro:3} x {row.grad_accum}: {pred.reserved_gib:7.2f} GiB reserved, {pred.total_gib:7.2f} total")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--gpus", type=int, default=1, help="processes (GPUs) per row")
    ap.add_argument("--grid", choices=sorted(GRIDS), default="families", help="which rows to measure (or --dry-run)")
    ap.add_argument("--budget", type=int, default=440, help="seconds for the whole grid, model builds included")
    ap.add_argument("--min-row-s", type=int, default=25, help="a row starts only with this many seconds left")
    ap.add_argument("--row-timeout", type=int, default=150, help="seconds one row may take")
    ap.add_argument("--port", type=int, default=29800, help="first of the per-row rendezvous ports")
    ap.add_argument("--dry-run", action="store_true", help="print the rows and their predictions; train nothing")
    ap.add_argument("--fit", action="store_true", help="fit FITTED on the training rows, report the held-out ones")
    ap.add_argument("--apply", action="store_true", help="with --fit: write the fitted constants into plan/memory.py")
    ap.add_argument("--docs", default=None, help="markdown file whose bench block to rewrite from the recorded rows")
    ap.add_argument("--rows", nargs="*", default=None, help="row files (default: benchmarks/results/*.jsonl)")
    ap.add_argument("--census", nargs="*", default=None, choices=sorted(CENSUS),
                    help="measure one layer's and the logits' GPU memory of these models against the planner's terms")
    ap.add_argument("--supersede", nargs="*", default=None, metavar="MODEL:SEQ:MB:DATE|all",
                    help="mark these recorded rows superseded (with --reason): kept, no longer re-predicted")
    ap.add_argument("--reason", default=None, help="why the --supersede rows no longer describe craken's runs")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--models", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "craken-bench-models"))
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.dry_run:
        return dry_run(args)
    if args.supersede:
        if not args.reason:
            ap.error("--supersede needs --reason: what about craken's runs changed since these rows")
        print(f"{supersede(args.supersede, args.reason, args.rows)} rows marked superseded")
        return 0
    if args.census is not None:
        return census(args.census or sorted(CENSUS), Path(args.out))
    if args.fit or args.docs:
        rows = recorded_rows(args.rows)
        pairs = prepared(rows, Path(args.models), hypothetical_hardware(rows))
        if args.fit:  # printed; with --apply also written into plan/memory.py (then run --docs)
            fitted = fit(training(pairs))
            print(json.dumps(fitted, indent=1))
            if args.apply:
                print("plan/memory.py: " + ("; ".join(apply_constants(fitted)) or "no constant moved"))
            print(report(pairs))
            return 0
        write_docs(report(pairs), Path(args.docs))
        return 0
    return run_grid(args)


if __name__ == "__main__":
    sys.exit(main())
