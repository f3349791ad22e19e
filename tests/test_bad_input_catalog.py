"""The bad-input catalogue (issues 6 and 24): what `craken train`, `--resume`, `ckpt`, `plan`, `doctor`,
`report` and `cluster` get wrong in practice (flags, run folders and `--force`, model folders, data
files, numbers, configuration files, checkpoints), through the real CLI, all caught before any
process is launched (a case that needs workers to be caught is a defect, not a slow test).

Every case exits 2 with exactly one `craken: ...` line (or one usage error from the parser) that
names the input and what to do, no traceback, nothing on stdout, and nothing written or deleted:
the whole working folder (where every input of the case lives) is snapshotted before and after.

Configuration-level inputs (craken.yaml, CRAKEN_* variables, imported DeepSpeed JSON and accelerate
YAML, `--set`, cross-field rules) are in tests/test_bad_inputs.py and not repeated here; the two
files together make the catalog (more than 30 cases each).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

RUN = "run"


@dataclass
class Case:
    args: list[str]  # after `craken`
    needles: list[str]  # all must be in the message
    setup: Callable[[Path], None] | None = None  # builds the inputs inside the working folder
    parser_error: bool = False  # rejected by the flag parser (Typer/click usage error)
    problems: int = 1  # > 1: one message listing that many problems (each its own line under the title)
    doctor: bool = False  # `craken doctor`: its report on stdout, with exactly one FAIL line


def train(*args: str) -> list[str]:
    return ["train", "--output-dir", RUN, "--num-processes", "2", *args]


def write(rel: str, content: str | bytes) -> Callable[[Path], None]:
    def make(root: Path) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)

    return make


def both(*makers: Callable[[Path], None]) -> Callable[[Path], None]:
    def make(root: Path) -> None:
        for m in makers:
            m(root)

    return make


def ckpt(step: int = 4, world: int = 2, seal: bool = True, run: str = RUN, state: str | None = None,
         shards: bool = True, truncate: bool = False, universal: bool = False) -> Callable[[Path], None]:
    """A checkpoint folder as `craken train` leaves it (fake shard bytes: the cases fail before loading)."""

    def make(root: Path) -> None:
        from craken_cli.train import checkpoint

        path = root / run / "checkpoints" / f"step_{step:08d}"
        path.mkdir(parents=True)
        if shards:
            (path / "pytorch_model").mkdir()
            (path / "pytorch_model" / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 64)
        (path / "random_states_0.pkl").write_bytes(b"\0" * 8)
        (root / run / "run.yaml").write_text("version: 1\n")
        if seal:
            checkpoint.write_state(path, checkpoint.TrainState(step=step, world_size=world, universal=universal))
            (path.parent / "latest").write_text(path.name)
        if state is not None:
            (path / checkpoint.STATE_FILE).write_text(state)
        if truncate:
            (path / "pytorch_model" / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 10)

    return make


def model_dir(config: bool = True, tokenizer: bool = True) -> Callable[[Path], None]:
    def make(root: Path) -> None:
        folder = root / "mymodel"
        folder.mkdir()
        if config:
            (folder / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 256}))
        if tokenizer:
            (folder / "tokenizer.json").write_text("{}")

    return make


CKPT4 = f"{RUN}/checkpoints/step_00000004"

CASES: dict[str, Case] = {
    # --resume
    "resume-auto-without-checkpoints": Case(train("--resume", "auto"), ["--resume auto", "no complete checkpoint",
                                                                        "--force"]),
    "resume-auto-only-partial": Case(train("--resume", "auto"), ["no complete checkpoint"], ckpt(seal=False)),
    "resume-missing-folder": Case(train("--resume", "nowhere/step_00000004"), ["--resume nowhere", "no such",
                                                                               "craken ckpt list"]),
    "resume-a-file": Case(train("--resume", "notes.txt"), ["--resume notes.txt", "no such checkpoint folder"],
                          write("notes.txt", "hello\n")),
    "resume-partial-checkpoint": Case(train("--resume", CKPT4), ["partial or corrupt", "no craken_state.json",
                                                                 "earlier one"], ckpt(seal=False)),
    "resume-corrupt-state-file": Case(train("--resume", CKPT4), ["craken_state.json is unreadable"],
                                      ckpt(state="{not json")),
    "resume-state-without-step": Case(train("--resume", CKPT4), ["craken_state.json has no step"],
                                      ckpt(state=json.dumps({"epoch": 1}))),
    "resume-truncated-shard": Case(train("--resume", CKPT4), ["mp_rank_00_model_states.pt has 10 bytes",
                                                              "64 were written"], ckpt(truncate=True)),
    "resume-checkpoint-without-shards": Case(train("--resume", CKPT4), ["no pytorch_model/ folder"],
                                             ckpt(shards=False, state=json.dumps({"step": 4}))),
    "resume-run-folder-without-checkpoints": Case(train("--resume", "old"), ["--resume old",
                                                                             "no complete checkpoint"],
                                                  write("old/checkpoints/latest", "step_00000008")),
    "resume-other-process-count-unconvertible": Case(
        train("--num-processes", "1", "--resume", CKPT4),
        ["saved by 2 processes", "this run has 1", "ds_to_universal failed", "craken ckpt convert",
         "--num-processes 2"], ckpt(world=2)),
    # run folder
    "run-folder-already-holds-a-run": Case(train(), ["already holds a run", "no checkpoint", "--force"],
                                           write(f"{RUN}/metrics.jsonl", "{}\n")),
    "run-folder-is-a-file": Case(train(), ["is a file", "--output-dir"], write(RUN, "x")),
    # model
    "model-folder-missing": Case(train("--model", "./nomodel"), ["--model ./nomodel", "no such folder"]),
    "model-folder-without-config": Case(train("--model", "./mymodel"), ["no config.json", "save_pretrained"],
                                        model_dir(config=False)),
    "model-folder-without-tokenizer": Case(train("--model", "./mymodel"), ["no tokenizer files", "--tokenizer"],
                                           model_dir(tokenizer=False)),
    "tokenizer-folder-missing": Case(train("--tokenizer", "./notok"), ["--tokenizer ./notok", "no such folder"]),
    "seq-len-beyond-model": Case(train("--model", "./mymodel", "--seq-len", "1024"),
                                 ["--seq-len 1024", "maximum of 256", "--seq-len 256"], model_dir()),
    "unknown-builtin-model": Case(train("--model", "builtin:huge"), ["builtin:huge", "builtin:tiny"]),
    "flash-attention-on-cpu": Case(train("--cpu", "--set", "model.attn_implementation=flash_attention_2"),
                                   ["flash_attention_2 needs CUDA GPUs", "sdpa"]),
    # data
    "data-file-missing": Case(train("--dataset", "./data.jsonl"), ["--dataset ./data.jsonl", "no such file"]),
    "data-unsupported-type": Case(train("--dataset", "data.xml"), ["unsupported file type '.xml'", ".jsonl"],
                                  write("data.xml", "<a/>")),
    "data-file-empty": Case(train("--dataset", "data.jsonl"), ["data set is empty", "add text"],
                            write("data.jsonl", "")),
    "data-wrong-text-column": Case(train("--dataset", "data.jsonl"), ["--text-column 'text'", "content",
                                                                      "set --text-column"],
                                   write("data.jsonl", '{"content": "hello"}\n')),
    "data-malformed-jsonl": Case(train("--dataset", "data.jsonl"), ["cannot be read", "fix the file"],
                                 write("data.jsonl", '{"text": "unterminated\n')),
    "data-folder-without-data-files": Case(train("--dataset", "texts"), ["holds no", ".jsonl"],
                                           write("texts/readme.md", "# notes\n")),
    "split-of-a-local-file": Case(train("--dataset", "data.jsonl", "--set", "data.split=validation"),
                                  ["data.split=validation", "read whole", "--dataset"],
                                  write("data.jsonl", '{"text": "hello"}\n')),
    "unknown-builtin-data": Case(train("--dataset", "builtin:shakespeare"), ["builtin:shakespeare",
                                                                            "builtin:counting"]),
    # flags of training length and checkpointing
    "max-steps-zero": Case(train("--max-steps", "0"), ["train.max_steps", "--max-steps"]),
    "keep-checkpoints-zero": Case(train("--keep-checkpoints", "0"), ["train.keep_checkpoints", "--keep-checkpoints"]),
    "save-every-negative": Case(train("--save-every", "-1"), ["train.save_every", "--save-every"]),
    "seq-len-zero": Case(train("--seq-len", "0"), ["data.seq_len", "--seq-len"]),
    "max-steps-not-a-number": Case(train("--max-steps", "ten"), ["--max-steps", "valid integer"],
                                   parser_error=True),
    # craken ckpt
    "ckpt-list-missing-folder": Case(["ckpt", "list", "nope"], ["nope: no such run folder"]),
    "ckpt-list-not-a-run-folder": Case(["ckpt", "list", "texts"], ["no checkpoints/ folder", "--save-every"],
                                       write("texts/a.txt", "x")),
    "ckpt-export-step-missing": Case(["ckpt", "export", RUN, "--step", "7", "--out", "exp"],
                                     ["--step 7", "no complete checkpoint of that step", "complete: 4"], ckpt()),
    "ckpt-export-only-partial": Case(["ckpt", "export", RUN, "--out", "exp"], ["no complete checkpoint",
                                                                              "craken ckpt list"], ckpt(seal=False)),
    "ckpt-export-out-not-empty": Case(["ckpt", "export", RUN, "--out", "exp"], ["--out exp", "not empty", "--force"],
                                      both(ckpt(), write("exp/keep.txt", "mine"))),
    "ckpt-export-out-is-a-file": Case(["ckpt", "export", RUN, "--out", "exp"], ["--out exp is a file"],
                                      both(ckpt(), write("exp", "x"))),
    "ckpt-export-bad-dtype": Case(["ckpt", "export", RUN, "--out", "exp", "--dtype", "int8"],
                                  ["--dtype int8", "fp32"], ckpt()),
    "ckpt-export-without-model-config": Case(["ckpt", "export", RUN, "--out", "exp"], ["no model config",
                                                                                      "older craken"], ckpt()),
    "ckpt-convert-missing": Case(["ckpt", "convert", "nowhere"], ["nowhere: no such checkpoint folder"]),
    "ckpt-convert-partial": Case(["ckpt", "convert", CKPT4], ["not a complete checkpoint", "no craken_state.json"],
                                 ckpt(seal=False)),
    "ckpt-convert-run-folder": Case(["ckpt", "convert", RUN], ["is a run folder", "checkpoints/step_*"], ckpt()),
    "ckpt-convert-already-universal": Case(["ckpt", "convert", CKPT4], ["already a universal checkpoint"],
                                           ckpt(universal=True)),
    "ckpt-convert-out-not-empty": Case(["ckpt", "convert", CKPT4, "--out", "uni"], ["--out uni", "not empty"],
                                       both(ckpt(), write("uni/x", "x"))),
}


# ---------------------------------------------------------------------------------------------
# Issue 24: what a craken run may clear, models, data, numbers, files, resume. The inputs each case
# breaks start from ones that are accepted (test_the_inputs_the_cases_break_are_accepted).

GOOD_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
               "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "vocab_size": 384}
_TOKENIZER: dict[str, str] = {}


def tokenizer_files() -> dict[str, str]:
    """The built-in tokenizer's files (trained once per test session, well under a second)."""
    if not _TOKENIZER:
        import tempfile

        from craken_cli.train import builtin

        with tempfile.TemporaryDirectory() as tmp:
            builtin.build_tokenizer().save_pretrained(tmp)
            _TOKENIZER.update({p.name: p.read_text() for p in Path(tmp).iterdir() if p.is_file()})
    return _TOKENIZER


