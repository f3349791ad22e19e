"""The hand-written baseline: what a user writes with plain Accelerate (+ DeepSpeed from the launch
flags), as measured in shared/gpu-baseline.md. Launched by gpu_bench.py through `accelerate launch`.

Model from a config (random weights, fp32: the config names no dtype, so the optimizer steps fp32
master weights under bf16 autocast), SDPA, bf16, torch AdamW (fused where DeepSpeed does not own the
optimizer; DeepSpeedCPUAdam with optimizer offload), clipping 1.0, random tokens; --warmup steps, then
--steps timed steps.

--expert is the row to beat (issue 15): the same plain Accelerate script as an expert writes it:
model built on the GPU, KV cache off, every decoder layer `torch.compile`d, fused AdamW.
"""
from __future__ import annotations

import time

PROCESS_START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--build-on-gpu", action="store_true", help="initialise the random weights on the GPU")
    ap.add_argument("--expert", action="store_true",
                    help="--build-on-gpu, KV cache off, every decoder layer compiled, fused AdamW")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    acc = Accelerator(gradient_accumulation_steps=args.grad_accum)
    startup = {"imports_s": round(time.time() - PROCESS_START, 2)}  # same phases as craken's metrics
    cfg = AutoConfig.from_pretrained(args.model)
    with torch.device(acc.device) if args.build_on_gpu or args.expert else torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    if args.expert:
        model.config.use_cache = False  # else each compiled layer guards on its cache slot and recompiles
        for layer in model.model.layers:
            layer.compile()
    startup["model_s"] = round(time.time() - PROCESS_START, 2)
    deepspeed = acc.state.deepspeed_plugin is not None
    if deepspeed:
        acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.micro_batch
    zero = acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}) if deepspeed else {}
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        # DeepSpeed refuses torch's AdamW with optimizer offload; its message names DeepSpeedCPUAdam,
        # which is what a user then writes.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(model.parameters(), lr=1e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=not deepspeed)
    model, opt = acc.prepare(model, opt)
    startup["prepare_s"] = round(time.time() - PROCESS_START, 2)
    vocab = cfg.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    grad_norms = {}  # at steps 5, 10, 15, ...: where craken's metrics log them (steps_per_print 5)

    def step(number: int):
        for _ in range(args.grad_accum):
            with acc.accumulate(model):
                ids = torch.randint(0, vocab, (args.micro_batch, args.seq_len), generator=gen).to(acc.device)
                loss = model(input_ids=ids, labels=ids).loss
                acc.backward(loss)
                if acc.sync_gradients:
                    norm = acc.clip_grad_norm_(model.parameters(), 1.0)
                    if number % 5 == 0 and norm is not None:
                        grad_norms[number] = float(norm)
                opt.step()
                opt.zero_grad()
        return loss

    step(1)
    torch.cuda.synchronize()
    first_step_s = time.time() - PROCESS_START
    for number in range(2, args.warmup + 1):
        step(number)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for number in range(args.warmup + 1, args.warmup + args.steps + 1):
        loss = step(number)
    torch.cuda.synchronize()
    dt = time.time() - t0
    tps = args.steps * args.grad_accum * args.micro_batch * args.seq_len / dt
    # under ZeRO-3 each parameter's data is a 0-element placeholder outside forward/backward: ds_numel
    n = sum(getattr(p, "ds_numel", p.numel()) for p in acc.unwrap_model(model).parameters())
    n_emb = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    # Same FLOPs count as craken: 6 x non-embedding parameters (the LM head is a matmul, counted) + attention.
    fpt = 6 * (n - cfg.vocab_size * cfg.hidden_size) + 12 * cfg.num_hidden_layers * cfg.hidden_size * args.seq_len
    if acc.is_main_process:
        with open(args.out, "w") as fh:
            json.dump({"strategy": "hand-" + ("deepspeed" if deepspeed else "plain") + ("-expert" if args.expert else ""),
                       "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, **master_dtypes(opt, model),
                       "grad_norms": [grad_norms[k] for k in sorted(grad_norms)],
                       "tokens_per_s_per_gpu": tps, "tflops": tps * fpt / 1e12, "mfu": tps * fpt / 989e12,
                       "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
                       "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                       "first_step_s": first_step_s, "startup": startup, "loss_last": float(loss), "params": n, "n_emb": n_emb}, fh)


def master_dtypes(opt, model) -> dict:
    """What trained, read from the live objects: the tensors the innermost torch optimizer steps (under
    DeepSpeed its fp32 partitions), its Adam moments, the weights the forward reads."""
    inner = opt
    while getattr(inner, "optimizer", None) is not None:
        inner = inner.optimizer
    masters = [p for g in inner.param_groups for p in g["params"] if p.numel()]
    states = [v for st in inner.state.values() for k, v in st.items() if torch.is_tensor(v) and k != "step"
              and v.numel() > 1]

    def names(tensors):
        return "+".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors})) or None

    return {"master_dtype": names(masters), "optimizer_state_dtype": names(states),
            "module_dtype": names(p for p in model.parameters() if p.requires_grad)}


if __name__ == "__main__":
    main()
