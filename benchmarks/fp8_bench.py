"""FP8 training and the large-vocabulary loss on one GPU (issue 19), each grid one call of under 10 minutes
(`--budget` seconds of runs, 470 by default; a run starts only with `--min-run-s` left):

    python3 benchmarks/fp8_bench.py --grid fp8 --out $OUT      # (a)
    python3 benchmarks/fp8_bench.py --grid loss --out $OUT     # (b)
    python3 benchmarks/fp8_bench.py --grid parity --out $OUT   # (c) FP8 against bf16 on real text
    python3 benchmarks/fp8_bench.py --grid speed --out $OUT    # (a) + (b) interleaved: more than one call's time
    python3 benchmarks/fp8_bench.py --grid fp8 --out /tmp/x --dry-run   # the runs and their plans, on CPU
    python3 benchmarks/fp8_bench.py --plot --out $OUT --png docs/img/fp8-parity.png   # (c)'s curves

(a) `craken train --auto --precision fp8` against `craken train --auto` (bf16) and against the
    hand-written float8 script (benchmarks/handwritten_float8.py: torchao's README with plain
    Accelerate, eager, and with every decoder layer compiled: the expert's row) at the micro-batch craken's
    fp8 run chose, on the 1.1B (seq 2048, global batch 16) and 3B (seq 4096, global batch 8) shapes of
    benchmarks/gpu_bench.py; fp32 master weights everywhere.
(b) The Qwen2.5-0.5B config (benchmarks/model_configs: vocab 151,936, tied, 14 heads / 2 KV, 24 layers) at
    seq 2048: `craken train --auto` with the chunked loss (--set model.loss=chunked) against the model's own
    compiled loss (--set model.loss=model, what auto picks compiled), each at the micro-batch the planner picks from global batch 64;
    then the same for the Llama-3.2-1B config (vocab 128,256, tied), global batch 32.
(c) The 1.1B shape at seq 1024 on text gathered from the installed Python packages' sources and docs
    (no hub data here: real code and prose, not random tokens), a BPE tokenizer trained on it on the
    spot, bf16 and fp8 from the same seed and data; eval loss every 50 steps.

Every craken row also shows what its start line says ran (loss_kind, float8_linears) and the planner's
prediction for the run's own settings (reserved GiB, the figure torch.cuda.max_memory_reserved() measures). tokens/s are the mean of the logged intervals after
the first. A compact table and the ratios the issue asks for are printed last; the full log (bench.log),
rows.jsonl and the parity runs' metrics go to --out; run folders stay in /tmp/craken-fp8-bench/out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpu_bench  # noqa: E402  (shapes, craken argv, metrics summary: one place for each)

WORK = Path("/tmp/craken-fp8-bench")
CONFIGS = HERE / "model_configs"  # the public config.json values planner_bench.py uses too
# Run folders stay on the GPU machine: only a few files come back from $OUT (bench.log, rows.jsonl and
# the parity runs' metrics).
RUNS = WORK / "out"
OLD_SRC = HERE.parent / ".bench-old" / "src"  # `git archive 22992b9 src | tar -x -C .bench-old`, carried
MUST = [  # (numerator row, denominator row, at least, what)
    ("fp8-1.1b", "bf16-1.1b", 1.20, "craken fp8 / craken bf16, 1.1B"),
    ("fp8-3b", "bf16-3b", 1.20, "craken fp8 / craken bf16, 3B"),
    ("fp8-1.1b", "hand-float8-1.1b", 1.15, "craken fp8 / hand-written float8, 1.1B"),
    ("fp8-3b", "hand-float8-3b", 1.15, "craken fp8 / hand-written float8, 3B"),
    ("qwen-chunked-loss", "qwen-model-loss", 1.25, "chunked loss / compiled model loss, Qwen2.5-0.5B"),
    ("llama3-chunked-loss", "llama3-model-loss", 1.0, "chunked loss / compiled model loss, Llama-3 1B (128k)"),
    ("qwen-auto-gb32", "qwen-auto-gb32-fixed-segments", 1.0, "grown / fixed allocator segments, Qwen --auto gb 32"),
    ("qwen-model-loss", "qwen-loss-as-filed", 1.25, "model loss without the fp32 logits copy / as filed, Qwen2.5-0.5B"),
    ("qwen-chunked-loss", "qwen-loss-as-filed", 1.25, "chunked loss / as filed, Qwen2.5-0.5B"),
    ("fp8-1.1b", "hand-float8-compiled-1.1b", 1.0, "craken fp8 / hand-written float8 compiled, 1.1B"),
    ("fp8-3b", "hand-float8-compiled-3b", 1.0, "craken fp8 / hand-written float8 compiled, 3B"),
]


def hand_float8(name, model, seq, steps, same_as, *extra):
    """The hand-written float8 script at the micro-batch craken's `same_as` run chose (read when it starts;
    halved on an out-of-memory error: the script tries each in turn)."""
    out_json = RUNS / f"{name}.json"
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "bf16",
            str(HERE / "handwritten_float8.py"), "--model", str(model), "--seq-len", str(seq),
            "--micro-batch", "MICRO_BATCHES", "--steps", str(steps), "--out", str(out_json), *extra]
    return {"name": name, "kind": "hand", "argv": argv, "result": out_json, "same_as": same_as}


def micro_batches(first: int) -> str:
    """"16,8,4,2,1" from 16: the hand-written script's list, largest first."""
    out = [first]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return ",".join(map(str, out))