def weights(path: Path, vocab: int = 384, hidden: int = 64) -> None:
    """A model.safetensors with the tensors preflight reads (embedding, first attention projection)."""
    import numpy
    from safetensors.numpy import save_file

    rng = numpy.random.default_rng(0)
    save_file({"model.embed_tokens.weight": rng.normal(0, 0.02, (vocab, hidden)).astype(numpy.float32),
               "model.layers.0.self_attn.q_proj.weight": rng.normal(0, 0.02, (hidden, hidden)).astype(numpy.float32)},
              str(path))


def model(config: dict | None = None, drop: tuple[str, ...] = (), raw_config: str | bytes | None = None,
          then: Callable[[Path], None] | None = None, name: str = "mymodel") -> Callable[[Path], None]:
    """A local model folder as save_pretrained writes it (config.json, tokenizer, model.safetensors),
    with config keys changed or dropped, config.json replaced by raw bytes, or the folder changed after."""

    def make(root: Path) -> None:
        folder = root / name
        folder.mkdir()
        cfg = {k: v for k, v in {**GOOD_CONFIG, **(config or {})}.items() if k not in drop}
        text = json.dumps(cfg) if raw_config is None else raw_config
        (folder / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        for file, content in tokenizer_files().items():
            (folder / file).write_text(content)
        weights(folder / "model.safetensors")
        if then:
            then(folder)

    return make


def corrupt_weights(how: str) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        import struct

        path = folder / "model.safetensors"
        data = bytearray(path.read_bytes())
        start = 8 + struct.unpack("<Q", data[:8])[0]
        if how == "truncated":
            data = data[:len(data) // 2]
        elif how == "scrambled":  # the same size, other bytes (what a bad copy or a disk error leaves)
            data[start:] = random.Random(1).randbytes(len(data) - start)
        elif how == "empty":
            data = bytearray()
        elif how == "header-garbage":
            data[8:start] = b"\xff" * (start - 8)
        elif how == "header-length":
            data[:8] = struct.pack("<Q", 1 << 40)
        path.write_bytes(bytes(data))

    return change


def sharded(missing: bool = False, unreadable: bool = False) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                                "lm_head.weight": "model-00002-of-00002.safetensors"}}
        (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
        if not missing:
            weights(folder / "model-00002-of-00002.safetensors")
        (folder / "model.safetensors.index.json").write_text("{not json" if unreadable else json.dumps(index))

    return change


GOOD_LINES = [json.dumps({"text": line}) for line in __import__("craken_cli.train.builtin",
                                                                 fromlist=["x"]).pattern_lines(400)]


def data(name: str, lines: list[str] | None = None, raw: bytes | None = None) -> Callable[[Path], None]:
    content = raw if raw is not None else ("\n".join(GOOD_LINES if lines is None else lines) + "\n").encode()
    return write(name, content)


def deep_bad(line: str, at: int = 5000) -> list[str]:
    """Good records, then one bad line far into the file (the first record alone looks fine)."""
    return (GOOD_LINES * (at // len(GOOD_LINES) + 1))[:at - 1] + [line]


# The state the default run (`train()`: built-in model and data, 2 processes) writes.
DEFAULT_STATE = dict(world=2, zero_stage=1, offload_optimizer="none", seq_len=64, micro_batch=8, global_batch=32,
                     seed=42, precision="bf16")


def resumable(config: dict | None = None, scramble: str | None = None, raw_state: dict | None = None,
              **changes) -> Callable[[Path], None]:
    """A sealed checkpoint of the default run at step 4 (its model config in hf/), one recorded value changed,
    or a file of it scrambled after sealing, or its state file's JSON replaced."""

    def make(root: Path) -> None:
        from craken_cli.train import builtin, checkpoint

        values = {**DEFAULT_STATE, **changes}
        path = root / RUN / "checkpoints" / "step_00000004"
        (path / "pytorch_model").mkdir(parents=True)
        (path / "pytorch_model" / "mp_rank_00_model_states.pt").write_bytes(bytes(range(64)))
        (path / "random_states_0.pkl").write_bytes(b"rng state")
        (path / "hf").mkdir()
        (path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama", **builtin.TINY_CONFIG,
                                                             **(config or {})}))
        state = checkpoint.TrainState(step=4, world_size=values.pop("world"), **values)
        checkpoint.write_state(path, state)
        (path.parent / "latest").write_text(path.name)
        if scramble:
            (path / scramble).write_bytes(bytes(reversed((path / scramble).read_bytes())))
        if raw_state is not None:
            saved = json.loads((path / checkpoint.STATE_FILE).read_text())
            (path / checkpoint.STATE_FILE).write_text(json.dumps({**saved, **raw_state}))

    return make


USER_FILES = both(write("u/report/thesis.tex", "\\documentclass{article}\n"), write("u/final/draft.txt", "draft\n"),
                  write("u/checkpoints/vm.txt", "notes\n"))
SHARD = "pytorch_model/mp_rank_00_model_states.pt"
RESUME = ("--resume", "auto")
M = ("--model", "./mymodel")


def yaml_file(text: str, name: str = "c.yaml") -> Callable[[Path], None]:
    return write(name, text)


CASES.update({
    # --- 1. --force and --out never clear or replace what craken did not write
    "force-folder-of-user-files": Case(["train", "--output-dir", "u", "--force"],
                                       ["--force: u is not a craken run folder", "checkpoints, final, report",
                                        "removes only what it wrote"], USER_FILES),
    "force-folder-with-own-metrics-file": Case(["train", "--output-dir", "u", "--force"],
                                               ["not a craken run folder", "metrics.jsonl"],
                                               write("u/metrics.jsonl", "my own log\n")),
    "force-folder-with-run-yaml-not-craken": Case(["train", "--output-dir", "u", "--force"],
                                                  ["not a craken run folder", "run.yaml"],
                                                  write("u/run.yaml", "mine: 1\n")),
    "force-filesystem-root": Case(["train", "--output-dir", "/", "--force"],
                                  ["--force would clear /", "filesystem root", "--output-dir runs/NAME"]),
    "force-top-level-folder": Case(["train", "--output-dir", "/etc", "--force"], ["--force would clear /etc",
                                                                                 "top-level folder"]),
    "force-home-folder": Case(["train", "--output-dir", "~", "--force"], ["your home folder",
                                                                         "--output-dir runs/NAME"]),
    "force-working-folder": Case(["train", "--output-dir", ".", "--force"], ["--force would clear .",
                                                                            "the working folder"]),
    "force-folder-above-working-folder": Case(["train", "--output-dir", "..", "--force"],
                                              ["--force would clear ..", "a folder above the working folder"]),
    "force-empty-output-dir": Case(["train", "--output-dir", "", "--force"],
                                   ["--output-dir '' is the working folder", "the working folder"], problems=2),
    "force-name-leaving-runs": Case(["train", "--name", "../..", "--force"],
                                    ["--name ../..", "one folder name under runs/", "--force would clear"], problems=2),
    "name-with-a-slash": Case(["train", "--name", "a/b"], ["--name a/b", "choose another --name"]),
    "force-run-folder-is-a-file": Case(train("--force"), ["is a file", "--output-dir"], write(RUN, "x")),
    "export-out-is-the-run": Case(["ckpt", "export", RUN, "--out", RUN, "--force"],
                                  ["--out run is", "which this command reads", "never replaces it"], resumable()),
    "export-out-is-the-checkpoints-folder": Case(["ckpt", "export", RUN, "--out", f"{RUN}/checkpoints", "--force"],
                                                 ["--out run/checkpoints", "choose a new folder"], resumable()),
    "export-out-is-the-working-folder": Case(["ckpt", "export", RUN, "--out", ".", "--force"],
                                             ["--out . is the working folder", "never replaces it"], resumable()),
    "export-out-above-the-working-folder": Case(["ckpt", "export", RUN, "--out", "..", "--force"],
                                                ["--out ..", "a folder above the working folder"], resumable()),
    "export-out-home": Case(["ckpt", "export", RUN, "--out", "~", "--force"], ["your home folder"], resumable()),
    "export-force-over-user-folder": Case(["ckpt", "export", RUN, "--out", "exp", "--force"],
                                          ["--out exp holds files craken did not write", "choose a new folder"],
                                          both(resumable(), write("exp/mine.txt", "mine"))),
    "convert-out-is-the-run": Case(["ckpt", "convert", CKPT4, "--out", RUN, "--force"],
                                   ["--out run is a folder holding", "which this command reads"], resumable()),
    "convert-out-is-the-working-folder": Case(["ckpt", "convert", CKPT4, "--out", ".", "--force"],
                                              ["--out . is the working folder"], resumable()),
    "convert-force-over-user-folder": Case(["ckpt", "convert", CKPT4, "--out", "uni", "--force"],
                                           ["--out uni holds files craken did not write"],
                                           both(resumable(), write("uni/mine.txt", "mine"))),
    # --- 2. model folders, checked from their files before any process starts
    "config-json-cut-short": Case(train(*M), ["--model ./mymodel", "config.json is not valid JSON",
                                              "save_pretrained"], model(raw_config='{"model_type": "llama",')),
    "config-json-binary": Case(train(*M), ["config.json is not text", "save_pretrained"],
                               model(raw_config=b"\xff\xfe\x00\x01")),
    "config-json-a-list": Case(train(*M), ["config.json holds no JSON object", "save_pretrained"],
                               model(raw_config="[1, 2]")),
    "config-without-model-type": Case(train(*M), ["config.json has no model_type", "save_pretrained"],
                                      model(drop=("model_type",))),
    "config-unknown-model-type": Case(train(*M), ["model_type 'blarg'", "not known to the installed transformers",
                                                  "upgrade transformers"], model({"model_type": "blarg"})),
    "config-remote-code-without-flag": Case(train(*M), ["model_type 'mymodel'", "--trust-remote-code"],
                                            model({"model_type": "mymodel", "auto_map": {
                                                "AutoModelForCausalLM": "modeling_mine.MyModel"}})),
    "config-t5": Case(train(*M), ["a 't5' model is not a causal language model", "decoder-only"],
                      model({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]})),
    "config-vit": Case(train(*M), ["a 'vit' model is not a causal language model"], model({"model_type": "vit"})),
    "heads-not-dividing-hidden": Case(train(*M), ["num_attention_heads 3 does not divide hidden_size 64",
                                                  "choose a head count"],
                                      model({"num_attention_heads": 3, "num_key_value_heads": 1})),
    "kv-heads-not-dividing-heads": Case(train(*M), ["num_key_value_heads 3 does not divide num_attention_heads 4",
                                                    "choose a divisor"], model({"num_key_value_heads": 3})),
    "hidden-size-zero": Case(train(*M), ["hidden_size in config.json is 0", "positive whole number"],
                             model({"hidden_size": 0})),
    "hidden-size-quoted": Case(train(*M), ["hidden_size in config.json is '64'", "positive whole number"],
                               model({"hidden_size": "64"})),
    "layers-negative": Case(train(*M), ["num_hidden_layers in config.json is -2"], model({"num_hidden_layers": -2})),
    "vocab-smaller-than-tokenizer": Case(train(*M), ["vocab_size 100 in config.json is smaller than the 384 tokens",
                                                     "set vocab_size to 384 or more"], model({"vocab_size": 100})),
    "vocab-other-than-weights": Case(train(*M), ["vocab_size 500", "embedding (model.embed_tokens.weight) 384 rows",
                                                 "restore the model's own config.json"], model({"vocab_size": 500})),
    "hidden-other-than-weights": Case(train(*M), ["hidden_size 128", "q_proj.weight is 64 x 64",
                                                  "restore the model's own config.json"],
                                      model({"hidden_size": 128})),
    "weights-truncated": Case(train(*M), ["model.safetensors has", "the file is truncated", "download it again"],
                              model(then=corrupt_weights("truncated"))),
    "weights-scrambled-same-size": Case(train(*M), ["model.safetensors", "NaN/Inf bit patterns", "scrambled"],
                                        model(then=corrupt_weights("scrambled"))),
    "weights-empty-file": Case(train(*M), ["model.safetensors is truncated (0 bytes)", "download it again"],
                               model(then=corrupt_weights("empty"))),
    "weights-header-garbage": Case(train(*M), ["model.safetensors: its header is unreadable", "download it again"],
                                   model(then=corrupt_weights("header-garbage"))),
    "weights-header-length-beyond-file": Case(train(*M), ["its header is unreadable (length 1099511627776",
                                                          "truncated or not safetensors"],
                                              model(then=corrupt_weights("header-length"))),
    "weights-index-names-missing-shard": Case(train(*M), ["model.safetensors.index.json names",
                                                          "model-00002-of-00002.safetensors", "copy the missing"],
                                              model(then=sharded(missing=True))),
    "weights-index-unreadable": Case(train(*M), ["model.safetensors.index.json is unreadable"],
                                     model(then=sharded(unreadable=True))),
    "tokenizer-json-cut-short": Case(train(*M), ["tokenizer.json is not a JSON object", "save_pretrained"],
                                     model(then=lambda f: (f / "tokenizer.json").write_text('{"model": {'))),
    "tokenizer-folder-is-a-file": Case(train("--tokenizer", "./tok.json"), ["--tokenizer ./tok.json",
                                                                            "no such folder"],
                                       write("tok.json", "{}")),
    "seq-len-beyond-the-model-folder": Case(train(*M, "--seq-len", "512"), ["--seq-len 512", "maximum of 256"],
                                            model()),
    "doctor-model-invalid-config": Case(["doctor", "--model", "./mymodel"], ["config.json is not valid JSON",
                                                                            "fix:"],
                                        model(raw_config="{oops"), doctor=True),
    "doctor-model-config-a-list": Case(["doctor", "--model", "./mymodel"], ["config.json holds no JSON object"],
                                       model(raw_config="[1, 2]"), doctor=True),
    "doctor-model-t5": Case(["doctor", "--model", "./mymodel"], ["not a causal language model"],
                            model({"model_type": "t5"}), doctor=True),
    "doctor-model-scrambled-weights": Case(["doctor", "--model", "./mymodel"], ["NaN/Inf bit patterns"],
                                           model(then=corrupt_weights("scrambled")), doctor=True),
    "plan-unknown-model-type": Case(["plan", *M, "--gpus", "1", "--gpu-memory", "80GiB"],
                                    ["model_type 'blarg'", "upgrade transformers"], model({"model_type": "blarg"})),
    "plan-t5": Case(["plan", *M, "--gpus", "1", "--gpu-memory", "80GiB"], ["'t5'", "causal LM"],
                    model({"model_type": "t5"})),
    "plan-config-not-json": Case(["plan", *M, "--gpus", "1", "--gpu-memory", "80GiB"],
                                 ["config.json is not valid JSON", "save_pretrained"], model(raw_config="{oops")),
    "plan-config-binary": Case(["plan", *M, "--gpus", "1", "--gpu-memory", "80GiB"],
                               ["config.json is not valid JSON", "save_pretrained"], model(raw_config=b"\xff\xfe\x00")),
    "plan-config-a-list": Case(["plan", *M, "--gpus", "1", "--gpu-memory", "80GiB"],
                               ["config.json holds no JSON object"], model(raw_config="[1]")),
    # --- 2. data files: encoding, corruption, size (formats are tests/test_data*.py's)
    "data-binary-text-file": Case(train("--dataset", "d.txt"), ["--dataset d.txt", "a binary file"],
                                  data("d.txt", raw=bytes(range(256)) * 4)),
    "data-nul-bytes-in-text": Case(train("--dataset", "d.txt"), ["line 3 holds NUL bytes", "give a text file"],
                                   data("d.txt", raw=b"one\ntwo\nthr\x00ee\n")),
    "data-latin1-text": Case(train("--dataset", "d.txt"), ["line 2 is not UTF-8", "latin-1", "iconv"],
                             data("d.txt", raw="first line\ncaf\xe9 au lait\n".encode("latin-1"))),
    "data-latin1-deep-in-jsonl": Case(train("--dataset", "d.jsonl"), ["line 5000 is not UTF-8", "convert it"],
                                      data("d.jsonl", raw=("\n".join(deep_bad("x")[:-1]) + "\n").encode()
                                           + json.dumps({"text": "caf\xe9"}, ensure_ascii=False).encode("latin-1"))),
    "data-latin1-csv": Case(train("--dataset", "d.csv"), ["--dataset d.csv", "not UTF-8"],
                            data("d.csv", raw="text\ncaf\xe9\n".encode("latin-1"))),
    "data-utf16-file": Case(train("--dataset", "d.txt"), ["not UTF-8"], data("d.txt", raw="hello\n".encode("utf-16"))),
    "data-bad-line-deep-in-jsonl": Case(train("--dataset", "d.jsonl"), ["line 5000 is not valid JSON",
                                                                        "fix or remove that line"],
                                        data("d.jsonl", deep_bad('{"text": "cut'))),
    "data-number-as-text": Case(train("--dataset", "d.jsonl"), ["line 5000: 'text' is 5, not a string"],
                                data("d.jsonl", deep_bad('{"text": 5}'))),
    "data-null-as-text": Case(train("--dataset", "d.jsonl"), ["line 3: 'text' is null, not a string"],
                              data("d.jsonl", deep_bad('{"text": null}', at=3))),
    "data-list-as-text": Case(train("--dataset", "d.jsonl"), ["'text' is [\"a\", \"b\"], not a string"],
                              data("d.jsonl", deep_bad('{"text": ["a", "b"]}', at=50))),
    "data-record-not-an-object": Case(train("--dataset", "d.jsonl"), ["line 7: a record is list",
                                                                      "one object with a 'text' field"],
                                      data("d.jsonl", deep_bad('["text", "x"]', at=7))),
    "data-record-without-the-column": Case(train("--dataset", "d.jsonl"), ["line 9: the record has no 'text' field"],
                                           data("d.jsonl", deep_bad('{"body": "x"}', at=9))),
    "data-json-array-non-string": Case(train("--dataset", "d.json"), ["record 3: 'text' is 1.5, not a string"],
                                       data("d.json", raw=json.dumps([{"text": "a"}, {"text": "b"},
                                                                      {"text": 1.5}]).encode())),
    "data-csv-200kB-header": Case(train("--dataset", "d.csv"), ["--text-column 'text' is not a column of d.csv",
                                                                "(20000 in all)", "set --text-column"],
                                  data("d.csv", raw=(",".join(f"column{i}" for i in range(20000)) + "\n"
                                                     + ",".join("x" * 20000) + "\n").encode())),
    "data-mixed-formats-in-a-folder": Case(train("--dataset", "texts"), ["the folder mixes .jsonl, .txt",
                                                                         "keep one format"],
                                           both(data("texts/a.jsonl"), write("texts/b.txt", "hello\n"))),
    "data-too-little-for-one-block": Case(train("--dataset", "d.jsonl"), ["0 training blocks of 64 tokens",
                                                                          "add data"],
                                          data("d.jsonl", ['{"text": "hi"}'])),
    "data-too-little-for-the-micro-batch": Case(train("--dataset", "d.jsonl", "--micro-batch", "512"),
                                                ["--micro-batch 512 needs 1024 training blocks", "use --micro-batch"],
                                                data("d.jsonl")),
    "builtin-data-too-little-for-the-micro-batch": Case(train("--micro-batch", "512"),
                                                        ["--dataset builtin:counting", "--micro-batch 512 needs 1024",
                                                         "use --micro-batch"]),
    "data-blank-lines-only": Case(train("--dataset", "d.txt"), ["training blocks", "add data"],
                                  data("d.txt", raw=b"\n \n\n")),
    # --- 2/7. numbers no run can use
    "seed-negative": Case(train("--seed", "-1"), ["train.seed = -1", "--seed"]),
    "seed-2-to-the-40": Case(train("--seed", str(2**40)), ["train.seed = 1099511627776", "less than 4294967296"]),
    "lr-inf-in-yaml": Case(train("--config", "c.yaml"), ["optimizer.lr = inf", "finite", "--lr"],
                           yaml_file("optimizer:\n  lr: .inf\n")),
    "lr-nan-in-yaml": Case(train("--config", "c.yaml"), ["optimizer.lr = nan", "finite"],
                           yaml_file("optimizer:\n  lr: .nan\n")),
    "lr-negative": Case(train("--lr", "-1"), ["optimizer.lr = -1.0", "greater than 0", "--lr"]),
    "eps-inf-in-yaml": Case(train("--config", "c.yaml"), ["optimizer.eps = inf", "finite"],
                            yaml_file("optimizer:\n  eps: .inf\n")),
    "weight-decay-inf": Case(train("--set", "optimizer.weight_decay=.inf"), ["optimizer.weight_decay = inf",
                                                                             "finite"]),
    "beta-inf": Case(train("--set", "optimizer.betas=[0.9, .inf]"), ["optimizer.betas", "finite"]),
    "clip-nan": Case(train("--set", "optimizer.clip=.nan"), ["optimizer.clip = nan", "--clip"]),
    "bucket-1e40": Case(train("--set", "zero.reduce_bucket_size=1e40"), ["zero.reduce_bucket_size = 1e+40",
                                                                          "less than or equal to"]),
    "allgather-bucket-negative": Case(train("--set", "zero.allgather_bucket_size=-5"),
                                      ["zero.allgather_bucket_size = -5"]),
    "warmup-negative": Case(train("--set", "schedule.warmup_steps=-1"), ["schedule.warmup_steps = -1"]),
    "min-lr-ratio-above-one": Case(train("--set", "schedule.min_lr_ratio=2"), ["schedule.min_lr_ratio = 2",
                                                                               "less than or equal to 1"]),
    "eval-fraction-one": Case(train("--set", "data.eval_fraction=1.5"), ["data.eval_fraction"]),
    "clip-infinity-in-ds-json": Case(["config", "validate", "ds.json"], ["optimizer.clip = inf", "--clip"],
                                     write("ds.json", '{"train_micro_batch_size_per_gpu": 4, '
                                                      '"gradient_accumulation_steps": 1, "bf16": {"enabled": true}, '
                                                      '"gradient_clipping": Infinity}')),
    # --- 7. configuration files
    "yaml-nested-5000-deep": Case(train("--config", "c.yaml"), ["c.yaml is nested too deeply", "flatten it"],
                                  yaml_file("a: " + "[" * 5000 + "]" * 5000 + "\n")),
    "json-nested-5000-deep": Case(["config", "validate", "ds.json"], ["ds.json is nested too deeply"],
                                  write("ds.json", '{"a": ' + "[" * 5000 + "]" * 5000 + "}")),
    "duplicate-key-in-yaml": Case(train("--config", "c.yaml"), ["duplicate key 'zero' (first at line 1)",
                                                                "keep one of them"],
                                  yaml_file("zero:\n  stage: 2\nzero:\n  stage: 3\n")),
    "duplicate-nested-key-in-yaml": Case(train("--config", "c.yaml"), ["duplicate key 'lr'", "keep one of them"],
                                         yaml_file("optimizer:\n  lr: 1.0e-3\n  lr: 1.0e-4\n")),
    "duplicate-key-in-craken-yaml": Case(train(), ["craken.yaml", "duplicate key 'seed'"],
                                         write("craken.yaml", "train:\n  seed: 1\n  seed: 2\n")),
    "duplicate-key-in-ds-json": Case(["config", "validate", "ds.json"], ["duplicate key 'train_batch_size'",
                                                                         "keep one of them"],
                                     write("ds.json", '{"train_batch_size": 8, "train_batch_size": 16}')),
    "craken-yaml-is-a-folder": Case(train(), ["craken.yaml is a folder", "rename it"], write("craken.yaml/x", "")),
    "list-typed-section-in-ds-json": Case(train("--config", "ds.json"), ["ds.json", "zero_optimization is a list ([2])",
                                                                         "a mapping for a section"],
                                          write("ds.json", json.dumps({"train_micro_batch_size_per_gpu": 4,
                                                                       "zero_optimization": [2]}))),
    "list-typed-batch-in-ds-json": Case(["config", "validate", "ds.json"], ["ds.json", "train_batch_size is a list ([8])",
                                                                                  "give a number"],
                                        write("ds.json", json.dumps({"train_batch_size": [8],
                                                                     "train_micro_batch_size_per_gpu": 4}))),
    "ds-json-a-list": Case(train("--config", "ds.json"), ["ds.json: expected a mapping", "found list"],
                           write("ds.json", "[1, 2]")),
    "config-not-yaml-or-json-suffix-binary": Case(train("--config", "c.yaml"), ["c.yaml", "cannot be read"],
                                                  write("c.yaml", b"\xff\xfe\x00")),
    # --- 7. other commands
    "slurm-config-with-newline": Case(["cluster", "slurm", "--nodes", "2", "--gpus-per-node", "8", "--config",
                                       "ok.yaml\nrm -rf ~"], ["a newline or control character", "rename the file"],
                                      write("ok.yaml", "version: 1\n")),
    "slurm-config-with-carriage-return": Case(["cluster", "slurm", "--nodes", "2", "--gpus-per-node", "8",
                                               "--config", "ok.yaml\r"], ["newline or control character"]),
    "report-non-numeric-loss": Case(["report", RUN], ["metrics.jsonl:1: loss is 'abc', not a number",
                                                      "fix or remove that line"],
                                    write(f"{RUN}/metrics.jsonl", '{"step": 1, "loss": "abc"}\n')),
    "report-out-is-a-file": Case(["report", RUN, "--out", "plots"], ["--out plots is a file", "give a folder"],
                                 both(write(f"{RUN}/metrics.jsonl", '{"step": 1, "loss": 2.0}\n'),
                                      write("plots", "x"))),
    "report-line-a-list": Case(["report", RUN], ["metrics.jsonl:1 is not a JSON object", "remove the damaged line"],
                               write(f"{RUN}/metrics.jsonl", "[1, 2]\n")),
    "report-step-a-string": Case(["report", RUN], ["has no integer `step`", "docs/metrics-format.md"],
                                 write(f"{RUN}/metrics.jsonl", '{"step": "x", "loss": 1.0}\n')),
    "report-binary-metrics": Case(["report", RUN], ["metrics.jsonl cannot be read"],
                                  write(f"{RUN}/metrics.jsonl", b"\x00\xff\x01")),
    "report-without-metrics": Case(["report", RUN], ["metrics.jsonl does not exist", "Pass the run folder"],
                                   write(f"{RUN}/notes.txt", "x")),
    "dry-run-into-proc": Case(["train", "--dry-run", "--output-dir", "/proc/forbidden"],
                              ["run folder /proc/forbidden cannot be created or written", "choose another --output-dir"]),
    "run-into-proc": Case(train("--output-dir", "/proc/forbidden"), ["/proc/forbidden cannot be created"]),
    # --- 2/3. resume
    "resume-other-model-shape": Case(train(*RESUME), ["it holds a model of another shape", "hidden_size 128",
                                                      "resume with the --model it was trained with"],
                                     resumable(config={"hidden_size": 128})),
    "resume-other-layer-count": Case(train(*RESUME), ["num_hidden_layers 4 (this model: 2)"],
                                     resumable(config={"num_hidden_layers": 4})),
    "resume-other-seq-len": Case(train(*RESUME, "--seq-len", "32"), ["trained with --seq-len 64, this run has 32",
                                                                     "resume with --seq-len 64"], resumable()),
    "resume-other-seed": Case(train(*RESUME, "--seed", "7"), ["trained with --seed 42", "resume with --seed 42"],
                              resumable()),
    "resume-other-grad-accum": Case(train(*RESUME, "--grad-accum", "4"),
                                    ["--global-batch 32, this run has 64", "--grad-accum", "resume with --global-batch 32"],
                                    resumable()),
    "resume-fewer-processes-halve-the-batch": Case(train("--num-processes", "1", *RESUME),
                                                   ["--global-batch 32, this run has 16", "--num-processes",
                                                    "resume with --global-batch 32"], resumable()),
    "resume-other-micro-batch-not-dividing": Case(train(*RESUME, "--micro-batch", "3", "--global-batch", "30"),
                                                  ["--global-batch 32"], resumable()),
    "resume-micro-batch-data-position-not-whole": Case(
        train(*RESUME, "--micro-batch", "16", "--grad-accum", "1"),
        ["--micro-batch 8", "no whole number of --micro-batch 16", "resume with --micro-batch 8"],
        resumable(batch_in_epoch=3)),
    "resume-bf16-with-fp32": Case(train(*RESUME, "--precision", "fp32"),
                                  ["trained with --precision bf16, this run has fp32", "resume with --precision bf16"],
                                  resumable()),
    "resume-zero1-checkpoint-at-zero3": Case(train(*RESUME, "--set", "zero.stage=3"),
                                             ["saved at ZeRO-1/2 without optimizer offload", "trains at ZeRO-3 without",
                                              "resume with --zero 1 --offload-optimizer none"], resumable()),
    "resume-offload-checkpoint-without-offload": Case(train(*RESUME), ["with optimizer offload",
                                                                       "--offload-optimizer cpu"],
                                                      resumable(zero_stage=2, offload_optimizer="cpu")),
    "resume-state-step-a-string": Case(train(*RESUME), ["no complete checkpoint", "craken_state.json: step is '4'"],
                                       resumable(raw_state={"step": "4"})),
    "resume-state-world-negative": Case(train(*RESUME), ["world_size is -2"], resumable(raw_state={"world_size": -2})),
    "resume-state-loss-sums-strings": Case(train(*RESUME), ["loss_sums is ['x']"],
                                           resumable(raw_state={"loss_sums": ["x"]})),
    "resume-state-lr-infinite": Case(train(*RESUME), ["craken_state.json: lr is"],
                                     resumable(raw_state={"lr": 1e400})),
    "resume-state-a-list": Case(train("--resume", CKPT4), ["craken_state.json"], ckpt(state="[4]")),
    "resume-scrambled-same-size-shard": Case(train("--resume", CKPT4), ["checksum differs", "earlier one"],
                                             resumable(scramble=SHARD)),
    "resume-auto-only-scrambled": Case(train(*RESUME), ["--resume auto", "no complete checkpoint", "checksum differs",
                                                        "--force"],
                                       resumable(scramble=SHARD)),
    "resume-stale-rng-file": Case(train("--resume", CKPT4), ["random_states_0.pkl", "checksum differs"],
                                  resumable(scramble="random_states_0.pkl")),
    "resume-manifest-wrong-type": Case(train("--resume", CKPT4), ["craken_state.json"],
                                       resumable(raw_state={"sha256": ["x"]})),
    # --- 4. checkpoints checked by content
    "export-scrambled-checkpoint": Case(["ckpt", "export", RUN, "--step", "4", "--out", "exp"],
                                        ["step_00000004 is not a complete checkpoint", "checksum differs", "earlier one"],
                                        resumable(scramble=SHARD)),
    "export-a-scrambled-checkpoint-folder": Case(["ckpt", "export", CKPT4, "--out", "exp"],
                                                 ["not a complete checkpoint", "checksum differs"],
                                                 resumable(scramble=SHARD)),
    "convert-scrambled-checkpoint": Case(["ckpt", "convert", CKPT4], ["not a complete checkpoint", "checksum differs"],
                                         resumable(scramble=SHARD)),
})


