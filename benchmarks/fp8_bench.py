"""FP8 training and the large-vocabulary loss on one GPU (issue 19), each grid one call of <= ~8 minutes:

    python3 benchmarks/fp8_bench.py --grid speed --out $OUT    # (a) + (b) below, in this order
    python3 benchmarks/fp8_bench.py --grid fp8 --out $OUT      # (a) only
    python3 benchmarks/fp8_bench.py --grid loss --out $OUT     # (b) only
    python3 benchmarks/fp8_bench.py --grid parity --out $OUT   # (c) FP8 against bf16 on real-ish text
    python3 benchmarks/fp8_bench.py --plot $OUT --png docs/img/fp8-parity.png   # (c)'s curves

(a) `craken train --auto --precision fp8` against `craken train --auto` (bf16) and against the
    hand-written float8 script (benchmarks/handwritten_float8.py: torchao's README with plain
    Accelerate, no compilation) at craken's micro-batch, on the 1.1B (seq 2048, global batch 16) and
    3B (seq 4096, global batch 8) shapes of benchmarks/gpu_bench.py; fp32 master weights everywhere.
(b) The Qwen2.5-0.5B shape (vocab 151,936, tied, 14 heads / 2 KV, hidden 896, 24 layers, MLP 4864) at
    seq 2048: `craken train --auto` with the chunked loss (model.loss auto) against the model's own
    compiled loss (--set model.loss=model), each at the micro-batch the planner picks from global batch 64.
(c) The 1.1B shape at seq 1024 on text gathered from the installed Python packages' sources and docs
    (no hub data here: real code and prose, not random tokens), a BPE tokenizer trained on it on the
    spot, bf16 and fp8 from the same seed and data; eval loss every 50 steps.

Every craken row also shows the planner's prediction for the run's own settings (reserved GiB, the
figure torch.cuda.max_memory_reserved() measures). tokens/s are the mean of the logged intervals after
the first. A compact table and the ratios the issue asks for are printed last; the full log, rows.json
and the run folders go to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpu_bench  # noqa: E402  (shapes, craken argv, metrics summary: one place for each)

WORK = Path("/tmp/craken-fp8-bench")
BUDGET_S = 540  # stop starting runs after this: the call's limit is 600 s
QWEN_05B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
            "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True,
            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
            "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16"}
MUST = [  # (numerator row, denominator row, at least, what)
    ("fp8-1.1b", "bf16-1.1b", 1.20, "craken fp8 / craken bf16, 1.1B"),
    ("fp8-3b", "bf16-3b", 1.20, "craken fp8 / craken bf16, 3B"),
    ("fp8-1.1b", "hand-float8-1.1b", 1.15, "craken fp8 / hand-written float8, 1.1B"),
    ("fp8-3b", "hand-float8-3b", 1.15, "craken fp8 / hand-written float8, 3B"),
    ("qwen-chunked-loss", "qwen-model-loss", 1.25, "chunked loss / compiled model loss, Qwen2.5-0.5B"),
]


def hand_float8(name, model, out, seq, steps, micro_batches):
    out_json = out / f"{name}.json"
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "bf16",
            str(HERE / "handwritten_float8.py"), "--model", str(model), "--seq-len", str(seq),
            "--micro-batch", micro_batches, "--steps", str(steps), "--out", str(out_json)]
    return {"name": name, "kind": "hand", "argv": argv, "result": out_json}


def speed_runs(grid: str, out: Path) -> list[dict]:
    m11 = gpu_bench.write_config(WORK / "llama-1.1b", "llama-1.1b")
    m3b = gpu_bench.write_config(WORK / "llama-3b", "llama-3b")
    qwen = WORK / "qwen2.5-0.5b"
    qwen.mkdir(parents=True, exist_ok=True)
    (qwen / "config.json").write_text(json.dumps(QWEN_05B, indent=1))
    gb11, gb3 = ("--global-batch", "16"), ("--global-batch", "8")
    fp8 = [
        gpu_bench.craken_run("bf16-1.1b", m11, out, 2048, 25, "--auto", "--precision", "bf16", *gb11),
        gpu_bench.craken_run("fp8-1.1b", m11, out, 2048, 25, "--auto", "--precision", "fp8", *gb11),
        gpu_bench.craken_run("bf16-3b", m3b, out, 4096, 20, "--auto", "--precision", "bf16", *gb3),
        gpu_bench.craken_run("fp8-3b", m3b, out, 4096, 20, "--auto", "--precision", "fp8", *gb3),
        hand_float8("hand-float8-1.1b", m11, out, 2048, 8, "16,8"),
        hand_float8("hand-float8-3b", m3b, out, 4096, 5, "8,4,2"),
    ]
    loss = [
        gpu_bench.craken_run("qwen-model-loss", qwen, out, 2048, 25, "--auto", "--global-batch", "64",
                             "--set", "model.loss=model"),
        gpu_bench.craken_run("qwen-chunked-loss", qwen, out, 2048, 25, "--auto", "--global-batch", "64"),
    ]
    if grid == "fp8":
        return fp8
    if grid == "loss":
        return loss
    return fp8[:2] + loss + fp8[2:]  # the two 1.1B rows and Qwen first: the most asked for the least time


def predicted_reserved(run_dir: Path) -> float | None:
    """The planner's reserved GiB for the run's own settings (its run.yaml), on this machine's GPUs."""
    from craken_cli.hardware import detect
    from craken_cli.modelinfo import model_info
    from craken_cli.planner import plan
    from craken_cli.sources import build_spec, file_layer

    spec = build_spec([file_layer(run_dir / "run.yaml")]).spec
    result = plan(model_info(spec.model.name_or_path), spec, detect(), search_micro_batch=False)
    return result.requested.reserved_gib