def config_folder(name: str) -> Path:
    """WORK/<name>/config.json from benchmarks/model_configs/<name>.json (config only: random weights)."""
    folder = WORK / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text((CONFIGS / f"{name}.json").read_text())
    return folder


def pattern_data(lines: int = 320_000) -> Path:
    """The built-in pattern language, more of it: about 2,400 blocks of 2048 tokens, more than the 25 steps
    of global batch 64 take, so no run reaches an epoch's end (the code as filed stepped early there on a
    part of the global batch and counted a whole one)."""
    from craken_cli.train import builtin

    path = WORK / "patterns.jsonl"
    if not path.is_file():
        WORK.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as fh:
            for line in builtin.pattern_lines(lines, seed=7):
                fh.write(json.dumps({"text": line}) + "\n")
    return path


def speed_runs(grid: str) -> list[dict]:
    data = ("--dataset", str(pattern_data()))
    m11 = gpu_bench.write_config(WORK / "llama-1.1b", "llama-1.1b")
    m3b = gpu_bench.write_config(WORK / "llama-3b", "llama-3b")
    qwen, llama3 = config_folder("qwen2.5-0.5b"), config_folder("llama-3.2-1b")
    gb11, gb3 = ("--global-batch", "16"), ("--global-batch", "8")  # the built-in data, as gpu_bench.py
    fp8 = [
        gpu_bench.craken_run("bf16-1.1b", m11, RUNS, 2048, 25, "--auto", "--precision", "bf16", *gb11),
        gpu_bench.craken_run("fp8-1.1b", m11, RUNS, 2048, 25, "--auto", "--precision", "fp8", *gb11),
        gpu_bench.craken_run("bf16-3b", m3b, RUNS, 4096, 20, "--auto", "--precision", "bf16", *gb3),
        gpu_bench.craken_run("fp8-3b", m3b, RUNS, 4096, 20, "--auto", "--precision", "fp8", *gb3),
        hand_float8("hand-float8-1.1b", m11, 2048, 8, "fp8-1.1b"),
        hand_float8("hand-float8-3b", m3b, 4096, 5, "fp8-3b"),
        hand_float8("hand-float8-compiled-1.1b", m11, 2048, 8, "fp8-1.1b", "--compile"),
        hand_float8("hand-float8-compiled-3b", m3b, 4096, 5, "fp8-3b", "--compile"),
    ]
    loss = [
        # issue 16's must-show: the plain `--auto` at global batch 32 (the loss auto picks) fits on the first launch
        gpu_bench.craken_run("qwen-auto-gb32", qwen, RUNS, 2048, 25, "--auto", "--global-batch", "32", *data),
        # the same with the allocator's fixed segments (craken's workers grow them: launch.GPU_ALLOCATOR_ENV)
        {**gpu_bench.craken_run("qwen-auto-gb32-fixed-segments", qwen, RUNS, 2048, 25, "--auto", "--global-batch",
                                "32", *data), "env": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}},
        # issue 19's "today's compiled loss": the code as it was before Accelerate's fp32 copy of the logits was
        # removed (main 22992b9, its src/ carried in .bench-old/), at the micro-batch that fitted then (mb 32 ran
        # out of memory); the row the large-vocabulary loss is measured against, in the same call
        {**gpu_bench.craken_run("qwen-loss-as-filed", qwen, RUNS, 2048, 25, "--global-batch", "64", "--micro-batch",
                                "16", *data, "--set", "model.loss=model", "--set", "zero.stage=0", "--set",
                                "model.compile=true"), "pythonpath": OLD_SRC},
        gpu_bench.craken_run("qwen-model-loss", qwen, RUNS, 2048, 25, "--auto", "--global-batch", "64", *data,
                             "--set", "model.loss=model"),
        gpu_bench.craken_run("qwen-chunked-loss", qwen, RUNS, 2048, 25, "--auto", "--global-batch", "64", *data,
                             "--set", "model.loss=chunked"),
        gpu_bench.craken_run("llama3-model-loss", llama3, RUNS, 2048, 20, "--auto", "--global-batch", "32", *data,
                             "--set", "model.loss=model"),
        gpu_bench.craken_run("llama3-chunked-loss", llama3, RUNS, 2048, 20, "--auto", "--global-batch", "32", *data,
                             "--set", "model.loss=chunked"),
        # fp8 on large vocabularies (lm_head stays bf16; at Qwen's hidden 896 only the MLP converts): rows the
        # planner's FP8 share was not fitted on, beside qwen-auto-gb32 and llama3-model-loss
        gpu_bench.craken_run("qwen-fp8-gb32", qwen, RUNS, 2048, 25, "--auto", "--global-batch", "32", *data,
                             "--precision", "fp8"),
        gpu_bench.craken_run("llama3-fp8", llama3, RUNS, 2048, 20, "--auto", "--global-batch", "32", *data,
                             "--precision", "fp8"),
    ]
    untuned = ("--set", "model.compile_tuning=false")  # inductor's default kernel heuristics, as the hand script
    tuning = [gpu_bench.craken_run("fp8-3b-untuned", m3b, RUNS, 4096, 20, "--auto", "--precision", "fp8", *gb3, *untuned),
              gpu_bench.craken_run("bf16-3b-untuned", m3b, RUNS, 4096, 20, "--auto", "--precision", "bf16", *gb3,
                                   *untuned)]
    if grid == "fp8-tuning":  # 3B first (its 1.20x is the closer one), the compiled hand rows only, then the A/B
        return [fp8[2], fp8[3], fp8[7], fp8[0], fp8[1], fp8[6], *tuning]
    if grid == "fp8":  # each hand-written run right after the craken fp8 run whose micro-batch it takes
        return [fp8[0], fp8[1], fp8[4], fp8[6], fp8[2], fp8[3], fp8[5], fp8[7]]
    if grid == "loss":
        return loss
    return fp8[:2] + loss[:5] + fp8[4:5] + fp8[2:4] + fp8[5:] + loss[5:]  # 1.1B and Qwen first