PLAN1 = ("--gpus", "1", "--gpu-memory", "80GiB")

CASES.update({
    # --- found in a first-contact audit (each failed before its fix)
    "plan-model-folder-missing": Case(["plan", "--model", "./nomodel", *PLAN1],
                                      ["--model ./nomodel: no such folder", "a hub id"]),  # was hub id-syntax talk
    "plan-model-nested-missing": Case(["plan", "--model", "a/b/c", *PLAN1], ["--model a/b/c: no such folder"]),
    "plan-model-a-file": Case(["plan", "--model", "./weights.bin", *PLAN1], ["--model ./weights.bin: is a file"],
                              write("weights.bin", b"\0" * 8)),
    "plan-gpu-memory-zero": Case(["plan", "--gpus", "1", "--gpu-memory", "0GiB"],  # was exit 0, "nothing fits"
                                 ["--gpu-memory '0GiB' is no memory", "80GiB"]),
    "plan-cpu-memory-zero": Case(["plan", *PLAN1, "--cpu-memory", "0"], ["--cpu-memory '0' is no memory"]),
    "doctor-model-folder-missing": Case(["doctor", "--model", "./nomodel"], ["--model ./nomodel: no such folder"],
                                        doctor=True),  # was "all checks passed"
    "tokenizer-folder-without-tokenizer-files": Case(train("--tokenizer", "./tok"),  # workers blamed sentencepiece
                                                     ["--tokenizer ./tok: no tokenizer files inside",
                                                      "tokenizer.json", "save_pretrained"], write("tok/notes.txt", "x")),
    "tokenizer-empty-folder-beside-a-model": Case(train(*M, "--tokenizer", "./tok"), ["--tokenizer ./tok: no tokenizer"],
                                                  both(model(), write("tok/readme.md", "x"))),
    "model-is-a-file": Case(train("--model", "./mymodel/config.json"), ["--model ./mymodel/config.json: is a file"],
                            model()),
    "ckpt-list-the-checkpoints-folder": Case(["ckpt", "list", f"{RUN}/checkpoints"],
                                             ["run/checkpoints is inside the run folder run",
                                              "give the run folder itself (run)"], ckpt()),
    "ckpt-list-a-checkpoint-folder": Case(["ckpt", "list", CKPT4], ["is inside the run folder run"], ckpt()),
    "doctor-model-folder-without-config": Case(["doctor", "--model", "./mymodel"], ["no config.json inside"],
                                               model_dir(config=False), doctor=True),
})


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file (mtime, size) and folder under root. A folder's own mtime is left out: a failed
    conversion creates and removes its temporary folder, which leaves the content as it was."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = ("d",) if p.is_dir() else (st.st_mtime_ns, st.st_size)
    return out


