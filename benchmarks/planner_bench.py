"""Measure the planner against real peak reserved GPU memory, in one call on a GPU machine.

    python3 benchmarks/planner_bench.py --out "$OUT" [--gpus 1,2] [--steps 4] [--quick] [--dry-run]

For each GPU count (1 and 2 where the machine has 2), three Llama shapes (configs and random weights
written by this script into local folders: nothing is downloaded) and two sequence lengths, it asks
`planner.plan` for every strategy, trains a few steps with `craken train` for each strategy predicted
to fit the card, reads the peak reserved memory from the run's metrics.jsonl
(`gpu_mem_reserved_gib`, docs/metrics-format.md), and writes:

* `<out>/planner_bench.jsonl`: one line per run (predicted, measured, error, tokens/s, exit code);
* the table between the `bench` markers of docs/planner.md (`--docs`), with the planner's choice
  for each shape set against the fastest measured strategy that ran.

Each run costs about 45-60 s of launch and engine set-up; `--quick` keeps the grid to what fits in one
9-minute call (1 GPU: zero0/zero2/zero3 on the smallest and middle shapes at one sequence length).
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
STRATEGIES = ("zero0", "zero1", "zero2", "zero3", "zero2+offload_optimizer_cpu")
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def make_model(folder: Path, shape: dict) -> None:
    """config.json + random bf16 weights + the built-in tokenizer, so `from_pretrained` works offline."""
    if (folder / "config.json").exists():
        return
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from craken_cli.train import builtin

    cfg = LlamaConfig(**shape, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    builtin.build_tokenizer().save_pretrained(folder)


def spec_for(world: int, seq: int, model: str):
    from craken_cli.spec import RunSpec

    return RunSpec.model_validate({"precision": "bf16", "model": {"name_or_path": model}, "data": {"seq_len": seq},
                                   "batch": {"micro_batch": MICRO_BATCH, "grad_accum": 1},
                                   "cluster": {"num_processes": world}})


def train_args(s, folder: Path, seq: int, world: int, run_dir: Path, steps: int) -> list[str]:
    args = [sys.executable, "-m", "craken_cli", "train", "--model", str(folder), "--seq-len", str(seq),
            "--micro-batch", str(MICRO_BATCH), "--grad-accum", "1", "--zero", str(s.stage),
            "--num-processes", str(world), "--max-steps", str(steps), "--steps-per-print", "1",
            "--eval-every", "0", "--output-dir", str(run_dir), "--force", "--precision", "bf16"]
    if s.offload_optimizer != "none":
        args += ["--offload-optimizer", s.offload_optimizer]
    return args


def measured_peak(run_dir: Path) -> tuple[float | None, float | None]:
    """(max gpu_mem_reserved_gib, last tokens_per_s_per_gpu) over the train lines of metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None, None
    peak, speed = None, None
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("gpu_mem_reserved_gib") is not None:
            peak = max(peak or 0.0, rec["gpu_mem_reserved_gib"])
            speed = rec.get("tokens_per_s_per_gpu", speed)
    return peak, speed


