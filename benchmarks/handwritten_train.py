"""The hand-written baseline: what a user writes with plain Accelerate (+ DeepSpeed from the launch
flags), as measured in shared/gpu-baseline.md. Launched by gpu_bench.py through `accelerate launch`.

Model from a config (random weights), SDPA, bf16, torch AdamW (fused where DeepSpeed does not own
the optimizer; DeepSpeedCPUAdam with optimizer offload), clipping 1.0, random tokens; 3 warm-up
steps, then --steps timed steps.
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
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    acc = Accelerator()
    startup = {"imports_s": round(time.time() - PROCESS_START, 2)}  # same phases as craken's metrics
    cfg = AutoConfig.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
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

    def step():
        ids = torch.randint(0, vocab, (args.micro_batch, args.seq_len), generator=gen).to(acc.device)
        loss = model(input_ids=ids, labels=ids).loss
        acc.backward(loss)
        if acc.sync_gradients:
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
    dt = time.time() - t0
    tps = args.steps * args.micro_batch * args.seq_len / dt
    # under ZeRO-3 each parameter's data is a 0-element placeholder outside forward/backward: ds_numel
    n = sum(getattr(p, "ds_numel", p.numel()) for p in acc.unwrap_model(model).parameters())
    n_emb = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    # Same FLOPs count as craken: 6 x non-embedding parameters (the LM head is a matmul, counted) + attention.
    fpt = 6 * (n - cfg.vocab_size * cfg.hidden_size) + 12 * cfg.num_hidden_layers * cfg.hidden_size * args.seq_len
    if acc.is_main_process:
        with open(args.out, "w") as fh:
            json.dump({"strategy": "hand-" + ("deepspeed" if deepspeed else "plain"), "micro_batch": args.micro_batch,
                       "tokens_per_s_per_gpu": tps, "tflops": tps * fpt / 1e12, "mfu": tps * fpt / 989e12,
                       "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
                       "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                       "first_step_s": first_step_s, "startup": startup, "loss_last": float(loss), "params": n, "n_emb": n_emb}, fh)


if __name__ == "__main__":
    main()