def assert_refused_unwritten(craken, workdir: Path, command: list[str], named: str) -> None:
    """`craken COMMAND` exits 2 with `named` in its output, no traceback, and writes nothing under workdir."""
    before = snapshot(workdir)
    result = craken(*command)
    assert result.code == 2 and "Traceback" not in result.output, result.output
    assert named in result.output
    assert snapshot(workdir) == before


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, craken, workdir):
    case = CASES[name]
    if case.setup:
        case.setup(workdir)
    before = snapshot(workdir)

    result = craken(*case.args)

    assert result.code == 2, result.output
    assert "Traceback" not in result.output
    if case.doctor:  # the model's one FAIL line (a port another run holds would be a FAIL of its own)
        fails = [line for line in result.out.splitlines() if line.strip().startswith("FAIL  model files")]
        assert len(fails) == 1 and "verdict: FAIL" in result.out, result.out
        lines = result.out.splitlines()
        message = fails[0] + "\n" + lines[lines.index(fails[0]) + 1]  # with its fix line
    else:
        assert result.out == ""
        message = result.err.strip()
    if case.parser_error:
        assert "Invalid value" in message and message.count("Error") == 1, message
    elif case.problems > 1:
        lines = message.splitlines()
        assert lines[0].startswith("craken:") and message.count("craken:") == 1, message
        assert len(lines) == 1 + case.problems and all(line.startswith("  - ") for line in lines[1:]), message
    elif not case.doctor:
        assert message.startswith("craken:") and len(message.splitlines()) == 1, message
        assert message.count("craken:") == 1, message
        assert len(message) < 1000, message  # one readable line, whatever the size of the input
    for needle in case.needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert snapshot(workdir) == before