def execute(runs: list[dict], out: Path, log) -> list[dict]:
    rows, started = [], time.time()
    for run in runs:
        if time.time() - started > BUDGET_S:
            rows.append({"name": run["name"], "rc": None, "error": "not started: the call's time was spent"})
            continue
        log.write(f"\n===== {run['name']}: {' '.join(map(str, run['argv']))}\n")
        log.flush()
        t0 = time.time()
        try:
            proc = subprocess.run(run["argv"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=max(30, BUDGET_S + 40 -
                                                                                           (t0 - started)))
            rc, text = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as exc:
            rc, text = "timeout", (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) \
                else (exc.stdout or "")
        log.write(text)
        log.flush()
        row = {"name": run["name"], "rc": rc, "wall_s": round(time.time() - t0, 1)}
        try:
            if run["kind"] == "craken":
                row.update(gpu_bench.summarize_craken(run))
                row["predicted_reserved_gib"] = predicted_reserved(run["run_dir"])
            else:
                row.update(json.loads(run["result"].read_text()))
        except Exception as exc:  # a failed run is a row too
            row["error"] = f"{exc.__class__.__name__}: {exc}"
        rows.append(row)
        (out / "rows.json").write_text(json.dumps(rows, indent=1, default=str))
        print(f"[{run['name']}] rc={rc} wall={row['wall_s']:.0f}s {row.get('error', '')}", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print("\nname | rc | strategy | mb | tok/s | MFU | reserved GiB | planner GiB | first step s | wall s")
    for r in rows:
        if "tokens_per_s_per_gpu" not in r:
            print(f"{r['name']} | {r['rc']} | {r.get('error', '')}")
            continue
        predicted = r.get("predicted_reserved_gib")
        err = f"{predicted:.2f} ({(predicted / r['peak_reserved_gib'] - 1) * 100:+.0f}%)" if predicted else "-"
        print(f"{r['name']} | {r['rc']} | {r.get('strategy', '-')} | {r.get('micro_batch')} | "
              f"{r['tokens_per_s_per_gpu']:,.0f} | {r['mfu']:.3f} | {r['peak_reserved_gib']:.2f} | {err} | "
              f"{r.get('first_step_s') or 0:.1f} | {r['wall_s']}")
    speed = {r["name"]: r["tokens_per_s_per_gpu"] for r in rows if "tokens_per_s_per_gpu" in r}
    print("\nratio | measured | must be")
    for num, den, least, what in MUST:
        if num in speed and den in speed:
            ratio = speed[num] / speed[den]
            print(f"{what} | {ratio:.3f} | >= {least} {'ok' if ratio >= least else 'NOT MET'}")


# ---------------------------------------------------------------------------------------------
# (c) loss parity on real-ish text


def corpus(folder: Path, megabytes: int = 24) -> Path:
    """Text files of the installed packages (Python sources, Markdown/reST docs, licences) as jsonl,
    one record per file, up to `megabytes`; the same files in the same order on every call."""
    import site

    path = folder / "corpus.jsonl"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    roots = [Path(p) for p in site.getsitepackages()]
    packages = ("transformers", "torch", "accelerate", "datasets", "numpy", "pydantic", "typer", "rich", "yaml",
                "jinja2", "sympy", "networkx", "tokenizers", "safetensors", "huggingface_hub")
    files = (f for pkg in packages for root in roots if (root / pkg).is_dir() for f in sorted((root / pkg).rglob("*"))
             if f.suffix in (".py", ".md", ".rst", ".txt") and f.is_file())
    budget, count = megabytes * 2**20, 0
    with open(path, "w", encoding="utf-8") as fh:
        for f in files:
            text = f.read_text(encoding="utf-8", errors="ignore")
            if len(text) < 200:
                continue
            fh.write(json.dumps({"text": text}) + "\n")
            count += 1
            budget -= len(text)
            if budget <= 0:
                break
    print(f"corpus: {count} files, {path.stat().st_size / 2**20:.1f} MiB", flush=True)
    return path


def tokenizer(folder: Path, data: Path, vocab: int = 32000) -> Path:
    """A byte-level BPE trained on the corpus, saved as a transformers tokenizer (EOS for packing)."""
    out = folder / "tokenizer"
    if (out / "tokenizer.json").is_file():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def texts():
        with open(data, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if i % 4 == 0:  # a quarter of the files teaches the merges well enough
                    yield json.loads(line)["text"]

    tok.train_from_iterator(texts(), trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)
    return out


def parity_runs(out: Path, steps: int) -> list[dict]:
    m11 = gpu_bench.write_config(WORK / "llama-1.1b", "llama-1.1b")
    data = corpus(WORK / "text")
    tok = tokenizer(WORK / "text", data)
    runs = []
    for precision in ("bf16", "fp8"):
        run_dir = out / "runs" / f"parity-{precision}"
        argv = [sys.executable, "-m", "craken_cli", "train", "--auto", "--precision", precision, "--model", str(m11),
                "--tokenizer", str(tok), "--dataset", str(data), "--seq-len", "1024", "--global-batch", "16",
                "--max-steps", str(steps), "--lr", "3e-4", "--seed", "42", "--eval-every", "50",
                "--steps-per-print", "10", "--set", "train.save_final=false", "--set", "train.eval_batches=16",
                "--output-dir", str(run_dir), "--force"]
        runs.append({"name": f"parity-{precision}", "kind": "craken", "argv": argv, "run_dir": run_dir})
    return runs


def print_parity(out: Path) -> None:
    evals = {}
    for precision in ("bf16", "fp8"):
        path = out / "runs" / f"parity-{precision}" / "metrics.jsonl"
        if path.is_file():
            records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            evals[precision] = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if len(evals) == 2 and evals["bf16"] and evals["fp8"]:
        (s1, bf16), (s2, fp8) = evals["bf16"][-1], evals["fp8"][-1]
        diff = (fp8 - bf16) / bf16
        print(f"\nfinal eval loss: bf16 {bf16:.4f} (step {s1}), fp8 {fp8:.4f} (step {s2}), fp8 vs bf16 {diff:+.2%} "
              f"(must be within 1.5%: {'ok' if abs(diff) <= 0.015 else 'NOT MET'})")


def plot(out: Path, png: Path) -> None:
    """Both runs' training and eval loss against the step, into one PNG (docs/performance.md)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for precision, colour in (("bf16", "tab:blue"), ("fp8", "tab:orange")):
        records = [json.loads(x) for x in (out / "runs" / f"parity-{precision}" / "metrics.jsonl").read_text()
                   .splitlines() if x.strip()]
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        ax.plot(*zip(*train), color=colour, alpha=0.5, label=f"{precision} train")
        ax.plot(*zip(*evals), "o-", color=colour, label=f"{precision} eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("1.1B Llama, seq 1024, batch 16: bf16 and fp8 (torchao tensorwise), same seed and data")
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", choices=("speed", "fp8", "loss", "parity"), default="speed")
    ap.add_argument("--out", type=Path, required=True, help="results folder (with --plot: a parity call's $OUT)")
    ap.add_argument("--steps", type=int, default=500, help="parity: optimizer steps of each run")
    ap.add_argument("--plot", action="store_true", help="plot the parity runs under --out into --png")
    ap.add_argument("--png", type=Path, default=Path("docs/img/fp8-parity.png"))
    args = ap.parse_args()
    if args.plot:
        plot(args.out, args.png)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    runs = parity_runs(args.out, args.steps) if args.grid == "parity" else speed_runs(args.grid, args.out)
    with open(args.out / "bench.log", "w") as log:
        rows = execute(runs, args.out, log)
    print_table(rows)
    if args.grid == "parity":
        print_parity(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
