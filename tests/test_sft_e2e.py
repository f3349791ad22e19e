"""Supervised fine-tuning through `craken train`: two CPU processes, real DeepSpeed ZeRO-2 (gloo), the
built-in tiny model, a chat set (a tokenizer folder with a chat template, written here) and an alpaca
set. Checked on the rows the workers trained on (the data cache the run wrote, read back through the
loop's own collate): every label outside the responses is -100; the loss falls; final/ generates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from craken_cli.train import builtin

pytestmark = pytest.mark.e2e

TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tasks(n: int) -> list[tuple[str, str]]:
    """(question, answer) pairs of the built-in pattern language: 'count 7 by 3' -> ' 7 10 13 ...'."""
    return [tuple(line.split(" : ", 1)) for line in builtin.pattern_lines(n, seed=5)]


def craken(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRAKEN_")}
    env["CRAKEN_NO_PROGRESS"] = "1"
    return subprocess.run([sys.executable, "-m", "craken_cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def train(work: Path, name: str, dataset: Path, seq_len: int, *flags: str) -> Path:
    result = craken("train", "--name", name, "--dataset", str(dataset), "--num-processes", "2", "--zero", "2",
                    "--cpu", "--max-steps", "30", "--seq-len", str(seq_len), "--micro-batch", "4", "--grad-accum", "1",
                    "--lr", "3e-3", "--steps-per-print", "5", "--set", f"data.cache_dir={work / 'cache'}",
                    "--set", "train.eval_every=0", *flags, cwd=work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "Traceback" not in result.stderr
    return work / "runs" / name


def trained_rows(run_dir: Path):
    """The run's rows, read from the cache the workers wrote, as the loop batches them."""
    import torch

    from craken_cli.config.sources import build_spec, file_layer
    from craken_cli.train import data, loop, modeling

    spec = build_spec([file_layer(run_dir / "run.yaml")]).spec
    built = data.cached_build(spec, modeling.load_tokenizer(spec))
    assert built.cache == "hit"  # the rows the workers built, not a new build
    built.rows.set_format("torch")
    batches = list(torch.utils.data.DataLoader(built.rows, batch_size=4, collate_fn=loop.collate))
    return built, batches, modeling.load_tokenizer(spec)


def assert_only_answers_train(batches, tokenizer, answers: set[str]) -> int:
    """Each packed sample's trained tokens are one answer and its EOS, nothing of the prompt."""
    samples = 0
    for batch in batches:
        assert set(batch) == {"input_ids", "labels", "position_ids"}
        for ids, labels, pos in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
            starts = [i for i, p in enumerate(pos.tolist()) if p == 0] + [len(pos)]
            for a, b in zip(starts, starts[1:]):
                trained = [t for t, l in zip(ids[a:b].tolist(), labels[a:b].tolist()) if l != -100]
                if not trained:  # the padding at a row's end
                    assert (labels[a:b] == -100).all()
                    continue
                text = tokenizer.decode(trained)
                assert text.endswith(builtin.EOS) and text[:-len(builtin.EOS)] in answers, text
                samples += 1
    return samples


def assert_learned_and_generates(run_dir: Path, prompt: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) >= 3 and losses[-1] < 0.8 * losses[0], losses
    start = next(r for r in records if r.get("event") == "start")
    assert start["data"]["format"] in ("chat", "alpaca")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] > ids.shape[1]
    assert tokenizer.decode(out[0, ids.shape[1]:]).strip()


def test_chat_sft_trains_on_assistant_turns_only(tmp_path):
    tokenizer = builtin.build_tokenizer()
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(tmp_path / "tok")
    pairs = tasks(600)
    records = [{"messages": [{"role": "system", "content": "answer the pattern"}, {"role": "user", "content": q},
                             {"role": "assistant", "content": " " + a}]} for q, a in pairs]
    records.append({"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]})
    dataset = tmp_path / "chat.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records))

    run_dir = train(tmp_path, "chat", dataset, 128, "--tokenizer", str(tmp_path / "tok"))
    built, batches, tok = trained_rows(run_dir)
    assert built.format == "chat" and built.skipped == {"unknown role 'narrator'": 1}
    assert assert_only_answers_train(batches, tok, {" " + a for _, a in pairs}) == built.samples == 600
    q = pairs[0][0]
    assert_learned_and_generates(run_dir, f"<|system|>answer the pattern{builtin.EOS}<|user|>{q}{builtin.EOS}"
                                          "<|assistant|>")


def test_alpaca_sft_trains_on_outputs_only(tmp_path):
    pairs = tasks(600)
    records = [{"instruction": q, "input": "", "output": a} for q, a in pairs]
    records.append({"instruction": "count 1 by 1", "input": "", "output": "  "})  # an empty response: skipped
    # the English Alpaca prompt is about 190 tokens of this pattern-language tokenizer: --seq-len 256
    dataset = tmp_path / "alpaca.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records))

    run_dir = train(tmp_path, "alpaca", dataset, 256, "--tokenizer", "builtin:tiny")
    built, batches, tok = trained_rows(run_dir)
    assert built.format == "alpaca" and built.skipped == {"empty response": 1}
    assert assert_only_answers_train(batches, tok, {a for _, a in pairs}) == built.samples == 600
    from craken_cli.train.formats import alpaca_prompt

    assert_learned_and_generates(run_dir, alpaca_prompt(pairs[0][0], ""))