def test_catalog_is_large_and_distinct():
    assert len(CASES) >= 120
    assert len({(tuple(c.args), c.setup.__qualname__ if c.setup else None, id(c.setup)) for c in CASES.values()}) \
        == len(CASES)


@pytest.mark.parametrize("args, setup", [
    (train(*M, "--dry-run"), model()),
    (train("--dataset", "d.jsonl", "--dry-run"), data("d.jsonl")),
    (train(*RESUME, "--dry-run"), resumable()),
    (["ckpt", "list", RUN], resumable()),
    (["doctor", "--model", "./mymodel"], model()),
    (["plan", *M, "--gpus", "1", "--gpu-memory", "80GiB"], model()),
], ids=["model", "data", "resume", "ckpt-list", "doctor", "plan"])
def test_the_inputs_the_cases_break_are_accepted(args, setup, craken, workdir):
    """Each case changes one thing of an input that passes: the refusal is that change's."""
    setup(workdir)
    result = craken(*args)
    assert result.code in (0, 1, 2) if args[0] == "doctor" else result.code == 0, result.output
    assert "FAIL  model" not in result.out and "Traceback" not in result.output, result.output


def test_offload_run_refuses_a_left_over_op_build_lock(craken, workdir, monkeypatch):
    """With a torch that blocks builds on a lock file's existence, every process of the run waits on
    a left-over one forever and prints nothing."""
    import os
    import time

    from craken_cli.doctor import dsops

    monkeypatch.setattr(dsops, "torch_uses_build_baton", lambda: True)

    lock = workdir / "ext" / "cpu_adam" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    before = snapshot(workdir)
    result = craken(*train("--zero", "2", "--offload-optimizer", "cpu", "--max-steps", "2"),
                    env={"TORCH_EXTENSIONS_DIR": str(workdir / "ext")})
    assert result.code == 2 and "Traceback" not in result.output
    message = result.err.strip()
    assert message.startswith("craken:") and "cpu_adam" in message and "delete it" in message, message
    assert str(lock) in message
    assert snapshot(workdir) == before
    assert craken(*train("--zero", "2", "--offload-optimizer", "none", "--dry-run"),
                  env={"TORCH_EXTENSIONS_DIR": str(workdir / "ext")}).code == 0  # no op, no problem


