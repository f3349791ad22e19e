"""`craken train --force` over an earlier run: what it removes before the new run writes."""

from __future__ import annotations

from pathlib import Path

from craken_cli import runfolder
from craken_cli.ckpt.startover import clear_previous_run

OUTPUTS = ("metrics.jsonl", "final_check.pt", "oom-rank1.json", "checkpoints/step_00000004/craken_state.json",
           "checkpoints/latest", "checkpoints/universal/step_00000004/x", "checkpoints/.tmp_step_00000006/x",
           "model_meta/config.json", "final/model.safetensors", "report/loss.png",
           "tensorboard/default/events.out.tfevents.1.vm.1.0")


def make(run: Path, rels) -> None:
    for rel in rels:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text("x")


def test_starting_over_removes_every_output_of_the_old_run_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    make(run, ["notes.txt"])
    runfolder.write_marker(run)  # the run's first launch claims the folder (notes.txt was there)
    make(run, [*OUTPUTS, "checkpoints/vm.txt"])
    clear_previous_run(run)
    # old TensorBoard curves would otherwise be drawn over the new run's
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == [
        Path("checkpoints"), Path("checkpoints/vm.txt"), Path(runfolder.MARKER), Path("notes.txt")]


def test_what_was_in_the_folder_before_the_run_is_never_removed(tmp_path):
    run = tmp_path / "run"
    make(run, ["report/thesis.tex", "final/draft.txt"])
    runfolder.write_marker(run)
    make(run, ["metrics.jsonl", "checkpoints/step_00000004/x"])
    clear_previous_run(run)
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()) == [
        runfolder.MARKER, "final/draft.txt", "report/thesis.tex"]


def test_a_folder_without_the_marker_is_not_cleared(tmp_path):
    run = tmp_path / "run"
    make(run, OUTPUTS)
    before = sorted(run.rglob("*"))
    clear_previous_run(run)
    assert sorted(run.rglob("*")) == before
    assert runfolder.foreign_outputs(run) == ["checkpoints", "final", "final_check.pt", "metrics.jsonl",
                                              "model_meta", "report", "tensorboard"]


def test_protected_folders(tmp_path):
    cwd, home = tmp_path / "work", tmp_path / "home"
    for path, why in [("/", "top-level"), ("/etc", "top-level"), (cwd, "the working folder"),
                      (tmp_path, "a folder above the working folder"), (home, "your home folder"),
                      (home / "..", "a folder above"), (cwd / "runs/x", None)]:
        got = runfolder.protected(Path(path), cwd=cwd, home=home)
        assert (got is None) if why is None else (why in got), (path, got)
    ckpt = cwd / "run/checkpoints/step_1"
    assert "which this command reads" in runfolder.protected(cwd / "run", reads=(ckpt,), cwd=cwd, home=home)
    assert runfolder.protected(cwd / "other", reads=(ckpt,), cwd=cwd, home=home) is None


def test_the_lock_dies_with_its_holder(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from craken_cli import runfolder; "
                               f"runfolder.acquire_lock({str(run)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert runfolder.lock_holder(run) == str(holder.pid)
    finally:
        holder.kill()
        holder.wait()
    assert runfolder.lock_holder(run) is None
    runfolder.acquire_lock(run)
    assert runfolder.lock_holder(run) is None  # held by this process: not a conflict for itself


def test_starting_over_keeps_files_someone_else_put_in_the_folders_craken_writes(tmp_path):
    """final/, model_meta/ and report/ list what craken wrote there: --force removes those files only."""
    run = tmp_path / "run"
    runfolder.write_marker(run)
    make(run, ["final/model.safetensors", "final/config.json", "model_meta/config.json", "report/loss.png"])
    for name in ("final", "model_meta", "report"):
        runfolder.note_written(run / name)
    make(run, ["final/README.md", "report/notes/review.txt"])  # the user's, after the run
    clear_previous_run(run)
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()) == [
        runfolder.MARKER, "final/README.md", "report/notes/review.txt"]
    assert not (run / "model_meta").exists()


def test_a_new_save_over_final_keeps_the_users_files(tmp_path):
    from craken_cli.train.checkpoint import replace_dir

    out, tmp = tmp_path / "final", tmp_path / ".final.tmp"
    make(tmp_path, [".final.tmp/model.safetensors"])
    replace_dir(tmp, out)
    make(tmp_path, ["final/README.md", "final/sub/eval.json", "final/tokenizer.json"])  # the user's
    make(tmp_path, [".final.tmp/model.safetensors", ".final.tmp/tokenizer.json"])
    replace_dir(tmp, out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        runfolder.WRITTEN_LIST, "README.md", "model.safetensors", "sub/eval.json", "tokenizer.json",
        "tokenizer.json.user"]
    assert runfolder.written_files(out) == {"model.safetensors", "tokenizer.json"}
    assert not tmp.exists()
