"""GPU benchmark grid: craken's strategies against hand-written Accelerate + DeepSpeed, in one call.

    python3 benchmarks/gpu_bench.py --grid one-gpu --out $OUT        # 1 GPU
    python3 benchmarks/gpu_bench.py --grid two-gpu --out $OUT        # 2 GPUs (+ two "machines" over NCCL)
    python3 benchmarks/gpu_bench.py --grid zero-ratio --out $OUT     # craken ZeRO-1/2 vs its no-ZeRO mode, 1 GPU
    python3 benchmarks/gpu_bench.py --grid zero-ratio-repeat --out $OUT  # the same, 100 steps, no ZeRO first and last
    python3 benchmarks/gpu_bench.py --grid one-gpu-rest --out $OUT   # ZeRO-3, ZeRO-2 + offload, ZeRO-1: craken vs hand
    python3 benchmarks/gpu_bench.py --grid shapes --out $OUT         # 350M and 3B (seq 4096): --auto vs hand
    python3 benchmarks/gpu_bench.py --grid two-gpu-shapes --out $OUT # the same on 2 GPUs
    python3 benchmarks/gpu_bench.py --grid two-gpu-zero1 --out $OUT  # ZeRO-1 with/without fp32 accumulation, 2 GPUs
    python3 benchmarks/gpu_bench.py --grid masters --out $OUT        # 1.1B, 350M, 3B: --auto vs hand eager vs
                                                                     # the expert's compiled row, at craken's mb
    python3 benchmarks/gpu_bench.py --grid seven-b --out $OUT        # Mistral-7B, global batch 32: --auto's
                                                                     # mb 1 x 32 against AC 8 x 4 and 2 x 16

Every run is a real launch (`craken train ...` or `accelerate launch benchmarks/handwritten_train.py`)
on a Llama-shaped model built from a config (random weights, nothing downloaded). The configs name
no dtype, so every row trains fp32 master weights (rows before 2026-12-02 wrote `torch_dtype:
bfloat16` and trained bf16 weights on the plain engine); each row records the master, optimizer-state
and module dtypes it measured. tokens/s are
the mean of the logged intervals after the first (warm-up, compilation); memory is the peak of
torch's allocator per GPU. A compact table is printed last; the full log and a JSON of the rows
go to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEAK = 989e12  # dense bf16 peak of H100/H200 SXM

SHAPES = {
    # name: (hidden, layers, heads, kv_heads, mlp, vocab)
    "llama-1.1b": (2048, 22, 32, 4, 5632, 32000),
    "llama-350m": (1024, 24, 16, 4, 2816, 32000),
    "llama-3b": (2560, 32, 32, 8, 6912, 32000),
}


def write_config(folder: Path, shape: str, dtype: str | None = None) -> Path:
    """config.json of a shape; `dtype` only for a row that means to train a 16-bit-typed config."""
    hidden, layers, heads, kv, mlp, vocab = SHAPES[shape]
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
           "intermediate_size": mlp, "vocab_size": vocab, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu", "rope_theta": 10000.0,
           "bos_token_id": 1, "eos_token_id": 2}
    if dtype:
        cfg["dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return folder


def craken_run(name, model, out, seq, steps, *flags, gpus=1, port=29500):
    run_dir = out / "runs" / name
    argv = [sys.executable, "-m", "craken_cli", "train", "--model", str(model), "--tokenizer", "builtin:tiny",
            "--seq-len", str(seq), "--max-steps", str(steps), "--steps-per-print", "5", "--eval-every", "0",
            "--set", "data.eval_fraction=0", "--set", "train.save_final=false", "--num-processes", str(gpus),
            "--main-process-port", str(port), "--output-dir", str(run_dir), "--force", *flags]
    return {"name": name, "kind": "craken", "argv": argv, "run_dir": run_dir, "gpus": gpus}


def hand_run(name, model, out, seq, steps, strategy, micro, gpus=1, port=29500, extra=()):
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus),
            "--main_process_port", str(port)]
    if strategy == "plain":
        argv += ["--mixed_precision", "bf16"] + (["--multi_gpu"] if gpus > 1 else [])
    else:
        stage, _, offload = strategy.partition("+")
        argv += ["--use_deepspeed", "--zero_stage", stage.removeprefix("zero"), "--mixed_precision", "bf16",
                 "--gradient_accumulation_steps", "1", "--gradient_clipping", "1.0",
                 "--offload_optimizer_device", "cpu" if offload else "none", "--offload_param_device", "none",
                 "--zero3_init_flag", "false"]
    out_json = out / f"{name}.json"
    argv += [str(ROOT / "benchmarks" / "handwritten_train.py"), "--model", str(model), "--seq-len", str(seq),
             "--micro-batch", str(micro), "--steps", str(steps), "--out", str(out_json), *extra]
    return {"name": name, "kind": "hand", "argv": argv, "result": out_json, "gpus": gpus}


def summarize_craken(run) -> dict:
    lines = [json.loads(x) for x in (run["run_dir"] / "metrics.jsonl").read_text().splitlines() if x.strip()]
    start = next(r for r in lines if r.get("event") == "start")
    train = [r for r in lines if "loss" in r]
    end = next((r for r in lines if r.get("event") == "end"), {})
    timed = train[1:] or train
    tps = sum(r["tokens_per_s_per_gpu"] for r in timed) / len(timed)
    fpt = start["flops_per_token"]
    precision = next((r for r in lines if r.get("event") == "precision"), start)  # DeepSpeed's states: after step 1
    return {"strategy": start["strategy"], "micro_batch": start["micro_batch"], "grad_accum": start["grad_accum"],
            "master_dtype": start.get("master_dtype"), "module_dtype": start.get("module_dtype"),
            "optimizer_state_dtype": precision.get("optimizer_state_dtype"),
            "grad_norms": [r["grad_norm"] for r in train[:4]],
            "tokens_per_s_per_gpu": tps, "tflops": tps * fpt / 1e12, "mfu": tps * fpt / PEAK,
            "peak_alloc_gib": max(r["gpu_mem_gib"] or 0 for r in train),
            "peak_reserved_gib": max(r["gpu_mem_reserved_gib"] or 0 for r in train),
            "first_step_s": end.get("first_step_s"), "startup": end.get("startup"), "loss_first": train[0]["loss"], "loss_last": train[-1]["loss"],
            "steps": end.get("steps")}


def two_machines(out: Path, log) -> dict:
    """Two "machines" of one GPU each on this host (CUDA_VISIBLE_DEVICES), NCCL, one model."""
    procs = []
    t0 = time.time()
    for rank in (0, 1):
        argv = [sys.executable, "-m", "craken_cli", "train", "--num-machines", "2", "--num-processes", "2",
                "--machine-rank", str(rank), "--main-process-ip", "127.0.0.1", "--main-process-port", "29650",
                "--max-steps", "30", "--steps-per-print", "5", "--output-dir", str(out / "runs" / f"machine{rank}"),
                "--force"]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(rank), "PYTHONUNBUFFERED": "1"}
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for rank, text in enumerate(outputs):
        log.write(f"\n===== two-machines rank {rank}\n{text}")
        print(f"--- machine {rank} (rc {procs[rank].returncode}):")
        print("\n".join(line for line in text.splitlines() if line.startswith(("step ", "eval ", "craken"))))
    return {"name": "two-machines", "rc": max(p.returncode for p in procs), "wall_s": round(time.time() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", default="one-gpu")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default="", help="comma-separated run names")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/craken-bench")
    m11 = write_config(work / "llama-1.1b", "llama-1.1b")
    runs = []
    zero_gb16 = ("--offload-optimizer", "none", "--global-batch", "16")  # ZeRO without offload
    log = open(out / "bench.log", "w")
    if args.grid == "one-gpu":
        runs += [
            {"name": "doctor", "kind": "cmd", "argv": [sys.executable, "-m", "craken_cli", "doctor"]},
            {"name": "default", "kind": "cmd", "argv": [sys.executable, "-m", "craken_cli", "train", "--name",
                                                         "bench-default", "--force"]},
            hand_run("hand-plain-mb4", m11, out, 2048, 16, "plain", 4),
            craken_run("craken-zero1-mb4", m11, out, 2048, 30, "--zero", "1", "--micro-batch", "4",
                       "--grad-accum", "1", "--set", "offload.optimizer.device=none"),
            craken_run("craken-zero1-compile-mb8", m11, out, 2048, 30, "--zero", "1", "--micro-batch", "8",
                       "--grad-accum", "1", "--compile"),
            craken_run("craken-auto", m11, out, 2048, 200, "--auto", "--compile", "--global-batch", "8"),
            hand_run("hand-zero2-mb4", m11, out, 2048, 16, "zero2", 4),
        ]
    elif args.grid == "final-one-gpu":
        # After the KV-cache fix and the compiled loss: --auto with room to pick its micro-batch, against
        # the hand-written plain run of the same shape, for the 1.1B and the 350M shapes.
        m350 = write_config(work / "llama-350m", "llama-350m")
        runs += [
            hand_run("hand-plain-mb4", m11, out, 2048, 16, "plain", 4),
            craken_run("craken-auto-gb16", m11, out, 2048, 40, "--auto", "--compile", "--global-batch", "16"),
            hand_run("hand-plain-mb4-350m", m350, out, 2048, 16, "plain", 4),
            craken_run("craken-auto-gb32-350m", m350, out, 2048, 40, "--auto", "--compile", "--global-batch", "32"),
        ]
    elif args.grid == "zero-ratio":
        # craken's ZeRO-1/2 against its own no-ZeRO mode on one GPU, same planner settings (issue 8),
        # with the hand-written plain row as the machine's reference. --auto keeps the given stage and
        # picks the micro-batch and compilation.
        runs += [
            hand_run("hand-plain-mb4", m11, out, 2048, 16, "plain", 4),
            craken_run("craken-auto-gb16", m11, out, 2048, 40, "--auto", "--global-batch", "16"),
            craken_run("craken-zero1-auto-gb16", m11, out, 2048, 40, "--auto", "--zero", "1", *zero_gb16),
            craken_run("craken-zero2-auto-gb16", m11, out, 2048, 40, "--auto", "--zero", "2", *zero_gb16),
            # ZeRO-1 through DeepSpeed's ZeRO optimizer (16-bit gradients), the default before 2026-12-01
            craken_run("craken-zero1-16bit-grads-auto-gb16", m11, out, 2048, 40, "--auto", "--zero", "1",
                       *zero_gb16, "--set", "zero.fp32_grad_accum=false"),
        ]
    elif args.grid == "zero-ratio-repeat":
        # The zero-ratio rows again with 100 steps each, no ZeRO measured first and last (to see the
        # machine's drift across the call), and ZeRO-2 with DeepSpeed's bf16 overflow check kept on
        # (train.on_nonfinite=skip), which measures that lever in craken train itself.
        runs += [
            craken_run("craken-auto-gb16", m11, out, 2048, 100, "--auto", "--global-batch", "16"),
            craken_run("craken-zero2-auto-gb16", m11, out, 2048, 100, "--auto", "--zero", "2", *zero_gb16),
            craken_run("craken-zero1-auto-gb16", m11, out, 2048, 100, "--auto", "--zero", "1", *zero_gb16),
            craken_run("craken-zero2-overflow-check-auto-gb16", m11, out, 2048, 100, "--auto", "--zero", "2",
                       *zero_gb16, "--set", "train.on_nonfinite=skip"),
            craken_run("craken-auto-gb16-again", m11, out, 2048, 100, "--auto", "--global-batch", "16"),
        ]
    elif args.grid == "one-gpu-rest":
        # The rest of the 1.1B one-GPU grid of issue 8, each craken strategy beside the same strategy
        # written by hand: ZeRO-3, ZeRO-2 with optimizer CPU offload (the seed's medium preset),
        # ZeRO-1; then ZeRO-3 with parameter offload as well (a planner memory row, issue 5).
        runs += [
            craken_run("craken-zero3-auto-gb16", m11, out, 2048, 30, "--auto", "--zero", "3",
                       "--offload-optimizer", "none", "--offload-param", "none", "--global-batch", "16"),
            hand_run("hand-zero3-mb4", m11, out, 2048, 12, "zero3", 4),
            craken_run("craken-zero2-offload-auto-gb16", m11, out, 2048, 20, "--auto", "--zero", "2",
                       "--offload-optimizer", "cpu", "--global-batch", "16"),
            hand_run("hand-zero2-offload-mb4", m11, out, 2048, 8, "zero2+offload", 4),
            hand_run("hand-zero1-mb4", m11, out, 2048, 12, "zero1", 4),
            craken_run("craken-zero3-offload-all-auto-gb16", m11, out, 2048, 12, "--auto", "--zero", "3",
                       "--offload-optimizer", "cpu", "--offload-param", "cpu", "--global-batch", "16"),
        ]
    elif args.grid == "shapes":
        # --auto against the two fastest hand-written entries that fit, for the 350M and the 3B shape.
        m350 = write_config(work / "llama-350m", "llama-350m")
        m3b = write_config(work / "llama-3b", "llama-3b")
        runs += [
            hand_run("hand-plain-mb4-350m", m350, out, 2048, 16, "plain", 4),
            hand_run("hand-zero2-mb4-350m", m350, out, 2048, 16, "zero2", 4),
            craken_run("craken-auto-gb32-350m", m350, out, 2048, 40, "--auto", "--global-batch", "32"),
            hand_run("hand-plain-mb1-3b-s4096", m3b, out, 4096, 8, "plain", 1),
            hand_run("hand-plain-mb2-3b-s4096", m3b, out, 4096, 8, "plain", 2),
            hand_run("hand-zero2-mb1-3b-s4096", m3b, out, 4096, 8, "zero2", 1),
            craken_run("craken-auto-gb8-3b-s4096", m3b, out, 4096, 24, "--auto", "--global-batch", "8"),
        ]
    elif args.grid == "two-gpu-shapes":
        # issue 8 on 2 GPUs: --auto against the fastest hand-written entries for the 350M and 3B shapes.
        m350 = write_config(work / "llama-350m", "llama-350m")
        m3b = write_config(work / "llama-3b", "llama-3b")
        runs += [
            hand_run("hand-ddp-mb4-350m-2gpu", m350, out, 2048, 16, "plain", 4, gpus=2),
            craken_run("craken-auto-gb64-350m-2gpu", m350, out, 2048, 40, "--auto", "--global-batch", "64", gpus=2,
                       port=29621),
            hand_run("hand-ddp-mb2-3b-s4096-2gpu", m3b, out, 4096, 8, "plain", 2, gpus=2),
            craken_run("craken-auto-gb16-3b-s4096-2gpu", m3b, out, 4096, 24, "--auto", "--global-batch", "16",
                       gpus=2, port=29622),
        ]
    elif args.grid == "two-gpu-zero1":
        # Whether fp32 gradient accumulation (DeepSpeed's BF16 optimizer, off by default with several
        # processes) is also faster on 2 GPUs: craken's ZeRO-1 with and without it, and its no-ZeRO mode.
        runs += [
            craken_run("craken-auto-gb32-2gpu", m11, out, 2048, 40, "--auto", "--global-batch", "32", gpus=2,
                       port=29623),
            craken_run("craken-zero1-auto-gb32-2gpu", m11, out, 2048, 40, "--auto", "--zero", "1",
                       "--offload-optimizer", "none", "--global-batch", "32", gpus=2, port=29624),
            craken_run("craken-zero1-fp32-accum-auto-gb32-2gpu", m11, out, 2048, 40, "--auto", "--zero", "1",
                       "--offload-optimizer", "none", "--global-batch", "32", "--set", "zero.fp32_grad_accum=true",
                       gpus=2, port=29625),
            craken_run("craken-zero2-auto-gb32-2gpu", m11, out, 2048, 40, "--auto", "--zero", "2",
                       "--offload-optimizer", "none", "--global-batch", "32", gpus=2, port=29626),
        ]
    elif args.grid == "two-gpu":
        runs += [
            {"name": "two-machines", "kind": "pair"},
            hand_run("hand-plain-mb4", m11, out, 2048, 16, "plain", 4),
            craken_run("craken-auto", m11, out, 2048, 60, "--auto", "--compile", "--global-batch", "8"),
            hand_run("hand-ddp-mb4-2gpu", m11, out, 2048, 16, "plain", 4, gpus=2),
            craken_run("craken-auto-2gpu", m11, out, 2048, 60, "--auto", "--compile", "--global-batch", "16",
                       gpus=2, port=29611),
            craken_run("craken-zero2-compile-mb8-2gpu", m11, out, 2048, 30, "--zero", "2", "--micro-batch", "8",
                       "--grad-accum", "1", "--compile", "--set", "offload.optimizer.device=none", gpus=2,
                       port=29612),
        ]
    elif args.grid == "seven-b":
        # What --auto's micro-batch costs at 7B on one GPU (docs/planner.md, "The gradient grid"): with the
        # gradients held through each backward of an accumulation window, a global batch of 32 fits only
        # micro-batch 1 x 32 without checkpointing; against it, checkpointed micro-batch 8 x 4 and the
        # 2 x 16 that ran at 131 GiB (outside the planner's 10% margin, so launched without --auto).
        m7b = ROOT / "benchmarks" / "model_configs" / "mistral-7b.json"
        folder = work / "mistral-7b"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(m7b.read_text())
        runs += [
            craken_run("craken-auto-gb32-7b", folder, out, 1024, 11, "--auto", "--global-batch", "32"),
            craken_run("craken-auto-ac-mb8-gb32-7b", folder, out, 1024, 11, "--auto", "--global-batch", "32",
                       "--micro-batch", "8", "--activation-checkpointing"),
            craken_run("craken-zero0-compile-mb2x16-7b", folder, out, 1024, 11, "--zero", "0", "--compile",
                       "--micro-batch", "2", "--grad-accum", "16"),
        ]
    elif args.grid != "masters":
        ap.error(f"unknown --grid {args.grid}")
    if args.only:
        keep = set(args.only.split(","))
        runs = [r for r in runs if r["name"] in keep]
    rows = []
    for run in runs:
        rows.append(two_machines(out, log) if run["kind"] == "pair" else execute(run, log))
        # Written after every run: a call cut off at its time limit still returns the rows it finished.
        (out / "rows.json").write_text(json.dumps(rows, indent=1, default=str))
    if args.grid == "masters":
        rows = masters_grid(out, log, work)
    (out / "rows.json").write_text(json.dumps(rows, indent=1, default=str))
    print_table(rows)
    if args.grid == "masters":
        print_masters(rows)
    return 0


def execute(run: dict, log, timeout: int = 420) -> dict:
    """One launch, logged in full; its row (a failed run is a row too)."""
    t0 = time.time()
    log.write(f"\n===== {run['name']}: {' '.join(map(str, run['argv']))}\n")
    log.flush()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(run["argv"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              timeout=timeout)
        rc, output = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as exc:  # its output may come back as bytes even with text=True
        partial = exc.stdout or ""
        rc, output = 124, partial.decode(errors="replace") if isinstance(partial, bytes) else partial
    wall = time.time() - t0
    log.write(output)
    log.flush()
    row = {"name": run["name"], "rc": rc, "wall_s": round(wall, 1),
           "out_of_memory": "out of memory" in output.lower() or "outofmemoryerror" in output.lower()}
    try:
        if run["kind"] == "craken":
            row.update(summarize_craken(run))
        elif run["kind"] == "hand":
            row.update(json.loads(run["result"].read_text()))
        else:
            row["output_tail"] = output[-3000:]
    except Exception as exc:
        row["error"] = f"{exc.__class__.__name__}: {exc}"
    print(f"[{run['name']}] rc={rc} wall={wall:.0f}s", flush=True)
    if "tokens_per_s_per_gpu" in row:
        print(f"  {row['tokens_per_s_per_gpu']:,.0f} tok/s/GPU  MFU {row['mfu']:.3f}  mb {row.get('micro_batch')}  "
              f"reserved {row['peak_reserved_gib']:.2f} GiB  first step {row.get('first_step_s') or 0:.1f} s  "
              f"masters {row.get('master_dtype')}", flush=True)
    if row.get("startup"):  # where launch-to-first-step went (seconds from process start)
        print("  start-up: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in row["startup"].items()),
              flush=True)
    if run["kind"] == "cmd":
        print(output[-2500:], flush=True)
    return row


def print_table(rows: list[dict]) -> None:
    print("\nname | rc | strategy | mb | tok/s/GPU | TFLOP/s | MFU | alloc GiB | reserved GiB | first step s | wall s"
          " | masters")
    for r in rows:
        if "tokens_per_s_per_gpu" in r:
            print(f"{r['name']} | {r['rc']} | {r.get('strategy', '-')} | {r.get('micro_batch')} | "
                  f"{r['tokens_per_s_per_gpu']:,.0f} | {r['tflops']:.1f} | {r['mfu']:.3f} | "
                  f"{r['peak_alloc_gib']:.2f} | {r['peak_reserved_gib']:.2f} | {r.get('first_step_s') or 0:.1f} | "
                  f"{r['wall_s']} | {r.get('master_dtype')}")
        else:
            print(f"{r['name']} | {r['rc']} | {r.get('error', '')}")


# The masters grid (issue 15): shape, sequence, global batch, craken steps (logged every 5; tokens/s is
# the mean of the intervals after the first, i.e. steps 6..N; the hand rows warm up 5 steps and time
# the same N - 5). Sized to fit about 8 minutes of one H200.
MASTERS_SHAPES = (("llama-1.1b", 2048, 16, 20), ("llama-350m", 2048, 32, 20), ("llama-3b", 4096, 8, 15))


def masters_grid(out: Path, log, work: Path) -> list[dict]:
    """Per shape: `craken train --auto`, then the hand-written eager script and the expert's compiled
    one at the micro-batch and accumulation craken chose, all fp32 master weights."""
    rows = []
    for shape, seq, global_batch, steps in MASTERS_SHAPES:
        model = write_config(work / shape, shape)
        tag = shape.removeprefix("llama-")
        auto = execute(craken_run(f"craken-auto-{tag}", model, out, seq, steps, "--auto", "--global-batch",
                                  str(global_batch)), log, timeout=240)
        rows.append(auto)
        if auto.get("micro_batch"):
            micro, accum = auto["micro_batch"], auto["grad_accum"]
            for name, expert in ((f"hand-eager-{tag}", ()), (f"expert-compiled-{tag}", ("--expert",))):
                row = _hand_at(name, model, out, seq, steps - 5, micro, accum, expert, log)
                rows.append(row)
        (out / "rows.json").write_text(json.dumps(rows, indent=1, default=str))
        print_masters(rows)  # after every shape: a call cut off at its limit still shows what it measured
    return rows


def _hand_at(name, model, out, seq, steps, micro, accum, extra, log) -> dict:
    """A hand-written row at craken's micro-batch; an eager one that runs out of memory there is
    retried once at half the micro-batch and twice the accumulation (the same global batch)."""
    flags = ("--warmup", "5", "--build-on-gpu", *extra)
    row = execute(hand_run(name, model, out, seq, steps, "plain", micro, extra=(*flags, "--grad-accum", str(accum))),
                  log, timeout=200)
    if row["rc"] != 0 and row["out_of_memory"] and micro > 1 and not extra:
        retry = hand_run(f"{name}-mb{micro // 2}", model, out, seq, steps, "plain", micro // 2,
                         extra=(*flags, "--grad-accum", str(accum * 2)))
        row = execute(retry, log, timeout=200)
    return row


def print_masters(rows: list[dict]) -> None:
    print("\nmasters grid | mb x ga | tokens/s | vs expert | reserved GiB | master / states / module dtype | "
          "first grad norms (steps 5, 10, 15, 20)")
    expert = {}
    for r in rows:
        if r["name"].startswith("expert-compiled-") and "tokens_per_s_per_gpu" in r:
            expert[r["name"].removeprefix("expert-compiled-")] = r["tokens_per_s_per_gpu"]
    for r in rows:
        tag = r["name"].split("-")[-1] if not r["name"].split("-")[-1].startswith("mb") else r["name"].split("-")[-2]
        if "tokens_per_s_per_gpu" not in r:
            print(f"{r['name']} | - | rc {r['rc']}{' (out of memory)' if r.get('out_of_memory') else ''} | | | | "
                  f"{r.get('error', '')}")
            continue
        ratio = f"{r['tokens_per_s_per_gpu'] / expert[tag]:.2f}x" if tag in expert else "-"
        norms = ", ".join(f"{n:.4g}" for n in r.get("grad_norms") or [] if n is not None)
        print(f"{r['name']} | {r.get('micro_batch')} x {r.get('grad_accum', 1)} | {r['tokens_per_s_per_gpu']:,.0f} | "
              f"{ratio} | {r['peak_reserved_gib']:.2f} | {r.get('master_dtype')} / "
              f"{r.get('optimizer_state_dtype')} / {r.get('module_dtype')} | {norms}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