def test_tracker_without_its_package_is_refused_before_launch(craken, workdir):
    """Accelerate drops a tracker whose package is missing with a debug line only: the run would
    train for hours and log nowhere."""
    import importlib.util

    missing = [t for t in ("wandb", "mlflow") if importlib.util.find_spec(t) is None]
    if not missing:
        pytest.skip("wandb and mlflow are both installed here")
    before = snapshot(workdir)
    result = craken(*train("--report-to", missing[0], "--max-steps", "2"))
    assert result.code == 2 and "Traceback" not in result.output
    message = result.err.strip()
    assert message == (f"craken: cannot start this run: --report-to {missing[0]}: the {missing[0]} package is "
                       f"not installed: pip install {missing[0]}, or use --report-to none"), message
    assert snapshot(workdir) == before


def test_tensorboard_is_satisfied_by_either_writer():
    from craken_cli.launch.preflight import tracker_problems
    from craken_cli.config.spec import RunSpec

    def spec(tracker):
        return RunSpec.model_validate({"logging": {"report_to": tracker}})

    def only(*names):
        return lambda name: object() if name in names else None

    assert tracker_problems(spec("none"), find_spec=only()) == []
    assert tracker_problems(spec("tensorboard"), find_spec=only("tensorboardX")) == []
    assert tracker_problems(spec("tensorboard"), find_spec=only("tensorboard")) == []
    assert "pip install tensorboard" in tracker_problems(spec("tensorboard"), find_spec=only("wandb"))[0]
    assert "pip install mlflow" in tracker_problems(spec("mlflow"), find_spec=only("tensorboard"))[0]


def test_nvme_offload_without_libaio_is_refused_before_launch(craken, workdir):
    """Every process would fail after start-up loading DeepSpeed's async_io op."""
    from craken_cli.doctor.dsops import find_libaio

    _, header, link = find_libaio({})
    if header and link:
        pytest.skip("libaio is installed here")
    (workdir / "nvme").mkdir()
    before = snapshot(workdir)
    result = craken(*train("--zero", "3", "--offload-optimizer", "none", "--offload-param", "nvme",
                           "--nvme-path", "nvme", "--max-steps", "2"))
    assert result.code == 2 and "Traceback" not in result.output
    message = result.err.strip()
    assert message.startswith("craken:") and len(message.splitlines()) == 1, message
    assert "--offload-param nvme" in message and "libaio" in message and "--offload-param cpu" in message
    assert snapshot(workdir) == before


def test_a_machine_of_rank_above_0_joins_the_run_folder_machine_0_set_up(tmp_path):
    """`craken cluster slurm` starts every node in one run folder: machine 1 is refused only by a
    run of its own there, never by machine 0's."""
    from craken_cli.launch.preflight import output_problems

    run = tmp_path / "run"
    run.mkdir()
    for name in ("run.yaml", "metrics.jsonl", "accelerate.yaml"):
        (run / name).write_text("x")
    assert output_problems(run, resume=None, force=False, machine_rank=1) == []
    assert "already holds a run" in output_problems(run, resume=None, force=False, machine_rank=0)[0]
    (run / "metrics-machine1.jsonl").write_text("x")
    assert "already holds a run" in output_problems(run, resume=None, force=False, machine_rank=1)[0]
    assert output_problems(run, resume="auto", force=False, machine_rank=1) == []


