"""Where ZeRO-1/2 lose time against craken's no-ZeRO mode on one GPU (issue 8), one variant per process.

    python3 benchmarks/zero_lab.py --out "$OUT" [--shape llama-1.1b] [--micro-batch 8] [--only a,b] [--profile a,b]

Each variant trains the Llama shape of shared/gpu-baseline.md (random weights built on the GPU,
random tokens, regional compilation by craken's own `compile_regions`) in a fresh process, so no
variant inherits another's memory. "plain" is craken's no-ZeRO engine (fp32 weights under bf16
autocast, torch's fused AdamW, clipping); the ZeRO variants start from the DeepSpeed JSON that
`craken config render` writes for this machine and change one key at a time. 3 warm-up steps
(compilation), then --steps timed steps between two `torch.cuda.synchronize()`. Profiled variants
also run 3 steps under torch.profiler: the forward / backward / optimizer-step split of the step's
wall time and of its GPU kernel time, and the host syncs each step makes (saved to profile-NAME.txt).
`--device cpu --shape tiny` checks the script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))
from gpu_bench import SHAPES, write_config  # noqa: E402

SHAPES = {**SHAPES, "tiny": (64, 2, 4, 2, 128, 512)}
PEAK = 989e12

# name: (ZeRO stage or 0 for plain, {dotted DeepSpeed key: value} changed from craken's rendered JSON)
VARIANTS = {
    "plain": (0, {}),
    "zero1": (1, {}),
    "zero1-no-overlap": (1, {"zero_optimization.overlap_comm": False}),
    "zero1-no-overlap-no-contiguous": (1, {"zero_optimization.overlap_comm": False,
                                           "zero_optimization.contiguous_gradients": False}),
    "zero1-no-clip": (1, {"gradient_clipping": 0.0}),
    # fp32 gradient accumulation: DeepSpeed then runs ZeRO-1 through its BF16_Optimizer instead
    "zero1-fp32-accum": (1, {"data_types.grad_accum_dtype": "fp32"}),
    # ... adding each 16-bit gradient into the fp32 ones in a hook as it is produced, then freeing it
    "zero1-fp32-accum-immediate": (1, {"data_types.grad_accum_dtype": "fp32", "bf16.immediate_grad_update": True}),
    "zero2": (2, {}),
    "zero2-no-overlap": (2, {"zero_optimization.overlap_comm": False}),
    "zero2-fp32-accum": (2, {"data_types.grad_accum_dtype": "fp32"}),
    "zero2-no-overlap-fp32-accum": (2, {"zero_optimization.overlap_comm": False, "data_types.grad_accum_dtype": "fp32"}),
    "zero2-no-overlap-one-bucket": (2, {"zero_optimization.overlap_comm": False,
                                        "zero_optimization.reduce_bucket_size": 2_000_000_000}),
    "zero2-no-reduce-scatter": (2, {"zero_optimization.reduce_scatter": False}),
    # bf16.check_grad_overflow (DeepSpeed's default: on): amax/amin of every gradient and a host sync per step
    "zero2-no-overflow-check": (2, {"bf16.check_grad_overflow": False}),
    "zero2-no-overflow-check-no-overlap": (2, {"bf16.check_grad_overflow": False,
                                               "zero_optimization.overlap_comm": False}),
}
SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync")


def render_ds_config(stage: int, model: Path, args, out: Path) -> dict:
    """craken's own DeepSpeed JSON for this machine, written by `craken config render`."""
    folder = out / f"render-zero{stage}"
    argv = [sys.executable, "-m", "craken_cli", "config", "render", "--zero", str(stage), "--model", str(model),
            "--tokenizer", "builtin:tiny", "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
            "--grad-accum", "1", "--num-processes", "1", "--set", "offload.optimizer.device=none", "--out", str(folder), "--force"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads((folder / "ds_config.json").read_text())


def with_changes(cfg: dict, changes: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        node = cfg
        *path, last = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return cfg


def child(args) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from craken_cli.train.modeling import compile_regions

    stage, _ = VARIANTS[args.child]
    cuda = args.device == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    cfg = AutoConfig.from_pretrained(args.model)
    cfg.use_cache = False
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa",
                                                 dtype=torch.bfloat16 if stage else torch.float32)
    if cuda:
        compile_regions(model)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}]
    mb, seq = args.micro_batch, args.seq_len
    gen = torch.Generator(device=device).manual_seed(0)

    def batch():
        return torch.randint(0, cfg.vocab_size, (mb, seq), generator=gen, device=device)

    if stage == 0:
        opt = torch.optim.AdamW(groups, lr=1e-4, fused=cuda)

        def forward():
            ids = batch()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return model(input_ids=ids, labels=ids).loss

        def backward(loss):
            loss.backward()

        def optimizer_step():
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        import deepspeed

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29700 + stage), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        ds_cfg = with_changes(json.loads(Path(args.ds_config).read_text()), VARIANTS[args.child][1])
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_cfg)

        def forward():
            ids = batch()
            return engine(input_ids=ids, labels=ids).loss

        def backward(loss):
            engine.backward(loss)

        def optimizer_step():
            engine.step()

    def step(marked=False):
        from torch.profiler import record_function

        def region(name):
            return record_function(name) if marked else contextlib.nullcontext()

        with region("forward"):
            loss = forward()
        with region("backward"):
            backward(loss)
        with region("optimizer_step"):
            optimizer_step()
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = time.time()
    for _ in range(3):
        step()
    sync()
    warm_s = time.time() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for _ in range(args.steps):
        loss = step()
    sync()
    dt = time.time() - t0
    n = sum(p.numel() for p in model.parameters())
    fpt = 6 * (n - cfg.vocab_size * cfg.hidden_size) + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq
    tps = args.steps * mb * seq / dt
    row = {"name": args.child, "stage": stage, "changes": VARIANTS[args.child][1], "micro_batch": mb, "seq": seq,
           "tokens_per_s": tps, "mfu": tps * fpt / PEAK, "step_ms": dt / args.steps * 1e3, "warmup_s": warm_s,
           "loss_last": float(loss),
           "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None}
    if args.profile:
        row["profile"] = profile_steps(step, sync, cuda, Path(args.profile))
    return row


def profile_steps(step, sync, cuda: bool, to: Path, steps: int = 3) -> dict:
    """Per step: wall ms, and for each region its CPU wall and the GPU kernel time it launched."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.time()
        for _ in range(steps):
            step(marked=True)
        sync()
        wall = time.time() - t0
    averages = prof.key_averages()
    by_key = {e.key: e for e in averages}
    regions = ("forward", "backward", "optimizer_step")
    # A region appears twice, as a CPU and as a GPU annotation of the same name; neither is a kernel.
    summary = {"wall_ms": wall / steps * 1e3,
               "gpu_kernel_ms": sum(e.self_device_time_total for e in averages if e.key not in regions) / steps / 1e3}
    for region in regions:
        entries = [e for e in averages if e.key == region]
        if entries:
            summary[f"{region}_cpu_ms"] = max(e.cpu_time_total for e in entries) / steps / 1e3
            summary[f"{region}_gpu_ms"] = max(e.device_time_total for e in entries) / steps / 1e3
    for call in SYNC_CALLS:
        e = by_key.get(call)
        if e is not None:
            summary[call] = {"per_step": e.count / steps, "cpu_ms_per_step": e.cpu_time_total / steps / 1e3}
    sort_gpu = "self_device_time_total" if cuda else "self_cpu_time_total"
    to.write_text(json.dumps(summary, indent=1) + "\n\nby GPU time\n"
                  + averages.table(sort_by=sort_gpu, row_limit=30)
                  + "\n\nby CPU time\n" + averages.table(sort_by="self_cpu_time_total", row_limit=30))
    return summary


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--shape", default="llama-1.1b")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--only", default="")
    ap.add_argument("--profile", default="", help="comma-separated variants to profile")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ds-config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        Path(args.row).write_text(json.dumps(child(args)))
        return 0

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.shape != "tiny":
        model = write_config(Path("/tmp/craken-zero-lab") / args.shape, args.shape)
    else:  # gpu_bench.write_config knows the benchmark shapes only
        hidden, layers, heads, kv, mlp, vocab = SHAPES["tiny"]
        model = Path("/tmp/craken-zero-lab/tiny")
        model.mkdir(parents=True, exist_ok=True)
        (model / "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
            "intermediate_size": mlp, "vocab_size": vocab, "max_position_embeddings": 4096,
            "tie_word_embeddings": False}))
    names = args.only.split(",") if args.only else list(VARIANTS)
    configs = {}
    rows = []
    log = open(out / "zero_lab.log", "w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    for name in names:
        stage = VARIANTS[name][0]
        if stage and stage not in configs:
            configs[stage] = out / f"ds_zero{stage}.json"
            configs[stage].write_text(json.dumps(render_ds_config(stage, model, args, out)))
        row_file = out / f"row-{name}.json"
        argv = [sys.executable, __file__, "--child", name, "--model", str(model), "--row", str(row_file),
                "--shape", args.shape, "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
                "--steps", str(args.steps), "--device", args.device]
        if stage:
            argv += ["--ds-config", str(configs[stage])]
        if name in args.profile.split(","):
            argv += ["--profile", str(out / f"profile-{name}.txt")]
        t0 = time.time()
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=300)
        log.write(f"\n===== {name}\n{proc.stdout}")
        log.flush()
        if proc.returncode == 0 and row_file.is_file():
            row = json.loads(row_file.read_text())
        else:
            row = {"name": name, "error": f"rc {proc.returncode}: {proc.stdout[-400:]}"}
        row["wall_s"] = round(time.time() - t0, 1)
        rows.append(row)
        (out / "zero_lab.json").write_text(json.dumps(rows, indent=1))
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
        if "profile" in row:
            print("  profile: " + json.dumps(row["profile"]), flush=True)
    base = next((r["tokens_per_s"] for r in rows if r["name"] == "plain" and "tokens_per_s" in r), None)
    print(f"\n{args.shape} seq {args.seq_len} mb {args.micro_batch}, {args.device}")
    print("variant | tok/s | vs plain | MFU | step ms | reserved GiB | warm-up s | fwd/bwd/step CPU ms | GPU kernel ms")
    for r in rows:
        if "error" in r:
            print(f"{r['name']} | error {r['error'][-200:]}")
            continue
        p = r.get("profile", {})
        split = "/".join(f"{p.get(k + '_cpu_ms', 0):.0f}" for k in ("forward", "backward", "optimizer_step"))
        ratio = f"{r['tokens_per_s'] / base:.3f}" if base else "-"
        print(f"{r['name']} | {r['tokens_per_s']:,.0f} | {ratio} | {r['mfu']:.3f} | {r['step_ms']:.1f} | "
              f"{r['peak_reserved_gib'] or 0:.2f} | {r['warmup_s']:.1f} | {split if p else '-'} | "
              f"{p.get('gpu_kernel_ms', 0):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