def write_docs(rows: list[dict], docs: Path, device: str) -> None:
    lines = [START, "", f"Measured on {device} ({time.strftime('%Y-%m-%d')}), micro-batch {MICRO_BATCH}, "
             "grad-accum 1, bf16, SDPA; peak = torch's max reserved memory per GPU.", "",
             "| GPUs | model | seq | strategy | predicted GiB | measured GiB | error | tokens/s/GPU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        meas = "failed" if r["measured_gib"] is None else f"{r['measured_gib']:.2f}"
        err = "" if r["error"] is None else f"{r['error']:+.1%}"
        tps = "" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
        lines.append(f"| {r['gpus']} | {r['model']} | {r['seq']} | {r['strategy']} | {r['predicted_gib']:.2f} | "
                     f"{meas} | {err} | {tps} |")
    lines += ["", "Choice against the grid (fastest measured = highest tokens/s among runs that finished):", "",
              "| GPUs | model | seq | planner's choice | fastest measured |", "| --- | --- | --- | --- | --- |"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["gpus"], r["model"], r["seq"]), []).append(r)
    for (g, m, s), rs in groups.items():
        ok = [r for r in rs if r["tokens_per_s"]]
        best = max(ok, key=lambda r: r["tokens_per_s"])["strategy"] if ok else "none finished"
        lines.append(f"| {g} | {m} | {s} | {rs[0]['choice']} | {best} |")
    lines += ["", END]
    text = docs.read_text() if docs.exists() else ""
    block = "\n".join(lines)
    if START in text and END in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    docs.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--gpus", default=None, help="comma-separated GPU counts (default: 1 and 2 if present)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="the subset that fits one 9-minute call")
    ap.add_argument("--docs", default=None, help="markdown file whose bench block to rewrite")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and commands; train nothing")
    args = ap.parse_args()

    from craken_cli.hardware import GPU, GiB, Hardware, detect
    from craken_cli.modelinfo import model_info
    from craken_cli.planner import plan

    hw = detect()
    device = hw.gpus[0].name if hw.gpus else "no GPU (dry run)"
    if not hw.gpus:
        hw = Hardware(gpus=tuple(GPU(i, "H100 80GB (assumed)", 80 * GiB, 80 * GiB, (9, 0)) for i in range(2)))
    counts = [int(x) for x in args.gpus.split(",")] if args.gpus else [n for n in (1, 2) if n <= hw.gpu_count]
    shapes = dict(list(SHAPES.items())[:2]) if args.quick else SHAPES
    seqs = SEQ_LENS[1:] if args.quick else SEQ_LENS
    strategies = ("zero0", "zero2", "zero3") if args.quick else STRATEGIES
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = Path(os.environ.get("TMPDIR", "/tmp")) / "craken-bench-models"
    log = (out / "planner_bench.jsonl").open("a")
    rows = []
    card = min(g.memory_total for g in hw.gpus)
    for world in counts:
        for name, shape in shapes.items():
            folder = models / name
            if not args.dry_run:
                make_model(folder, shape)
                info = model_info(str(folder))
            else:
                from craken_cli.modelinfo import analytic_info

                info = analytic_info({"model_type": "llama", "vocab_size": 32000, **shape}, name)
            for seq in seqs:
                p = plan(info, spec_for(world, seq, str(folder)), hw, search_micro_batch=False)
                by_name = {s.name: s for s in p.strategies}
                for sname in strategies:
                    s = by_name[sname]
                    if s.total_gib > card / GiB:  # predicted not to fit the card at all: don't burn the time
                        continue
                    run_dir = out / "runs" / f"{world}gpu-{name}-{seq}-{sname}"
                    cmd = train_args(s, folder, seq, world, run_dir, args.steps)
                    if args.dry_run:
                        print(f"{s.reserved_gib:6.2f} GiB  " + " ".join(cmd))
                        continue
                    t = time.time()
                    r = subprocess.run(cmd, capture_output=True, text=True)
                    peak, tps = measured_peak(run_dir)
                    err = None if peak is None else s.reserved_gib / peak - 1
                    row = dict(gpus=world, model=name, params=info.num_params, seq=seq, strategy=sname,
                               predicted_gib=s.reserved_gib, predicted_total_gib=s.total_gib, measured_gib=peak,
                               error=err, tokens_per_s=tps, rc=r.returncode, wall_s=round(time.time() - t, 1),
                               choice=p.choice.name if p.choice else None, device=device)
                    if r.returncode:
                        row["stderr_tail"] = r.stderr[-2000:]
                    rows.append(row)
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    print(json.dumps({k: v for k, v in row.items() if k != "stderr_tail"}), flush=True)
    if rows and args.docs:
        write_docs(rows, Path(args.docs), device)
    if rows:
        (out / "planner_bench_table.md").write_text("")
        write_docs(rows, out / "planner_bench_table.md", device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
