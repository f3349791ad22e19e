"""What a model's forward saves for its backward, tensor by tensor: the census (planner_bench.py --census)
says how many bytes one decoder layer holds; this says which tensors they are.

    python3 benchmarks/saved_tensors.py gpt2-medium --seq 1024 --micro-batch 4

A 1-layer and a 2-layer copy of the model (benchmarks/model_configs, random weights) run one forward as a
no-ZeRO craken run does (fp32 weights under bf16 autocast, the model's own loss through
modeling.ready_for_training); every tensor autograd saves is counted once per storage. The second layer's
tensors, grouped by dtype and shape per token, print last, beside the planner's per-layer figure.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import planner_bench  # noqa: E402  (model configs, spec_for, census hardware: one place for each)


def saved(name: str, layers: int, seq: int, micro: int) -> collections.Counter:
    """Bytes autograd saves in one forward, by (dtype, shape), each storage once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from craken_cli.train import modeling

    cfg = AutoConfig.for_model(**{k: v for k, v in planner_bench.model_config(name).items() if k != "architectures"})
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, key):
            setattr(cfg, key, layers)
    cfg.use_cache = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    folder = planner_bench.write_config(Path("/tmp/craken-census") / name, name)
    spec = planner_bench.spec_for(folder, seq, "zero0", micro, False, 1, ("model.loss=model",),
                                  hw=planner_bench.census_hardware())
    model, _ = modeling.ready_for_training(model, spec)
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (micro, seq), device=device)
    storages, sizes = set(), collections.Counter()

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in storages and tensor.device.type == device:
            storages.add(storage.data_ptr())
            sizes[(str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast(device, dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
    return sizes


def main() -> int:
    from craken_cli.plan.modelinfo import model_info
    from craken_cli.plan.memory import layer_activation_bytes_per_token, residual_bytes

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=sorted(planner_bench.CENSUS))
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=4)
    args = ap.parse_args()
    tokens = args.seq * args.micro_batch
    one, two = (saved(args.model, n, args.seq, args.micro_batch) for n in (1, 2))
    layer = two - one  # the second layer's tensors (a shape both copies save in equal amounts cancels)
    for (dtype, shape), nbytes in sorted(layer.items(), key=lambda kv: -kv[1]):
        print(f"{nbytes / tokens:12,.0f} B/token  {dtype:9} {shape}")
    info = model_info(str(planner_bench.write_config(Path("/tmp/craken-census") / args.model, args.model)))
    print(f"{sum(layer.values()) / tokens:12,.0f} B/token  one layer (weights' 16-bit casts included);"
          f" planner {layer_activation_bytes_per_token(info, 2, False, residual_bytes(0, 2)):,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
