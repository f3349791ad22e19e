"""Training-step levers, measured side by side in one process on one GPU (issue 8).

    python3 benchmarks/levers_lab.py --out "$OUT" [--shape llama-1.1b] [--only name,name]

Each variant builds the Llama shape of shared/gpu-baseline.md from its config on the GPU (random
weights, nothing downloaded), and trains it the way hand-written Accelerate does without DeepSpeed:
fp32 weights under bf16 autocast, torch's fused AdamW, gradient clipping 1.0, random tokens. What
changes between variants is one lever at a time: regional vs whole-model compilation, the SDPA
backend (cuDNN first), a compiled fused loss head, the micro-batch. Every variant starts from a
fresh model and a reset dynamo cache; 3 warm-up steps (compilation), then --steps timed steps
between two `torch.cuda.synchronize()`. Importing torch once for all variants keeps the call short;
the absolute numbers match a launched run (checked against `craken train` in the same call).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

SHAPES = {  # hidden, layers, heads, kv_heads, mlp, vocab
    "llama-1.1b": (2048, 22, 32, 4, 5632, 32000),
    "llama-350m": (1024, 24, 16, 4, 2816, 32000),
    "llama-3b": (2560, 32, 32, 8, 6912, 32000),
}
PEAK = 989e12

# name: (compile, attention, loss, micro_batch)
VARIANTS = {
    "eager-mb4": ("none", "default", "hf", 4),
    "layers-mb8": ("layers", "default", "hf", 8),
    "layers-cudnn-mb8": ("layers", "cudnn", "hf", 8),
    "layers-head-mb8": ("layers", "default", "head", 8),
    "layers-head-mb12": ("layers", "default", "head", 12),
    "layers-head-mb16": ("layers", "default", "head", 16),
    "full-mb8": ("full", "default", "hf", 8),
    # craken's own regional compilation (modeling.compile_regions: layers + the model's loss function)
    "craken-mb8": ("craken", "default", "hf", 8),
    "craken-mb16": ("craken", "default", "hf", 16),
}


def build(shape: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, layers, heads, kv, mlp, vocab = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=mlp, vocab_size=vocab, max_position_embeddings=4096,
                      tie_word_embeddings=False, use_cache=False)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return model, cfg


def fused_head_loss():
    """lm_head matmul + fp32 log-softmax + NLL as one compiled region (no fp32 logits kept)."""
    import torch
    import torch.nn.functional as F

    @torch.compile(dynamic=False)
    def head_loss(hidden, weight, labels):
        logits = F.linear(hidden, weight).float()
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))

    return head_loss


def run_variant(name: str, shape: str, steps: int, seq: int, profile_to: Path | None = None) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    compile_mode, attention, loss_mode, mb = VARIANTS[name]
    torch._dynamo.reset()  # the previous variant's graphs hold its parameters
    gc.collect()
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    model, cfg = build(shape)
    if compile_mode == "layers":
        for layer in model.model.layers:
            layer.compile()
    elif compile_mode == "full":
        model.compile()
    elif compile_mode == "craken":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from craken_cli.train.modeling import compile_regions

        compile_regions(model)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, fused=True)
    head = fused_head_loss() if loss_mode == "head" else None
    attn_ctx = (sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                             SDPBackend.EFFICIENT_ATTENTION], set_priority=True)
                if attention == "cudnn" else contextlib.nullcontext())
    gen = torch.Generator(device="cuda").manual_seed(0)

    def step():
        ids = torch.randint(0, cfg.vocab_size, (mb, seq), generator=gen, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if head is None:
                loss = model(input_ids=ids, labels=ids).loss
            else:
                hidden = model.model(input_ids=ids).last_hidden_state
                loss = head(hidden, model.lm_head.weight, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    with attn_ctx:
        t0 = time.time()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        warm_s = time.time() - t0
        torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        for _ in range(steps):
            loss = step()
        torch.cuda.synchronize()
        dt = time.time() - t0
        if profile_to is not None:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(2):
                    step()
                torch.cuda.synchronize()
            profile_to.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    n = sum(p.numel() for p in model.parameters())
    hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
    fpt = 6 * (n - cfg.vocab_size * hidden) + 12 * layers * hidden * seq
    tps = steps * mb * seq / dt
    row = {"name": name, "shape": shape, "seq": seq, "micro_batch": mb, "compile": compile_mode,
           "attention": attention, "loss": loss_mode, "tokens_per_s": tps, "mfu": tps * fpt / PEAK,
           "step_ms": dt / steps * 1e3, "warmup_s": warm_s, "loss_last": float(loss),
           "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", default="llama-1.1b")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--only", default="")
    ap.add_argument("--profile", default="", help="comma-separated variants to profile (2 steps, CUDA kernels)")
    args = ap.parse_args()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(VARIANTS)
    rows = []
    for name in names:
        try:
            prof = args.out / f"profile-{name}.txt" if name in args.profile.split(",") else None
            row = run_variant(name, args.shape, args.steps, args.seq_len, prof)
        except Exception as exc:  # an OOM or a compile failure is a row too
            row = {"name": name, "error": f"{exc.__class__.__name__}: {str(exc)[:300]}"}
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.out / "levers.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | {args.shape} seq {args.seq_len}")
    print("variant | mb | tok/s | MFU | step ms | peak reserved GiB | warm-up s")
    for r in rows:
        if "error" in r:
            print(f"{r['name']} | error {r['error'][:120]}")
        else:
            print(f"{r['name']} | {r['micro_batch']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.3f} | {r['step_ms']:.1f} | "
                  f"{r['peak_reserved_gib']:.2f} | {r['warmup_s']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
