"""`craken train --force` over an earlier run: what it removes before the new run writes."""

from __future__ import annotations

from pathlib import Path

from craken_cli.startover import clear_previous_run


def test_starting_over_removes_every_output_of_the_old_run_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    outputs = ("metrics.jsonl", "final_check.pt", "oom-rank1.json", "checkpoints/step_00000004/craken_state.json",
               "final/model.safetensors", "report/loss.png", "tensorboard/default/events.out.tfevents.1.vm.1.0")
    for rel in (*outputs, "notes.txt"):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text("x")
    clear_previous_run(run)
    # old TensorBoard curves would otherwise be drawn over the new run's
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == [Path("notes.txt")]
