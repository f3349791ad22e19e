"""Where one training step's GPU time goes, by kernel kind, for one model as craken trains it (issue 19).

    python3 benchmarks/step_profile.py qwen2.5-0.5b --seq 2048 --micro-batch 32 --out $OUT [--fp8] [--set model.loss=chunked]

The model (benchmarks/model_configs or planner_bench.SHAPES, random weights built on the GPU) goes through
modeling.ready_for_training with the spec `craken train` resolves for these flags, so it is converted,
compiled and given its loss as a run's is; the step is the plain engine's (fp32 masters under bf16
autocast, torch's fused AdamW, clipping 1.0). After --warmup steps (compilation), --steps timed steps
between two synchronizes, then 2 steps under torch.profiler. Kernel time is grouped by kind (GEMM by input
dtype, attention, inductor's fused kernels, the optimizer, embedding and its backward, the rest); "idle" is
the step's wall time the GPU ran no kernel. One JSON row per invocation is appended to OUT/profile.jsonl and
the table printed; the profiler's own top-40 kernels go to OUT/kernels-NAME.txt.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import planner_bench  # noqa: E402  (model configs and spec_for: one place for each)

FLOAT8_GEMM = re.compile(r"e4m3|e5m2|fp8|nvjet_sm\d+_[qr][qr]")  # cuBLASLt's nvjet names: q/r = e4m3/e5m2 inputs
KINDS = (  # (kind, substrings of the kernel name), first match wins after FLOAT8_GEMM
    ("attention", ("flash", "fmha", "attention", "cudnn")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk", "sm90_", "sm80_")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("embedding", ("embedding", "index", "scatter", "sort", "radix", "gather")),
    ("inductor fused", ("triton",)),
    ("copy / cast", ("copy", "memcpy", "memset", "cast", "fill")),
)


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    if FLOAT8_GEMM.search(name):
        return "gemm fp8"
    return next((kind for kind, keys in KINDS if any(key in name for key in keys)), "other")


def build(name: str, seq: int, micro: int, fp8: bool, sets: list[str], device: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from craken_cli.train import modeling

    folder = planner_bench.write_config(Path("/tmp/craken-step-profile") / name, name)
    spec = planner_bench.spec_for(folder, seq, "zero0", micro, True, 1, tuple(sets),
                                  hw=planner_bench.census_hardware())
    if fp8:
        spec = spec.model_copy(update={"precision": "fp8"})
    cfg = AutoConfig.for_model(**{k: v for k, v in planner_bench.model_config(name).items() if k != "architectures"})
    cfg.use_cache = False
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    model, record = modeling.ready_for_training(model, spec)
    return model, cfg, record


def profile_row(args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    for setting in args.inductor:
        key, _, value = setting.partition("=")
        setattr(torch._inductor.config, key, json.loads(value))
    model, cfg, record = build(args.model, args.seq, args.micro_batch, args.fp8, args.set, args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    gen = torch.Generator(device=args.device).manual_seed(0)

    def step():
        ids = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq), generator=gen, device=args.device)
        with torch.autocast(args.device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    sync()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    step_s = (time.perf_counter() - start) / args.steps
    with profile(activities=[ProfilerActivity.CUDA if args.device == "cuda" else ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
        sync()
    by_kind, top = collections.Counter(), []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if (event.device_type == torch.autograd.DeviceType.CUDA or args.device == "cpu") and device_us:
            by_kind[kind_of(event.key)] += device_us / 2 / 1e3  # ms per step
            top.append((device_us / 2 / 1e3, event.count // 2, event.key))
    label = args.label or f"{args.model} mb{args.micro_batch} {'fp8' if args.fp8 else 'bf16'} {' '.join(args.set)}"
    (args.out / f"kernels-{label.replace(' ', '_').replace('/', '_')}.txt").write_text(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    busy = sum(by_kind.values())
    return {"label": label, "model": args.model, "seq": args.seq, "micro_batch": args.micro_batch,
            "fp8": args.fp8, "sets": args.set, **record, "step_ms": step_s * 1e3,
            "tokens_per_s": args.micro_batch * args.seq / step_s, "loss": float(loss.detach()),
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if args.device == "cuda" else 0.0,
            "kinds_ms": dict(by_kind.most_common()), "inductor": args.inductor,
            "top_kernels": sorted(top, reverse=True)[:25], "idle_ms": max(step_s * 1e3 - busy, 0.0)}


def table(rows: list[dict]) -> str:
    kinds = ["gemm fp8"] + [kind for kind, _ in KINDS] + ["other", "idle"]
    lines = ["run | tok/s | step ms | " + " | ".join(kinds) + " (ms per step, share)"]
    for row in rows:
        ms = {**row["kinds_ms"], "idle": row["idle_ms"]}
        cells = [f"{ms.get(k, 0):.0f} ({ms.get(k, 0) / row['step_ms']:.0%})" for k in kinds]
        lines.append(f"{row['label']} | {row['tokens_per_s']:,.0f} | {row['step_ms']:.0f} | " + " | ".join(cells))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="a --set of craken train (repeatable)")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--label", default="")
    ap.add_argument("--inductor", action="append", default=[], help="torch._inductor.config KEY=JSON (repeatable)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (with --set model.compile=false)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--table-only", action="store_true", help="print the table of OUT/profile.jsonl")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows_file = args.out / "profile.jsonl"
    if not args.table_only:
        row = profile_row(args)
        with rows_file.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    print(table([json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