def predicted_reserved(run_dir: Path) -> float | None:
    """The planner's reserved GiB for the run's own settings (its run.yaml), on this machine's GPUs."""
    from craken_cli.plan.hardware import detect
    from craken_cli.plan.modelinfo import model_info
    from craken_cli.plan.memory import plan
    from craken_cli.config.sources import build_spec, file_layer

    spec = build_spec([file_layer(run_dir / "run.yaml")]).spec
    result = plan(model_info(spec.model.name_or_path), spec, detect(), search_micro_batch=False)
    return result.requested.reserved_gib


def argv_of(run: dict, rows: list[dict]) -> list[str]:
    """The run's command; a hand-written run takes the micro-batch its craken run chose (16 if that failed)."""
    if run["kind"] != "hand":
        return run["argv"]
    chosen = next((r.get("micro_batch") for r in rows if r["name"] == run["same_as"]), None) or 16
    return [micro_batches(int(chosen)) if a == "MICRO_BATCHES" else a for a in run["argv"]]


def execute(runs: list[dict], out: Path, log, budget: float, min_run_s: float) -> list[dict]:
    """Each run in turn while `budget` seconds last: one starts only with `min_run_s` left and is stopped
    when the budget ends, so the table always prints inside the call. Rows go to rows.jsonl as they end."""
    rows, started = [], time.time()
    for run in runs:
        left = budget - (time.time() - started)
        if left < min_run_s:
            rows.append({"name": run["name"], "rc": None, "error": f"not started: {left:.0f} s of the budget left"})
            continue
        argv = argv_of(run, rows)
        log.write(f"\n===== {run['name']}: {' '.join(map(str, argv))}\n")
        log.flush()
        t0 = time.time()
        try:
            proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=run_env(run), timeout=left)
            rc, text = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as exc:
            out_text = exc.stdout or ""
            rc, text = "timeout", out_text.decode(errors="replace") if isinstance(out_text, bytes) else out_text
        log.write(text)
        log.flush()
        row = {"name": run["name"], "rc": rc, "wall_s": round(time.time() - t0, 1),
               "relaunched": "relaunching with the next fastest" in text}
        try:
            if run["kind"] == "craken":
                if run.get("keep_metrics"):  # the parity curves: the plot reads them from $OUT
                    shutil.copy(run["run_dir"] / "metrics.jsonl", out / f"{run['name']}.metrics.jsonl")
                row.update(gpu_bench.summarize_craken(run))
                row.update(ran(run["run_dir"]))
                row["predicted_reserved_gib"] = predicted_reserved(run["run_dir"])
            else:
                row.update(json.loads(run["result"].read_text()))
        except Exception as exc:  # a failed run is a row too
            row["error"] = f"{exc.__class__.__name__}: {exc}"
        rows.append(row)
        with open(out / "rows.jsonl", "a") as fh:
            fh.write(json.dumps(row, default=str) + "\n")
        print(f"[{run['name']}] rc={rc} wall={row['wall_s']:.0f}s {row.get('error', '')}", flush=True)
    return rows


