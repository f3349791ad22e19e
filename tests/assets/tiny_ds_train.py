"""A tiny DeepSpeed training through accelerate, launched by tests/test_render_launch.py with the
files `craken config render` wrote:

    DS_ACCELERATOR=cpu accelerate launch --config_file OUT/accelerate.yaml tests/assets/tiny_ds_train.py --steps 3

A small Llama built from a config (hidden 32, 2 layers, vocab 64) trains on random tokens with the
optimizer and scheduler of the DeepSpeed JSON (DummyOptim / DummyScheduler stand in for them), so
everything DeepSpeed does comes from the rendered files. Prints one line `TINY_DS_TRAIN ...` from
rank 0 and fails on a non-finite loss.
"""

from __future__ import annotations

import argparse
import math

import torch
from accelerate import Accelerator
from accelerate.utils import DummyOptim, DummyScheduler, InitProcessGroupKwargs
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from craken_cli.train.loop import exit_without_teardown


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps")
    ap.add_argument("--seq-len", type=int, default=16)
    args = ap.parse_args()

    # CPU processes: accelerate finds no backend by itself and would run each process alone.
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64, max_position_embeddings=args.seq_len)
    model = LlamaForCausalLM(config)  # under zero.Init when the YAML says zero3_init_flag
    tokens = torch.randint(0, config.vocab_size, (args.steps * accum * micro * accelerator.num_processes, args.seq_len))
    loader = DataLoader(TensorDataset(tokens), batch_size=micro)
    optimizer = DummyOptim(model.parameters())
    scheduler = DummyScheduler(optimizer)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    losses = []
    for (ids,) in loader:
        with accelerator.accumulate(model):
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        losses.append(loss.detach().float().item())
        if not math.isfinite(losses[-1]):
            raise SystemExit(f"non-finite loss {losses[-1]} at micro-step {len(losses)}")

    if accelerator.is_main_process:
        print(f"TINY_DS_TRAIN processes={accelerator.num_processes} stage={model.zero_optimization_stage()} "
              f"steps={model.global_steps} micro_steps={len(losses)} first_loss={losses[0]:.4f} "
              f"final_loss={losses[-1]:.4f}", flush=True)
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_without_teardown(0)  # as craken's worker: teardown can abort a finished run (see there)
