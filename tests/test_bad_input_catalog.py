"""The bad-input catalog of issue 6: what `craken train`, `--resume` and `craken ckpt` get wrong in
practice (flags, model and data paths, run folders, checkpoint folders), through the real CLI.

Every case exits 2 with exactly one `craken: ...` line (or one usage error from the parser) that
names the input and what to do, no traceback, nothing on stdout, and nothing written or deleted:
the whole working folder (where every input of the case lives) is snapshotted before and after.

Configuration-level inputs (craken.yaml, CRAKEN_* variables, imported DeepSpeed JSON and accelerate
YAML, `--set`, cross-field rules) are in tests/test_bad_inputs.py and not repeated here; the two
files together make the catalog (more than 30 cases each).
"""

from __future__ import annotations

import json
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
                                                                        "drop --resume"]),
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
    "run-folder-already-holds-a-run": Case(train(), ["already holds a run", "--resume auto", "--force"],
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


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file (mtime, size) and folder under root. A folder's own mtime is left out: a failed
    conversion creates and removes its temporary folder, which leaves the content as it was."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = ("d",) if p.is_dir() else (st.st_mtime_ns, st.st_size)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, craken, workdir):
    case = CASES[name]
    if case.setup:
        case.setup(workdir)
    before = snapshot(workdir)

    result = craken(*case.args)

    assert result.code == 2, result.output
    assert "Traceback" not in result.output
    assert result.out == ""
    message = result.err.strip()
    if case.parser_error:
        assert "Invalid value" in message and message.count("Error") == 1, message
    else:
        assert message.startswith("craken:") and len(message.splitlines()) == 1, message
        assert message.count("craken:") == 1, message
    for needle in case.needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert snapshot(workdir) == before


def test_catalog_is_large_and_distinct():
    assert len(CASES) >= 30
    assert len({(tuple(c.args), c.setup.__qualname__ if c.setup else None, id(c.setup)) for c in CASES.values()}) \
        == len(CASES)


def test_offload_run_refuses_a_left_over_op_build_lock(craken, workdir, monkeypatch):
    """With a torch that blocks builds on a lock file's existence, every process of the run waits on
    a left-over one forever and prints nothing."""
    import os
    import time

    from craken_cli import dsops

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
    from craken_cli.preflight import tracker_problems
    from craken_cli.spec import RunSpec

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
    from craken_cli.dsops import find_libaio

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
    from craken_cli.preflight import output_problems

    run = tmp_path / "run"
    run.mkdir()
    for name in ("run.yaml", "metrics.jsonl", "accelerate.yaml"):
        (run / name).write_text("x")
    assert output_problems(run, resume=None, force=False, machine_rank=1) == []
    assert "already holds a run" in output_problems(run, resume=None, force=False, machine_rank=0)[0]
    (run / "metrics-machine1.jsonl").write_text("x")
    assert "already holds a run" in output_problems(run, resume=None, force=False, machine_rank=1)[0]
    assert output_problems(run, resume="auto", force=False, machine_rank=1) == []
