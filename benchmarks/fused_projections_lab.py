"""Would fusing q/k/v and gate/up into one GEMM each speed up fp8 training? (issue 19's last lever)

    python3 benchmarks/fused_projections_lab.py --out $OUT [--shape llama-3b] [--layers 4] [--tunings coordinate,max-autotune]

A stack of Llama-style decoder layers at a benchmarks/ shape (RMSNorm, q/k/v, rotary, SDPA with GQA,
o, gate/up, SiLU, down), fp32 weights under bf16 autocast, each layer compiled on its own as craken's
regional compilation does (inductor's coordinate-descent tuning on, as craken's fp8 default). Variants:

    separate   q, k, v, gate, up as five Linears (the HF layout craken trains today)
    fused      one Linear for q|k|v and one for gate|up (new parameters: a different checkpoint layout)
    cat        five Linears kept as parameters; each forward concatenates their weights and runs one
               matmul through torchao's float8 matmul (the checkpoint layout stays HF's)

each in bf16 and fp8 (torchao tensorwise). One forward+backward of the stack at --micro-batch x --seq is
timed after warm-up; ms per layer and the ratio to `separate` in the same precision are printed last,
and every row goes to OUT/fused_projections.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpu_bench  # noqa: E402  (the shapes: one place)


class RMSNorm(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * self.weight


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + turned * sin


class CatLinear(nn.Module):
    """Several Linears' weights, concatenated at each forward into one float8 (or bf16) matmul."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x):
        weight = torch.cat([p.weight for p in self.parts])
        first = self.parts[0]
        if type(first).__name__ == "Float8Linear":
            from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

            return matmul_with_hp_or_float8_args.apply(x.to(torch.get_autocast_gpu_dtype()), weight.t(),
                                                       first.linear_mm_config, first.config)
        return F.linear(x, weight)


class Layer(nn.Module):
    def __init__(self, hidden, heads, kv, mlp):
        super().__init__()
        self.heads, self.kv, self.head_dim = heads, kv, hidden // heads
        self.norm1, self.norm2 = RMSNorm(hidden), RMSNorm(hidden)
        self.q = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k = nn.Linear(hidden, kv * self.head_dim, bias=False)
        self.v = nn.Linear(hidden, kv * self.head_dim, bias=False)
        self.o = nn.Linear(heads * self.head_dim, hidden, bias=False)
        self.gate = nn.Linear(hidden, mlp, bias=False)
        self.up = nn.Linear(hidden, mlp, bias=False)
        self.down = nn.Linear(mlp, hidden, bias=False)
        self.mode = "separate"

    def fuse(self, mode: str):
        self.mode = mode
        if mode == "fused":
            device = self.q.weight.device
            self.qkv = nn.Linear(self.q.in_features, self.q.out_features + 2 * self.k.out_features, bias=False,
                                 device=device)
            self.gate_up = nn.Linear(self.gate.in_features, 2 * self.gate.out_features, bias=False, device=device)
            del self.q, self.k, self.v, self.gate, self.up
        elif mode == "cat":
            self.qkv = CatLinear([self.q, self.k, self.v])
            self.gate_up = CatLinear([self.gate, self.up])
            del self.q, self.k, self.v, self.gate, self.up

    def projections(self, y):
        if self.mode == "separate":
            return self.q(y), self.k(y), self.v(y)
        width = self.heads * self.head_dim
        return self.qkv(y).split([width, self.kv * self.head_dim, self.kv * self.head_dim], dim=-1)

    def mlp(self, y):
        if self.mode == "separate":
            return self.down(F.silu(self.gate(y)) * self.up(y))
        gate, up = self.gate_up(y).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)

    def forward(self, x, cos, sin):
        batch, seq, _ = x.shape
        q, k, v = self.projections(self.norm1(x))
        q = rotate(q.view(batch, seq, self.heads, self.head_dim).transpose(1, 2), cos, sin)
        k = rotate(k.view(batch, seq, self.kv, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(batch, seq, self.kv, self.head_dim).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(attn.transpose(1, 2).reshape(batch, seq, -1))
        return x + self.mlp(self.norm2(x))


# Inductor options per --tunings name: craken's fp8 default (coordinate-descent tuning of each generated
# kernel's block sizes), and that plus GEMM autotuning (max-autotune without CUDA graphs: inductor times its
# Triton matmul templates, the float8 _scaled_mm among them, against cuBLAS and keeps the fastest).
TUNINGS = {"coordinate": {"coordinate_descent_tuning": True},
           "max-autotune": {"coordinate_descent_tuning": True, "max_autotune": True}}


def build(shape: str, layers: int, mode: str, fp8: bool, tuning: str = "coordinate"):
    hidden, _, heads, kv, mlp, _ = gpu_bench.SHAPES[shape]
    with torch.device("cuda"):
        stack = nn.ModuleList(Layer(hidden, heads, kv, mlp) for _ in range(layers))
    for layer in stack:
        if fp8 and mode == "cat":  # the parts convert first, then the concatenating module wraps them
            from torchao.float8 import convert_to_float8_training

            convert_to_float8_training(layer)
        layer.fuse(mode)
        if fp8 and mode != "cat":
            from torchao.float8 import convert_to_float8_training

            convert_to_float8_training(layer)
        layer.compile(options=dict(TUNINGS[tuning]))
    return stack, hidden, hidden // heads


def measure(args, mode: str, fp8: bool, tuning: str = "coordinate") -> dict:
    stack, hidden, head_dim = build(args.shape, args.layers, mode, fp8, tuning)
    positions = torch.arange(args.seq, device="cuda", dtype=torch.float32)
    freqs = positions[:, None] / (10000.0 ** (torch.arange(0, head_dim, 2, device="cuda") / head_dim))[None]
    angles = torch.cat((freqs, freqs), dim=-1)
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    x = torch.randn(args.micro_batch, args.seq, hidden, device="cuda", requires_grad=True)
    grad = torch.randn_like(x)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = x
            for layer in stack:
                h = layer(h, cos, sin)
        h.float().backward(grad)

    started = time.time()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    compile_s = time.time() - started
    t0 = time.time()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    ms = (time.time() - t0) * 1000 / args.steps / args.layers
    row = {"shape": args.shape, "mode": mode, "tuning": tuning, "precision": "fp8" if fp8 else "bf16", "master": "float32",
           "micro_batch": args.micro_batch, "seq": args.seq, "ms_per_layer": ms, "warmup_s": compile_s,
           "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30}
    del stack, x, grad
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--modes", default="fused,cat,separate")
    ap.add_argument("--precisions", default="fp8,bf16")
    ap.add_argument("--tunings", default="coordinate", help=f"comma-separated, of {sorted(TUNINGS)}")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for precision in args.precisions.split(","):
        for mode, tuning in [(m, t) for m in args.modes.split(",") for t in args.tunings.split(",")]:
            row = measure(args, mode, precision == "fp8", tuning)
            rows.append(row)
            with open(out / "fused_projections.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.shape} mb {args.micro_batch} x "
          f"{args.seq}, {args.layers} layers, fp32 master weights, bf16 autocast")
    print("precision | mode | tuning | ms/layer | vs separate, first tuning | warm-up s | peak GiB")
    for row in rows:
        base = next(r for r in rows if r["precision"] == row["precision"] and r["mode"] == "separate")
        print(f"{row['precision']} | {row['mode']} | {row['tuning']} | {row['ms_per_layer']:.2f} | "
              f"{base['ms_per_layer'] / row['ms_per_layer']:.3f}x | {row['warmup_s']:.0f} | {row['peak_alloc_gib']:.1f}")


if __name__ == "__main__":
    main()
