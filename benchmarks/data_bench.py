"""Tokenize-and-pack throughput of a generated jsonl: main's path before issue 23 (one process, a batched
`map` that tokenizes, then a second `map` that packs through Python lists) against train/data.py's
(`num_proc` processes, packing on Arrow/NumPy arrays), then the cache: a second build of the same
input reads the cached rows instead of tokenizing. `--launch` also runs `craken train --max-steps 1`
twice on the file (2 CPU processes) and prints each launch's data phase from metrics.jsonl's end line
(`startup.data_s - startup.imports_s`: tokenizer loading plus data; the built-in model, so seq_len 512).

    nice python benchmarks/data_bench.py [--mb 1024] [--seq-len 1024] [--launch] [--keep DIR]

The data is the built-in pattern language (builtin.pattern_lines), one {"text": ...} per line, ~64
lines a record; the tokenizer is the built-in one (a byte-level BPE). Every measurement reads the
jsonl through `datasets.load_dataset` into a fresh datasets cache, so no earlier Arrow copy is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACK_ROWS = 2000  # main's group size


def generate(path: Path, megabytes: float) -> int:
    from craken_cli.train import builtin

    lines = builtin.pattern_lines(64 * 500, seed=3)
    records = [json.dumps({"text": "\n".join(lines[i:i + 64])}) + "\n" for i in range(0, len(lines), 64)]
    target, written = int(megabytes * 1e6), 0
    with open(path, "w") as fh:
        while written < target:
            for record in records:
                fh.write(record)
                written += len(record)
                if written >= target:
                    break
    return written


def main_path(files: list[str], tokenizer, seq_len: int, cache: Path) -> int:
    """train/data.py's load_raw + pack as of main ae192b2 (the issue's 'before')."""
    import datasets

    raw = datasets.load_dataset("json", data_files=files, split="train", cache_dir=str(cache))
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [x + [eos] for x in ids]}

    def group(batch):
        flat = [t for seq in batch["ids"] for t in seq]
        usable = len(flat) // seq_len * seq_len
        return {"input_ids": [flat[i:i + seq_len] for i in range(0, usable, seq_len)]}

    tokenized = raw.map(tokenize, batched=True, remove_columns=["text"])
    return len(tokenized.map(group, batched=True, batch_size=PACK_ROWS, remove_columns=["ids"]))


def spec_for(path: Path, seq_len: int, cache: Path):
    from craken_cli.config.spec import RunSpec

    return RunSpec.model_validate({"data": {"dataset": str(path), "seq_len": seq_len, "cache_dir": str(cache)}})


def cpu_seconds() -> float:
    """User + system time of this process and its finished children (the map pools): what other jobs on
    a shared machine disturb much less than wall time."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def timed(fn, *args):
    start, cpu = time.perf_counter(), cpu_seconds()
    value = fn(*args)
    return value, time.perf_counter() - start, cpu_seconds() - cpu


def launch_data_seconds(work: Path, data: Path, cache: Path) -> list[float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRAKEN_")}
    env["CRAKEN_NO_PROGRESS"] = "1"
    out = []
    for n in range(2):
        name = f"launch{n}"
        subprocess.run([sys.executable, "-m", "craken_cli", "train", "--cpu", "--num-processes", "2", "--name", name,
                        "--dataset", str(data), "--seq-len", "512", "--max-steps", "1", "--micro-batch", "1",
                        "--grad-accum", "1", "--set", "train.eval_every=0", "--set", f"data.cache_dir={cache}"],
                       cwd=work, env=env, check=True, capture_output=True, text=True)
        lines = (work / "runs" / name / "metrics.jsonl").read_text().splitlines()
        startup = [json.loads(x) for x in lines if '"event": "end"' in x][-1]["startup"]
        out.append(round(startup["data_s"] - startup["imports_s"], 2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=1024.0, help="size of the generated jsonl in MB")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--launch", action="store_true", help="also time two real 2-process launches")
    parser.add_argument("--skip-before", action="store_true", help="skip main's path (slow on large files)")
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="craken-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf-after")  # before datasets is imported
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # as in the workers (train/loop.main): one core per process
    from craken_cli.train import builtin, data

    datasets_quiet()
    path = work / "data.jsonl"
    size = generate(path, args.mb)
    tokenizer = builtin.build_tokenizer()
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "megabytes": round(size / 1e6, 1),
              "seq_len": args.seq_len}
    if not args.skip_before:
        blocks, seconds, cpu = timed(main_path, [str(path)], tokenizer, args.seq_len, work / "hf-before")
        result["before"] = {"seconds": round(seconds, 1), "mb_per_s": round(size / 1e6 / seconds, 2),
                            "cpu_s": round(cpu, 1), "rows": blocks}
    spec = spec_for(path, args.seq_len, work / "cache")
    built, seconds, cpu = timed(data.cached_build, spec, tokenizer)
    result["after"] = {"seconds": round(seconds, 1), "mb_per_s": round(size / 1e6 / seconds, 2),
                       "cpu_s": round(cpu, 1), "rows": len(built.rows), "num_proc": data.num_proc(spec, 10**9) or 1}
    hit, seconds, _ = timed(data.cached_build, spec, tokenizer)
    assert hit.cache == "hit" and len(hit.rows) == len(built.rows)
    result["cache_hit_s"] = round(seconds, 2)
    print(json.dumps(result), flush=True)  # before the launches, which take minutes
    if args.launch:
        result["launch_data_s"] = launch_data_seconds(work, path, work / "launch-cache")
    print(json.dumps(result, indent=1))
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


def datasets_quiet() -> None:
    import datasets

    datasets.disable_progress_bars()


if __name__ == "__main__":
    main()