def test_pipelined_nvme_optimizer_swap_needs_buffers_for_every_sub_group_it_holds():
    """DeepSpeed's offload config accepts any buffer_count >= 0 with pipeline_read/pipeline_write, so
    craken's DeepSpeed check of the rendered JSON passes; the swapper then runs out of buffers at the
    first step (swap_tensor/pipelined_optimizer_swapper.py)."""
    from deepspeed.runtime.zero.offload_config import DeepSpeedZeroOffloadOptimizerConfig

    from craken_cli.plan.memory import SWAP_BUFFERS_PER_SUB_GROUP, SwapSettings

    parsed = DeepSpeedZeroOffloadOptimizerConfig(device="nvme", nvme_path="/nvme", buffer_count=4, pipeline_read=True,
                                                 pipeline_write=True)
    assert parsed.pipeline and parsed.buffer_count == 4  # no complaint from DeepSpeed itself
    # DeepSpeed's default buffer_count is the non-pipelined swapper's need with Adam
    assert DeepSpeedZeroOffloadOptimizerConfig().buffer_count == SWAP_BUFFERS_PER_SUB_GROUP
    assert SwapSettings().optimizer_buffers_needed == SWAP_BUFFERS_PER_SUB_GROUP
    read = SwapSettings.from_extra({"zero_optimization": {"offload_optimizer": {"pipeline_read": True}}})
    both = SwapSettings.from_extra({"zero_optimization": {"offload_optimizer": {
        "pipeline_read": True, "pipeline_write": True, "buffer_count": 6}}})
    assert read.optimizer_buffers_needed == 2 * SWAP_BUFFERS_PER_SUB_GROUP
    assert (both.optimizer_buffer_count, both.optimizer_buffers_needed) == (6, 3 * SWAP_BUFFERS_PER_SUB_GROUP)


NVME_RUN = {"zero": {"stage": 3}, "offload": {"optimizer": {"device": "nvme", "nvme_path": "nvme"},
                                             "param": {"device": "nvme", "nvme_path": "nvme"}}}


@pytest.mark.parametrize("extra, named", [
    ({"aio": 5}, "deepspeed.extra.aio is 5: DeepSpeed reads aio as a section"),
    ({"aio": ["intra_op_parallelism", 2]}, "deepspeed.extra.aio is [\"intra_op_parallelism\", 2]"),
    ({"zero_optimization": "stage3"}, "deepspeed.extra.zero_optimization is \"stage3\""),
    ({"zero_optimization": {"offload_optimizer": "nvme"}}, "deepspeed.extra.zero_optimization.offload_optimizer is "
     "\"nvme\": DeepSpeed reads zero_optimization.offload_optimizer as a section"),
    ({"zero_optimization": {"offload_param": None}}, "offload.param.device none turns the offload off"),
    ({"zero_optimization": {"offload_optimizer": {"buffer_count": "2.5"}}},
     "deepspeed.extra.zero_optimization.offload_optimizer.buffer_count is \"2.5\": DeepSpeed takes a whole number"),
    ({"zero_optimization": {"offload_optimizer": {"pipeline_read": "sometimes"}}}, "pipeline_read is \"sometimes\": "
     "DeepSpeed takes true or false"),
    ({"aio": {"intra_op_parallelism": "4"}}, "deepspeed.extra.aio.intra_op_parallelism is \"4\""),
])
@pytest.mark.parametrize("command", [["config", "render"], ["plan", "--gpus", "1", "--gpu-memory", "80GiB"],
                                     ["doctor"], train("--dry-run", "--max-steps", "2")])
def test_a_deepspeed_extra_section_that_deepspeed_cannot_read_is_refused_by_key(craken, workdir, extra, named,
                                                                                command):
    (workdir / "nvme").mkdir()
    (workdir / "craken.yaml").write_text(json.dumps({**NVME_RUN, "deepspeed": {"extra": extra}}))
    assert_refused_unwritten(craken, workdir, command, named)


def test_deepspeed_extras_swap_settings_are_read_as_deepspeeds_own_parser_reads_them(craken, workdir):
    """A quoted or float whole number, true and "auto" are what DeepSpeed's pydantic sections make of
    them; craken's NVMe checks and memory plan count the same buffers."""
    from deepspeed.runtime.zero.offload_config import DeepSpeedZeroOffloadOptimizerConfig

    from craken_cli.plan.memory import SwapSettings

    for value in ("3", 3.0, True, "auto", "12"):
        parsed = DeepSpeedZeroOffloadOptimizerConfig(buffer_count=value, pipeline_read="true")
        read = SwapSettings.from_extra({"zero_optimization": {"offload_optimizer": {
            "buffer_count": value, "pipeline_read": "true"}}})
        assert (read.optimizer_buffer_count, read.pipeline_read) == (parsed.buffer_count, parsed.pipeline_read)
    (workdir / "nvme").mkdir()
    extra = {"zero_optimization": {"offload_optimizer": {"buffer_count": "3"}}}
    (workdir / "craken.yaml").write_text(json.dumps({**NVME_RUN, "deepspeed": {"extra": extra}}))
    result = craken(*train("--dry-run", "--max-steps", "2"))
    assert result.code == 2 and "zero_optimization.offload_optimizer.buffer_count is 3, and" in result.err


def test_the_sections_deepspeed_extra_must_give_as_mappings_are_deepspeeds():
    from deepspeed.runtime import constants
    from deepspeed.runtime.swap_tensor.constants import AIO, AIO_INTRA_OP_PARALLELISM
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION, DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import (DeepSpeedZeroOffloadOptimizerConfig,
                                                       DeepSpeedZeroOffloadParamConfig)
    from deepspeed.utils.config import TIMERS

    from craken_cli.config.spec import AIO_SETTINGS, DEEPSPEED_SECTIONS, SWAP_SETTINGS

    zero = DeepSpeedZeroConfig.model_fields
    offloads = {f"{ZERO_OPTIMIZATION}.{name}" for name in zero if name.startswith("offload_")}
    assert set(DEEPSPEED_SECTIONS) == {ZERO_OPTIMIZATION, *offloads, constants.BFLOAT16, constants.FP16,
                                       constants.OPTIMIZER, f"{constants.OPTIMIZER}.{constants.OPTIMIZER_PARAMS}",
                                       constants.SCHEDULER,
                                       constants.DATA_TYPES, TIMERS, AIO}
    models = {ZERO_OPTIMIZATION: DeepSpeedZeroConfig,
              f"{ZERO_OPTIMIZATION}.offload_optimizer": DeepSpeedZeroOffloadOptimizerConfig,
              f"{ZERO_OPTIMIZATION}.offload_param": DeepSpeedZeroOffloadParamConfig}
    for key, kind in SWAP_SETTINGS.items():
        section, _, name = key.rpartition(".")
        assert models[section].model_fields[name].annotation is kind, key
    assert list(AIO_SETTINGS) == [f"{AIO}.{AIO_INTRA_OP_PARALLELISM}"]


@pytest.mark.parametrize("offload, refused", [
    ({"buffer_count": 4, "pipeline_read": True, "pipeline_write": True}, "to 12 or more"),
    ({"buffer_count": 4, "pipeline_write": True}, "to 8 or more"),
    ({"buffer_count": 3}, "to 4 or more"),
    ({"buffer_count": 12, "pipeline_read": True, "pipeline_write": True}, None),
    ({"pipeline_read": True, "device": "cpu", "nvme_path": None}, None),  # no NVMe swapper
])
def test_an_imported_json_with_too_few_nvme_swap_buffers_is_refused_before_launch(craken, workdir, offload, refused):
    (workdir / "nvme").mkdir()
    given = {"device": "nvme", "nvme_path": str(workdir / "nvme"), **offload}
    offload = {k: v for k, v in given.items() if v is not None}
    (workdir / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto",
                                                 "zero_optimization": {"stage": 3, "offload_optimizer": offload}}))
    before = snapshot(workdir)
    result = craken(*train("--dry-run", "--config", "ds.json", "--max-steps", "2"))
    problems = result.err.partition("craken: cannot start this run")[2] if result.code == 2 else ""  # no notes
    if refused is None:
        assert result.code == 0 or ("libaio" in problems and "buffer_count" not in problems), result.output
        return
    assert result.code == 2 and "Traceback" not in result.output
    assert ("zero_optimization.offload_optimizer.buffer_count is " + str(offload["buffer_count"])) in problems
    assert f"set deepspeed.extra zero_optimization.offload_optimizer.buffer_count {refused}" in problems
    pipelined = [k for k in offload if k.startswith("pipeline")]  # the other way out: turn them off
    assert all(f"zero_optimization.offload_optimizer.{k}" in problems for k in pipelined)
    assert pipelined or "pipeline" not in problems
    from craken_cli.doctor.dsops import find_libaio

    if None in find_libaio({})[1:]:  # every problem at once: libaio's too
        assert "libaio" in problems
    assert snapshot(workdir) == before


