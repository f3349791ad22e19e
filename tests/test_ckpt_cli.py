"""`craken ckpt list|export|convert` without training: fake checkpoint folders, and DeepSpeed's
converter replaced by a stand-in that records its argv. The real export of a ZeRO-3 run and the
real conversions (2 -> 1 and 1 -> 2 processes) are e2e tests in tests/test_reliability.py; bad
inputs of these commands are in tests/test_bad_input_catalog.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from craken_cli.ckpt import manage
from craken_cli.train import checkpoint


def fake(run: Path, step: int, world: int = 2, seal: bool = True) -> Path:
    path = checkpoint.checkpoint_dir(run) / f"step_{step:08d}"
    (path / "pytorch_model").mkdir(parents=True)
    (path / "pytorch_model" / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 2048)
    (path / "random_states_0.pkl").write_bytes(b"\0" * 16)
    (path / "hf").mkdir()
    (path / "hf" / "config.json").write_text("{}")
    if seal:
        checkpoint.write_state(path, checkpoint.TrainState(step=step, world_size=world))
        (path.parent / "latest").write_text(path.name)
    return path


def test_ckpt_is_listed_in_help(craken):
    result = craken("--help")
    assert "ckpt" in result.out


def test_list_shows_steps_processes_state_and_latest(craken, workdir):
    run = workdir / "run"
    fake(run, 4)
    fake(run, 8)
    fake(run, 12, seal=False)
    result = craken("ckpt", "list", "run")
    assert result.code == 0, result.output
    lines = [line for line in result.out.splitlines() if "step_" in line]
    assert len(lines) == 3
    assert "complete" in lines[0] and "(latest)" in lines[1]
    assert "BROKEN" in lines[2] and "no craken_state.json" in lines[2]

    as_json = json.loads(craken("ckpt", "list", "run", "--json").out)
    assert [r["step"] for r in as_json] == [4, 8, 12]
    assert [r["complete"] for r in as_json] == [True, True, False]
    assert as_json[1]["latest"] and as_json[0]["processes"] == 2


def test_list_of_a_run_without_checkpoints_yet(craken, workdir):
    (workdir / "run" / "checkpoints").mkdir(parents=True)
    result = craken("ckpt", "list", "run")
    assert result.code == 0 and "no checkpoints" in result.out


def test_convert_runs_ds_to_universal_as_an_argv_list(craken, workdir, monkeypatch):
    src = fake(workdir / "run", 8)
    calls = []

    def fake_run(argv, **kwargs):
        calls.append((argv, kwargs))
        out = Path(argv[argv.index("--output_folder") + 1])
        (out / "zero" / "w").mkdir(parents=True)
        (out / "mp_rank_00_model_states.pt").write_bytes(b"\0")
        (out.parent / "latest_universal").write_text(out.name)
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(manage.subprocess, "run", fake_run)
    result = craken("ckpt", "convert", str(src))
    assert result.code == 0, result.output
    argv, kwargs = calls[0]
    assert argv[:3] == [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
    assert argv[argv.index("--input_folder") + 1] == str(src / "pytorch_model")
    assert "shell" not in kwargs
    out = workdir / "run" / "checkpoints" / "universal" / "step_00000008"
    assert "--resume " + str(out) in result.out
    state = checkpoint.read_state(out)
    assert state.universal and state.step == 8 and state.world_size == 2 and checkpoint.is_complete(out)
    assert (out / "hf" / "config.json").is_file() and (out / "random_states_0.pkl").is_file()
    assert not (out / "latest_universal").exists()
    # converted copies are not ordinary checkpoints: `--resume auto` and keep-K never pick them
    assert checkpoint.list_checkpoints(workdir / "run") == [src]
    rows = manage.rows(workdir / "run")
    assert rows[-1]["universal"] and rows[-1]["step"] == 8


def test_failed_convert_leaves_nothing(craken, workdir, monkeypatch):
    src = fake(workdir / "run", 8)
    monkeypatch.setattr(manage.subprocess, "run",
                        lambda argv, **kw: subprocess.CompletedProcess(argv, 1, "", "Traceback\nKeyError: 'x'\n"))
    result = craken("ckpt", "convert", str(src))
    assert result.code == 2
    assert "ds_to_universal failed" in result.err and "KeyError: 'x'" in result.err
    assert not (workdir / "run" / "checkpoints" / "universal").exists()
    assert sorted(p.name for p in (workdir / "run" / "checkpoints").iterdir()) == ["latest", "step_00000008"]


def test_convert_on_a_full_disk_says_so_and_leaves_nothing(craken, workdir, monkeypatch):
    import errno

    src = fake(workdir / "run", 8)

    def full_disk(argv, **kwargs):
        out = Path(argv[argv.index("--output_folder") + 1])
        out.mkdir(parents=True)
        (out / "part").write_bytes(b"\0")  # what the converter wrote before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manage.subprocess, "run", full_disk)
    result = craken("ckpt", "convert", str(src))
    assert result.code == 2 and "the universal checkpoint" in result.err and "(partial files removed)" in result.err
    assert not (workdir / "run" / "checkpoints" / "universal").exists()
    assert sorted(p.name for p in (workdir / "run" / "checkpoints").iterdir()) == ["latest", "step_00000008"]


def test_export_picks_latest_good_or_named_step(workdir):
    run = workdir / "run"
    fake(run, 4)
    fake(run, 8)
    fake(run, 12, seal=False)
    assert manage.pick(run, None).name == "step_00000008"
    assert manage.pick(run, 4).name == "step_00000004"


def test_a_killed_save_is_cleaned_by_the_next_save(tmp_path):
    """What `checkpoint.save` does on the main process, with a stand-in for accelerate."""

    class FakeAccelerator:
        is_main_process = True
        num_processes = 2
        device = "cpu"
        _models: list = []

        def reduce(self, tensor, reduction):
            return tensor

        class state:  # a DeepSpeed run: save_state gets the universal-checkpoint client state
            deepspeed_plugin = object()

        def wait_for_everyone(self):
            pass

        def save_state(self, path, client_state=None):
            assert client_state == checkpoint.UNIVERSAL_INFO
            (Path(path) / "pytorch_model").mkdir(parents=True)
            (Path(path) / "pytorch_model" / "shard.pt").write_bytes(b"\0" * 10)

    root = checkpoint.checkpoint_dir(tmp_path)
    (root / ".tmp_step_00000006" / "pytorch_model").mkdir(parents=True)  # a save killed half-way
    for step in (2, 4, 8):
        checkpoint.save(FakeAccelerator(), tmp_path, checkpoint.TrainState(step=step), keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000008"]
    assert (root / "latest").read_text() == "step_00000008"
    state = checkpoint.read_state(root / "step_00000008")
    assert state.world_size == 2 and state.files == {"pytorch_model/shard.pt": 10}