def run_env(run: dict) -> dict:
    """The environment of a run: an older craken's source first on the path where the run names one."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **run.get("env", {})}
    if run.get("pythonpath"):
        env["PYTHONPATH"] = os.pathsep.join([str(run["pythonpath"])] + [p for p in env.get("PYTHONPATH", "").split(
            os.pathsep) if p and not p.endswith("/src")])
    return env


def ran(run_dir: Path) -> dict:
    """What the run's start line says ran: precision, the loss (chunked or the model's), float8 Linears, and
    whether the run went past the end of its data (an epoch boundary inside the timed steps)."""
    start = next(json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if '"start"' in x)
    rows = (start.get("data") or {}).get("rows")
    return {**{k: start.get(k) for k in ("precision", "loss_kind", "float8_linears", "compiled_layers")},
            "data_rows": rows, "epoch_wrapped": rows is not None and start["max_steps"] * start["global_batch"] > rows}


def print_table(rows: list[dict]) -> None:
    print("\nname | rc | strategy | mb | loss | f8 linears | tok/s | MFU | reserved GiB | planner GiB | first step s | wall s")
    for r in rows:
        if "tokens_per_s_per_gpu" not in r:
            print(f"{r['name']} | {r['rc']} | {r.get('error', '')}")
            continue
        predicted = r.get("predicted_reserved_gib")
        measured = r.get("peak_reserved_gib") or 0
        err = f"{predicted:.2f} ({(predicted / measured - 1) * 100:+.0f}%)" if predicted and measured else "-"
        print(f"{r['name']} | {r['rc']} | {r.get('strategy', '-')} | {r.get('micro_batch')} | "
              f"{r.get('loss_kind', '-')} | {r.get('float8_linears', '-')} | {r['tokens_per_s_per_gpu']:,.0f} | "
              f"{r['mfu']:.3f} | {r['peak_reserved_gib']:.2f} | {err} | {r.get('first_step_s') or 0:.1f} | "
              f"{r['wall_s']}{' RELAUNCHED' if r.get('relaunched') else ''}")
    speed = {r["name"]: r["tokens_per_s_per_gpu"] for r in rows if "tokens_per_s_per_gpu" in r}
    print("\nratio | measured | must be")
    for num, den, least, what in MUST:
        if num in speed and den in speed:
            ratio = speed[num] / speed[den]
            print(f"{what} | {ratio:.3f} | >= {least} {'ok' if ratio >= least else 'NOT MET'}")


def dry_run(runs: list[dict]) -> int:
    """Each run's command, and for craken's the plan its flags give on a hypothetical H200 (`craken plan`,
    the same option parsing as `craken train`): a typo fails here, on CPU, not in the GPU call."""
    failed = 0
    for run in runs:
        argv = [str(a) for a in argv_of(run, [])]
        print(f"--- {run['name']}: {' '.join(argv)}")
        if run["kind"] != "craken":
            continue
        train_only = {"--auto", "--force", "--output-dir"}
        flags, skip = [], False
        for a in argv[argv.index("train") + 1:]:
            if skip:
                skip = False
            elif a in train_only:
                skip = a == "--output-dir"
            else:
                flags.append(a)
        proc = subprocess.run([sys.executable, "-m", "craken_cli", "plan", "--gpus", "1", "--gpu-memory", "139.8GiB",
                               *flags], capture_output=True, text=True)
        choice = [x for x in proc.stdout.splitlines() if x.startswith(("choice", "beside"))]
        print("\n".join(choice) if proc.returncode == 0 else f"craken plan failed ({proc.returncode}): "
              f"{(proc.stdout + proc.stderr)[-800:]}")
        failed += proc.returncode != 0
    return 1 if failed else 0


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


def parity_runs(steps: int) -> list[dict]:
    m11 = gpu_bench.write_config(WORK / "llama-1.1b", "llama-1.1b")
    data = corpus(WORK / "text")
    tok = tokenizer(WORK / "text", data)
    runs = []
    for precision in ("bf16", "fp8"):
        run_dir = RUNS / "runs" / f"parity-{precision}"
        argv = [sys.executable, "-m", "craken_cli", "train", "--auto", "--precision", precision, "--model", str(m11),
                "--tokenizer", str(tok), "--dataset", str(data), "--seq-len", "1024", "--global-batch", "16",
                "--max-steps", str(steps), "--lr", "3e-4", "--seed", "42", "--eval-every", "50",
                "--steps-per-print", "10", "--set", "train.save_final=false", "--set", "train.eval_batches=16",
                "--output-dir", str(run_dir), "--force"]
        runs.append({"name": f"parity-{precision}", "kind": "craken", "argv": argv, "run_dir": run_dir,
                     "keep_metrics": True})
    return runs


def print_parity(out: Path) -> None:
    evals = {}
    for precision in ("bf16", "fp8"):
        path = out / f"parity-{precision}.metrics.jsonl"
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
        records = [json.loads(x) for x in (out / f"parity-{precision}.metrics.jsonl").read_text()
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", choices=("speed", "fp8", "fp8-tuning", "loss", "parity"), default="fp8")
    ap.add_argument("--out", type=Path, required=True, help="results folder (with --plot: a parity call's $OUT)")
    ap.add_argument("--steps", type=int, default=500, help="parity: optimizer steps of each run")
    ap.add_argument("--budget", type=int, default=470, help="seconds for the whole grid (runs stopped at its end)")
    ap.add_argument("--min-run-s", type=int, default=75, help="a run starts only with this many seconds left")
    ap.add_argument("--dry-run", action="store_true", help="print the runs and the plans of their flags; train nothing")
    ap.add_argument("--only", default=None, help="comma-separated run names of the grid to run (default: all)")
    ap.add_argument("--plot", action="store_true", help="plot the parity runs under --out into --png")
    ap.add_argument("--png", type=Path, default=Path("docs/img/fp8-parity.png"))
    args = ap.parse_args()
    if args.plot:
        plot(args.out, args.png)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    RUNS.mkdir(parents=True, exist_ok=True)
    runs = parity_runs(args.steps) if args.grid == "parity" else speed_runs(args.grid)
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {r["name"] for r in runs})
        if unknown:
            ap.error(f"--only: no run named {', '.join(unknown)} in --grid {args.grid}: "
                     f"choose from {', '.join(r['name'] for r in runs)}")
        runs = [r for r in runs if r["name"] in names]
    if args.dry_run:
        return dry_run(runs)
    with open(args.out / "bench.log", "w") as log:
        rows = execute(runs, args.out, log, args.budget, args.min_run_s)
    print_table(rows)
    if args.grid == "parity":
        print_parity(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