@pytest.mark.parametrize("extra, named", [
    # DeepSpeed's pydantic section models (zero_optimization, bf16, fp16)
    ({"zero_optimization": {"round_robin_gradients": "maybe"}},
     "deepspeed.extra.zero_optimization.round_robin_gradients = 'maybe': DeepSpeed's DeepSpeedZeroConfig refuses it"),
    ({"zero_optimization": {"memory_efficient_linear": "x"}}, "zero_optimization.memory_efficient_linear = 'x'"),
    ({"bf16": {"immediate_grad_update": "sometimes"}}, "deepspeed.extra.bf16.immediate_grad_update = 'sometimes'"),
    # DeepSpeedConfig's own parser (monitor, profiler, checkpoint, ... sections; optimizer and scheduler types)
    ({"tensorboard": {"enabled": "maybe"}},
     "deepspeed.extra.tensorboard.enabled = 'maybe': DeepSpeed's DeepSpeedMonitorConfig refuses it"),
    ({"csv_monitor": {"enabled": True, "job_name": ["a"]}}, "deepspeed.extra.csv_monitor.job_name = ['a']"),
    ({"comms_logger": {"enabled": "x"}}, "deepspeed.extra.comms_logger.enabled = 'x': DeepSpeed's CommsLoggerConfig"),
    ({"flops_profiler": {"enabled": "x"}}, "deepspeed.extra.flops_profiler = {\"enabled\": \"x\"}: DeepSpeed refuses"),
    ({"activation_checkpointing": 5}, "deepspeed.extra.activation_checkpointing is 5: DeepSpeed reads "
     "activation_checkpointing as a section"),
    ({"compile": {"deepcompile": "x"}}, "deepspeed.extra.compile.deepcompile = 'x'"),
    ({"checkpoint": {"tag_validation": "Sometimes"}}, "invalid tag_validation value of SOMETIMES"),
    ({"timers": {"throughput": {"enabled": "x"}}}, "deepspeed.extra.timers.throughput.enabled = 'x'"),
    ({"tensor_parallel": {"autotp_size": "x"}}, "deepspeed.extra.tensor_parallel.autotp_size = 'x'"),
    ({"communication_data_type": "fp8"}, "deepspeed.extra.communication_data_type = \"fp8\": DeepSpeed refuses it"),
    ({"gradient_allreduce_op": "x"}, "deepspeed.extra.gradient_allreduce_op = \"x\""),
    ({"torch_autocast": {"enabled": True, "dtype": "float99"}}, "'float99' is not a valid DtypeEnum"),
    ({"optimizer": {"type": "NoSuchOpt"}}, "deepspeed.extra.optimizer.type 'NoSuchOpt': DeepSpeed knows no such"),
    ({"optimizer": {"type": 5}}, "deepspeed.extra.optimizer = {\"type\": 5}: DeepSpeed refuses it"),
    ({"optimizer": {"type": "Adamax"}}, "'Adamax' is torch.optim.Adamax, which DeepSpeed has not tested with ZeRO"),
    ({"optimizer": {"type": "Adamax", "params": {"momentum": 0.9}}},
     "torch.optim.Adamax refuses these optimizer.params (Adamax.__init__() got an unexpected keyword argument"),
    ({"optimizer": {"type": "Lamb"}}, "'lamb' is DeepSpeed's FusedLamb, which DeepSpeed has not tested with ZeRO"),
    ({"scheduler": {"type": "Nope", "params": {}}}, "deepspeed.extra.scheduler.type 'Nope': DeepSpeed knows no such"),
    ({"scheduler": 5}, "deepspeed.extra.scheduler is 5: DeepSpeed reads scheduler as a section"),
])
@pytest.mark.parametrize("command", [train("--zero", "2", "--max-steps", "2"),
                                     train("--zero", "2", "--max-steps", "2", "--dry-run")])
def test_a_deepspeed_extra_key_deepspeeds_parser_refuses_stops_before_launch(craken, workdir, extra, named, command):
    """Found in review (the section models' values) and by real 2-process CPU runs (the parser's keys): each
    of these passed every check and every process stopped at deepspeed.initialize with a traceback (scheduler 5
    was dropped without a word and craken's own schedule ran)."""
    (workdir / "craken.yaml").write_text(json.dumps({"deepspeed": {"extra": extra}}))
    assert_refused_unwritten(craken, workdir, command, named)


def test_every_deepspeed_extra_key_deepspeed_refuses_is_named_at_once(craken, workdir):
    extra = {"tensorboard": {"enabled": "maybe"}, "checkpoint": {"tag_validation": "Sometimes"},
             "optimizer": {"type": "NoSuchOpt"}, "zero_optimization": {"round_robin_gradients": "maybe"}}
    (workdir / "craken.yaml").write_text(json.dumps({"deepspeed": {"extra": extra}}))
    result = craken(*train("--zero", "2", "--max-steps", "2"))
    assert result.code == 2 and "(4 problems)" in result.err, result.output
    for key in ("tensorboard.enabled", "checkpoint", "optimizer.type", "zero_optimization.round_robin_gradients"):
        assert f"deepspeed.extra.{key} " in result.err
    assert not (workdir / RUN).exists()


@pytest.mark.parametrize("extra", [
    {"tensorboard": {"enabled": False, "output_path": "tb", "job_name": "x"}},
    {"comms_logger": {"enabled": False, "verbose": True}},
    {"flops_profiler": {"enabled": False, "profile_step": 2}},
    {"activation_checkpointing": {"partition_activations": False}},
    {"checkpoint": {"tag_validation": "warn"}},
    {"optimizer": {"type": "Adam"}},
    {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 2}}},
    {"communication_data_type": "fp32", "gradient_allreduce_op": "sum"},
])
def test_the_deepspeed_extra_keys_deepspeeds_parser_takes_are_accepted(craken, workdir, extra):
    (workdir / "craken.yaml").write_text(json.dumps({"deepspeed": {"extra": extra}}))
    result = craken(*train("--zero", "2", "--max-steps", "2", "--dry-run"))
    assert result.code == 0, result.output


def test_the_launchs_deepspeed_check_leaves_the_environment_the_workers_inherit_alone(monkeypatch):
    """The launching process passes os.environ on: a one-process group's MASTER_PORT, RANK or WORLD_SIZE
    set there would reach every worker."""
    import os

    from craken_cli.config.dscheck import parse_unlaunched

    before = dict(os.environ)
    parse_unlaunched({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                      "tensorboard": {"enabled": False}})
    assert dict(os.environ) == before


FAKE_PASSWORD = "FAKEpw0123"
FAKE_TOKEN = "hf_" + "FAKE" * 8 + "xy"


@pytest.mark.parametrize("args, env, shown", [
    (train("--dataset", f"https://bob:{FAKE_PASSWORD}@example.com/d.jsonl"), {},
     "--dataset https://***@example.com/d.jsonl: no such file"),
    (train("--model", f"https://bob:{FAKE_PASSWORD}@example.com/m"), {}, "--model https://***@example.com/m: no such"),
    (train("--model", f"./{FAKE_TOKEN}"), {}, "--model ./hf_***: no such folder"),
    (train("--resume", f"./{FAKE_TOKEN}"), {}, "--resume ./hf_***: no such checkpoint folder"),
    (train("--model", "org/m"), {"HF_ENDPOINT": f"http://bob:{FAKE_PASSWORD}@127.0.0.1:9", "HF_HUB_OFFLINE": "",
                                 "HF_HUB_CACHE": "hub"}, "http://***@127.0.0.1:9 cannot be reached"),
    (["ckpt", "list", f"s3://bob:{FAKE_PASSWORD}@bucket/run"], {}, "s3:/***@bucket/run: no such run folder"),
    (["report", f"s3://bob:{FAKE_PASSWORD}@bucket/run"], {}, "s3:/***@bucket/run does not exist"),
], ids=["dataset-url", "model-url", "model-token-path", "resume-token-path", "hf-endpoint", "ckpt-list-url",
        "report-url"])
def test_a_refusal_masks_the_credentials_in_the_values_it_names(craken, workdir, args, env, shown):
    """Found in a first-contact audit: a refusal names the user's value, and with it the password of a URL
    or a hub token inside a path (HF_ENDPOINT's credentials too), into terminals and CI logs."""
    result = craken(*args, env=env)
    assert result.code == 2 and "Traceback" not in result.output, result.output
    assert shown in result.err, result.err
    assert FAKE_PASSWORD not in result.output and FAKE_TOKEN not in result.output
    assert list(workdir.iterdir()) == []


def test_a_hub_token_inside_any_variable_is_shown_masked():
    from craken_cli.launch import command

    assert command.redact_env({"CACHE": f"/x/{FAKE_TOKEN}/y", "PATH": "/usr/bin"}) == {"CACHE": "/x/hf_***/y",
                                                                                       "PATH": "/usr/bin"}
    assert command.is_secret("CACHE", f"/x/{FAKE_TOKEN}") and not command.is_secret("CACHE", "/x/hf_cache")
