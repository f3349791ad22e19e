"""The hand-written float8 baseline: what a user writes from torchao's README with plain Accelerate,
beside benchmarks/handwritten_train.py (the bf16 one). Launched by fp8_bench.py through
`accelerate launch --mixed_precision bf16`.

Model from a config (random fp32 weights, built on the GPU), SDPA, every Linear but lm_head swapped by
`torchao.float8.convert_to_float8_training` (tensorwise), bf16 autocast through Accelerate, fused
AdamW on the fp32 weights, clipping 1.0, random tokens; no compilation unless --compile (each decoder
layer, as the expert's row of ../shared/gpu-baseline.md: the whole model's compile ran past a call's
10 minutes). 3 warm-up steps, then --steps timed steps. --micro-batch takes a
list (16,8): on an out-of-memory error the next one is tried in the same process.
"""

from __future__ import annotations

import time

PROCESS_START = time.time()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402


def build(args, acc):
    from torchao.float8 import convert_to_float8_training

    cfg = AutoConfig.from_pretrained(args.model)
    with torch.device(acc.device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: fqn != "lm_head")
    if args.compile:
        for layer in model.model.layers:
            layer.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model, opt = acc.prepare(model, opt)
    return cfg, model, opt


def measure(args, acc, micro_batch: int) -> dict:
    cfg, model, opt = build(args, acc)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def step():
        ids = torch.randint(0, cfg.vocab_size, (micro_batch, args.seq_len), generator=gen).to(acc.device)
        loss = model(input_ids=ids, labels=ids).loss
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return loss

    step()
    torch.cuda.synchronize()
    first_step_s = time.time() - PROCESS_START
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    tps = args.steps * micro_batch * args.seq_len / (time.time() - t0)
    n = sum(p.numel() for p in acc.unwrap_model(model).parameters())
    fpt = 6 * (n - cfg.vocab_size * cfg.hidden_size) + 12 * cfg.num_hidden_layers * cfg.hidden_size * args.seq_len
    return {"strategy": "hand-float8" + ("-compiled" if args.compile else ""), "micro_batch": micro_batch,
            "tokens_per_s_per_gpu": tps, "tflops": tps * fpt / 1e12, "mfu": tps * fpt / 989e12,
            "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "first_step_s": first_step_s,
            "loss_last": float(loss), "params": n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", default="8", help="micro-batches to try, largest first: 16,8")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    acc = Accelerator()
    result, skipped = None, []
    for micro_batch in (int(x) for x in args.micro_batch.split(",")):
        try:
            result = measure(args, acc, micro_batch)
            break
        except torch.OutOfMemoryError:
            skipped.append(micro_batch)
        # after the except block, whose exception holds the failed attempt's frames (and tensors)
        acc.free_memory()
        gc.collect()
        torch.cuda.empty_cache()
    result = {**(result or {"error": "out of memory at every micro-batch"}), "out_of_memory_at": skipped}
    if acc.is_main_process:
        with open(args.out, "w") as fh:
            json.dump(result, fh)


if __name__ == "__main__":
    main()
