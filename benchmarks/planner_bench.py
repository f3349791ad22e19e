"""The planner against real peak reserved GPU memory, for 1 and 2 GPUs, in one call (issue 5).

    python3 benchmarks/planner_bench.py --out "$OUT" [--gpus 1,2] [--docs docs/planner.md]
    python3 benchmarks/planner_bench.py --dry-run          # predictions only, no GPU

For each GPU count it starts one `torchrun` worker group that goes through the whole grid in-process
(torch and DeepSpeed are imported once, and each row runs in a child forked from
that process, so no engine leaves memory behind for the next row to count): three Llama shapes (config
files written here, random weights, nothing downloaded) x sequence 1024 and 2048 x every strategy
predicted to fit the card, at micro-batch 4, grad-accum 1, bf16, SDPA; plus compiled runs of the
1.1B shape at micro-batch 8. Each row builds the spec exactly as `craken train --zero N ...` does
(`options.load_run`), asks `planner.plan` for that spec's prediction (`requested.reserved_gib`), and
builds the engine the way craken's training loop does:

* no ZeRO: fp32 weights under bf16 autocast, torch's fused AdamW, DDP on several GPUs (accelerate's
  defaults), regional compilation with `modeling.compile_regions` when compiled;
* ZeRO 1-3: `deepspeed.initialize` with the DeepSpeed JSON craken renders for that spec (`render.
  deepspeed_config`), the model built under `deepspeed.zero.Init` at stage 3.

Then 2 warm-up and 5 timed steps on random tokens; the peak is `torch.cuda.max_memory_reserved()`
from the end of engine set-up (where the training loop resets it) over the steps. Rows stream to
`<out>/planner_bench.jsonl`; `--docs` rewrites the table between the `bench` markers.
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
sys.path.insert(0, str(ROOT / "src"))

SHAPES = {  # Llama-style: RMSNorm, SwiGLU, GQA; vocab 32000 as in gpu-baseline.md
    "llama-160m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4),
    "llama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4),
    "llama-2.7b": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8),
}
SEQ_LENS = (1024, 2048)
MICRO_BATCH = 4
STAGES = ("zero0", "zero1", "zero2", "zero3")
# (shape, seq, strategy, micro-batch, compiled, extra --set values): the compiled mode --auto runs.
EXTRA = [("llama-1.1b", 2048, "zero0", 8, True, ()), ("llama-1.1b", 2048, "zero1", 8, True, ()),
         ("llama-1.1b", 2048, "zero2", 8, True, ()), ("llama-1.1b", 2048, "zero2+offload_optimizer_cpu", 4, False, ()),
         # DeepSpeed knobs that may cost ZeRO-1 its speed on one GPU (issue 8): same memory expected
         ("llama-1.1b", 2048, "zero1", 8, True, ("zero.overlap_comm=false",)),
         ("llama-1.1b", 2048, "zero1", 8, True, ("zero.contiguous_gradients=false",))]
TIMED_STEPS = 5
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
if os.environ.get("PLANNER_BENCH_SMOKE"):  # a CPU run of the code path (gloo, DS_ACCELERATOR=cpu): no numbers
    SHAPES = {"llama-160m": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2)}
    SEQ_LENS, EXTRA = (64,), [("llama-160m", 64, "zero2+offload_optimizer_cpu", 4, False, ())]


def write_config(folder: Path, shape: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "hidden_act": "silu", "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, **shape}
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return folder


def grid() -> list[tuple]:
    rows = [(shape, seq, s, MICRO_BATCH, False, ()) for shape in SHAPES for seq in SEQ_LENS for s in STAGES]
    return rows + EXTRA


def spec_for(folder: Path, seq: int, strategy: str, micro: int, compiled: bool, world: int, extra=(), hw=None):
    """The spec `craken train --model F --seq-len S --zero N --micro-batch M --grad-accum 1 ...` resolves to,
    with the offloads the strategy name holds (`zero3+offload_param_cpu`) and none otherwise: the presets'
    own offloads (ZeRO-2 optimizer, ZeRO-3 both) never leak into a row named without them."""
    from craken_cli.options import SpecArgs, load_run

    stage = int(strategy.split("+")[0].removeprefix("zero"))
    offload = "cpu" if "offload_optimizer_cpu" in strategy else "none"
    param_offload = "cpu" if "offload_param_cpu" in strategy else "none"
    flags = {"--model": str(folder), "--seq-len": seq, "--zero": stage, "--micro-batch": micro,
             "--grad-accum": 1, "--num-processes": world, "--precision": "bf16"}
    sets = [f"offload.optimizer.device={offload}", f"offload.param.device={param_offload}",
            f"model.compile={str(compiled).lower()}", *extra]
    resolved, _ = load_run(SpecArgs(flags=flags, sets=sets), hardware=hw, environ={})
    return resolved.spec


def plan_for(spec, folder: Path, hw):
    """The planner at the row's micro-batch: `.requested` is the row's prediction, `.choice` what
    --auto would pick for this shape (the name to compare with the fastest measured row)."""
    from craken_cli.modelinfo import model_info
    from craken_cli.planner import plan

    return plan(model_info(str(folder)), spec, hw, search_micro_batch=False)


def predict(spec, folder: Path, hw):
    return plan_for(spec, folder, hw).requested


def choice_name(p) -> str | None:
    return None if p.choice is None else p.choice.name


# ---------------------------------------------------------------------------------------------- worker


def run_row(spec, folder: Path, rank: int, world: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from craken_cli.render import deepspeed_config
    from craken_cli.train import modeling

    cfg = AutoConfig.from_pretrained(folder)
    cfg.use_cache = False
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    ds_cfg = deepspeed_config(spec) if spec.uses_deepspeed else None
    if spec.zero.stage == 3:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=ds_cfg, dtype=torch.bfloat16):
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    else:
        with torch.device(device):  # DeepSpeed casts to bf16 before moving to the GPU: build it so
            model = AutoModelForCausalLM.from_config(
                cfg, attn_implementation="sdpa", dtype=torch.bfloat16 if ds_cfg else torch.float32)
    if spec.model.compile:
        modeling.compile_regions(model)
    groups = [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    if ds_cfg is None:
        opt = torch.optim.AdamW(groups, lr=1e-4, fused=on_gpu)
        engine = model
        if world > 1:
            engine = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if on_gpu else None)

        def step(ids):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = engine(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.optimizer.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        import deepspeed

        engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_cfg)

        def step(ids):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()

    gen = torch.Generator(device=device).manual_seed(rank)
    mb, seq = spec.batch.micro_batch, spec.data.seq_len
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    sync()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        step(torch.randint(0, cfg.vocab_size, (mb, seq), generator=gen, device=device))
    sync()
    t0 = time.time()
    for _ in range(TIMED_STEPS):
        step(torch.randint(0, cfg.vocab_size, (mb, seq), generator=gen, device=device))
    sync()
    tps = TIMED_STEPS * mb * seq / (time.time() - t0)
    mem = (torch.cuda.max_memory_reserved(device), torch.cuda.max_memory_allocated(device)) if on_gpu else (1, 1)
    out = {"measured_gib": mem[0] / 2**30, "allocated_gib": mem[1] / 2**30, "tokens_per_s": tps}
    if ds_cfg is not None:
        engine.destroy()
    return out


def child(conn, spec, folder: Path, rank: int, world: int, port: int) -> None:
    """One row in a fresh (forked) process: nothing a previous engine left behind can be counted."""
    import datetime

    import torch
    import torch.distributed as dist

    if os.environ.get("PLANNER_BENCH_DEBUG"):
        import faulthandler

        faulthandler.dump_traceback_later(int(os.environ["PLANNER_BENCH_DEBUG"]), exit=True)
    # torchrun's agent store would take this rendezvous over: each row gets its own store on its own port.
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    os.environ["MASTER_PORT"] = str(port)
    try:
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            torch.cuda.set_device(rank)
        dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=120),
                                device_id=torch.device("cuda", rank) if on_gpu else None)
        if spec.uses_deepspeed:  # DeepSpeed's comm wraps that group (zero.Init needs it before initialize)
            import deepspeed

            deepspeed.init_distributed("nccl" if on_gpu else "gloo")
        conn.send(run_row(spec, folder, rank, world))
    except torch.OutOfMemoryError as exc:
        conn.send({"oom": str(exc)[:200]})
    except Exception as exc:  # a failed row is a row too
        conn.send({"failed": f"{exc.__class__.__name__}: {exc}"[:400]})
    conn.close()
    os._exit(0)  # skip NCCL and DeepSpeed teardown: the process is done


def worker(args) -> int:
    """One per GPU (torchrun). Imports once, then forks a child per row, so rows start in seconds."""
    import multiprocessing as mp

    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # keep CUDA uninitialised here, so fork is safe
    import deepspeed  # (imported once, for the children)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from craken_cli.train import modeling

    del AutoModelForCausalLM, LlamaForCausalLM, modeling  # imported for the children: lazy modules load once

    from craken_cli.hardware import detect
    from craken_cli.launch import normalized_arch_list

    arch = normalized_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    if arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch  # DeepSpeed's op builder (CPU Adam) cannot parse "9.0a"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    ctx = mp.get_context("spawn" if torch.cuda.is_initialized() else "fork")
    print(f"rank {rank}: deepspeed {deepspeed.__version__}, transformers {transformers.__version__}, "
          f"start method {ctx.get_start_method()}", flush=True)
    hw = detect()
    card = min((g.memory_total for g in hw.gpus), default=2**40) / 2**30
    models = Path(args.models)
    log = open(Path(args.out) / "planner_bench.jsonl", "a") if rank == 0 else None
    for i, (shape, seq, strategy, micro, compiled, extra) in enumerate(grid()):
        folder = models / shape
        spec = spec_for(folder, seq, strategy, micro, compiled, world, extra, hw)
        planned = plan_for(spec, folder, hw)
        pred = planned.requested
        name = strategy + ("+compile" if compiled else "") + "".join(f" ({x})" for x in extra)
        row = {"gpus": world, "model": shape, "seq": seq, "strategy": name, "base_strategy": strategy,
               "compiled": compiled, "extra": list(extra), "micro_batch": micro,
               "predicted_gib": round(pred.reserved_gib, 3), "predicted_total_gib": round(pred.total_gib, 3),
               "planner_choice": choice_name(planned),
               "device": hw.gpus[0].name if hw.gpus else "cpu", "start": ctx.get_start_method(),
               "measured_on": time.strftime("%Y-%m-%d")}
        if pred.total_gib > card:
            row["skipped"] = f"predicted {pred.total_gib:.1f} GiB > {card:.1f} GiB card"
        else:
            t = time.time()
            parent_end, child_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=child, args=(child_end, spec, folder, rank, world, args.port + i))
            proc.start()
            child_end.close()
            result = parent_end.recv() if parent_end.poll(args.row_timeout) else {"failed": "timeout"}
            proc.join(5)
            if proc.is_alive():
                proc.kill()
            row.update(result)
            if "measured_gib" in row:
                row["error"] = round(row["predicted_gib"] / row["measured_gib"] - 1, 4)
            row["wall_s"] = round(time.time() - t, 1)
        if log:
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(json.dumps(row), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- docs


def write_docs(rows: list[dict], path: Path) -> None:
    devices = sorted({r["device"] for r in rows})
    dates = sorted({r.get("measured_on") or time.strftime("%Y-%m-%d") for r in rows})
    lines = [START, "", f"Measured on {' and '.join(devices)}, {', '.join(dates)}, with "
             "`benchmarks/planner_bench.py` (bf16, SDPA, grad-accum 1; peak = torch's max reserved memory on GPU 0; "
             "error = predicted / measured - 1). tokens/s from 5 steps, for ordering only.", "",
             "| GPUs | model | seq | strategy | micro-batch | predicted GiB | measured GiB | error | tokens/s/GPU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "measured_gib" in r:
            meas, err = f"{r['measured_gib']:.2f}", f"{r['error']:+.1%}"
            tps = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
        else:
            meas = "OOM" if "oom" in r else "failed" if "failed" in r else f"skipped ({r.get('skipped', 'predicted > card')})"
            err, tps = "", ""
        lines.append(f"| {r['gpus']} | {r['model']} | {r['seq']} | {r['strategy']} | {r['micro_batch']} | "
                     f"{r['predicted_gib']:.2f} | {meas} | {err} | {tps} |")
    lines += ["", "The planner's choice (what `--auto` picks at that micro-batch) against the fastest row that ran:", "",
              "| GPUs | model | seq | planner's choice | fastest measured | its tokens/s/GPU |", "| --- | --- | --- | --- | --- | --- |"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if not r["compiled"] and not r["extra"]:
            groups.setdefault((r["gpus"], r["model"], r["seq"]), []).append(r)
    for (gpus, model, seq), group in groups.items():
        timed = [r for r in group if "tokens_per_s" in r]
        best = max(timed, key=lambda r: r["tokens_per_s"]) if timed else None
        lines.append(f"| {gpus} | {model} | {seq} | {group[0].get('planner_choice') or '-'} | "
                     f"{best['strategy'] if best else 'tokens/s not recorded'} | "
                     f"{format(best['tokens_per_s'], ',.0f') if best else '-'} |")
    errs = [abs(r["error"]) for r in rows if "error" in r]
    if errs:
        lines += ["", f"{len(errs)} rows measured; largest error {max(errs):.1%}; "
                  f"{sum(e <= 0.10 for e in errs)} of {len(errs)} within +-10%."]
    lines += ["", END]
    text = path.read_text() if path.exists() else ""
    block = "\n".join(lines)
    if START in text and END in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--gpus", default=None, help="comma-separated GPU counts (default: 1 and 2 if present)")
    ap.add_argument("--docs", default=None, help="markdown file whose bench block to rewrite")
    ap.add_argument("--from-jsonl", default=None, help="rewrite --docs from recorded rows, re-predicted")
    ap.add_argument("--dry-run", action="store_true", help="print the predictions; train nothing")
    ap.add_argument("--timeout", type=int, default=280, help="seconds per GPU count")
    ap.add_argument("--row-timeout", type=int, default=150, help="seconds one row may take")
    ap.add_argument("--port", type=int, default=29800, help="first of the per-row rendezvous ports")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--models", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "craken-bench-models"))
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from craken_cli.hardware import GPU, GiB, Hardware, detect

    models = Path(args.models)
    for name, shape in SHAPES.items():
        write_config(models / name, shape)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_jsonl:
        rows = [json.loads(x) for x in Path(args.from_jsonl).read_text().splitlines() if x.strip()]
        hw = Hardware(gpus=tuple(GPU(i, r["device"], 80 * GiB, 80 * GiB, (9, 0)) for i, r in enumerate(rows[:2])))
        for r in rows:  # the current planner's prediction for each recorded measurement
            spec = spec_for(models / r["model"], r["seq"], r["strategy"], r["micro_batch"], r["compiled"],
                            r["gpus"], tuple(r["extra"]), hw)
            planned = plan_for(spec, models / r["model"], hw)
            r["predicted_gib"] = planned.requested.reserved_gib
            r["planner_choice"] = choice_name(planned)
            if "measured_gib" in r:
                r["error"] = r["predicted_gib"] / r["measured_gib"] - 1
        write_docs(rows, Path(args.docs or out / "planner_bench_table.md"))
        return 0
    if args.dry_run:
        hw = Hardware(gpus=tuple(GPU(i, "H100 80GB (assumed)", 80 * GiB, 80 * GiB, (9, 0)) for i in range(2)))
        for world in (1, 2):
            for shape, seq, strategy, micro, compiled, extra in grid():
                spec = spec_for(models / shape, seq, strategy, micro, compiled, world, extra, hw)
                p = predict(spec, models / shape, hw)
                print(f"{world} GPU {shape:10} seq {seq} {strategy + ('+compile' if compiled else ''):32} "
                      f"mb {micro}: {p.reserved_gib:6.2f} GiB reserved, {p.total_gib:6.2f} total")
        return 0
    hw = detect()
    counts = [int(x) for x in args.gpus.split(",")] if args.gpus else [n for n in (1, 2) if n <= hw.gpu_count]
    if not hw.gpus:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for world in counts:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(world)))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               __file__, "--worker", "--out", str(out), "--models", str(models), "--row-timeout",
               str(args.row_timeout), "--port", str(args.port)]
        with open(out / f"worker-{world}gpu.log", "w") as fh:
            try:
                subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"{world} GPU worker stopped after {args.timeout} s; its rows so far are kept", flush=True)
    rows = [json.loads(x) for x in (out / "planner_bench.jsonl").read_text().splitlines() if x.strip()]
    write_docs(rows, Path(args.docs) if args.docs else out / "planner_bench_table.md")
    print((Path(args.docs) if args.docs else out / "planner_bench_table.md").read_text()[-6000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
