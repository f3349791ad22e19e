"""`craken report`: real command, real metrics.jsonl, real PNGs decoded back to pixels."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from craken_cli.app import app
from craken_cli.app import main
from craken_cli.report.report import json_safe, read_metrics, summarize, summary_rows

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _lines(gpu: bool, steps: int = 60, every: int = 5, eval_every: int = 20) -> list[dict]:
    """A run as the training loop logs it: start, a train line every `every` steps, evals, end."""
    tokens_per_step = 16 * 128
    lines = [{
        "event": "start", "strategy": "zero2+offload_optimizer" if gpu else "zero2", "num_processes": 2,
        "precision": "bf16" if gpu else "fp32", "model_params": 4_200_000, "flops_per_token": 25_200_000,
        "seq_len": 128, "micro_batch": 4, "grad_accum": 2, "global_batch": 16, "max_steps": steps,
        "device": "NVIDIA H100 80GB HBM3" if gpu else "cpu",
    }]
    for step in range(every, steps + 1, every):
        tps = 3000.0 + 37.0 * (step % 7) + (0 if step > every else -1500.0)  # slow first interval
        lines.append({
            "step": step, "time_s": round(step * 0.45, 3), "loss": 8.0 * math.exp(-step / 25) + 2.1,
            "lr": 3e-4 * min(1.0, step / 10) * (1 - 0.5 * step / steps), "grad_norm": 1.0 + 1 / step,
            "tokens": step * tokens_per_step, "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / 2,
            "mfu": 0.38 + 0.001 * step if gpu else None,
            "gpu_mem_gib": 30.0 + step / 100 if gpu else None,
            "gpu_mem_reserved_gib": 34.0 if gpu else None,
        })
        if step % eval_every == 0:
            # the lowest eval loss is deliberately not the last one
            eval_loss = 8.0 * math.exp(-step / 25) + 2.3 + (2.0 if step == steps else 0.0)
            lines.append({"step": step, "time_s": round(step * 0.45 + 0.2, 3), "eval_loss": eval_loss})
    lines.append({"event": "end", "steps": steps, "wall_s": 31.5, "first_step_s": 7.25, "final_dir": None,
                  "startup": {"imports_s": 3.1, "data_s": 3.6, "model_s": 4.02, "prepare_s": 4.5}})
    return lines


def _write(run: Path, lines: list[dict], tail: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + tail)
    return run


def _expected(lines: list[dict]) -> dict:
    """The summary numbers, computed here from the lines, independently of craken_cli.report.report."""
    train = [line for line in lines if "loss" in line]
    evals = [line for line in lines if "eval_loss" in line]
    best = min(evals, key=lambda e: e["eval_loss"])
    return {
        "steps": lines[-1]["steps"],
        "tokens": train[-1]["tokens"],
        "wall_s": lines[-1]["wall_s"],
        "mean_tokens_per_s": sum(t["tokens_per_s"] for t in train) / len(train),
        "best_eval_loss": best["eval_loss"],
        "best_eval_step": best["step"],
        "first_loss": train[0]["loss"],
        "last_loss": train[-1]["loss"],
        "strategy": lines[0]["strategy"],
        "train_steps": [t["step"] for t in train],
        "mfus": [t["mfu"] for t in train],
    }


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    """The installed entry point, as a user runs it (exercises main()'s CrakenError handling)."""
    return subprocess.run([sys.executable, "-m", "craken_cli", *args], capture_output=True, text=True, timeout=120)


def _check_png(path: Path, min_width: int, min_height: int) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = imread(path)
    height, width = pixels.shape[:2]
    assert width >= min_width and height >= min_height, (path, pixels.shape)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    rgb = (pixels[..., :3] * 255).round().astype("uint8").reshape(-1, 3)
    colours = {tuple(c) for c in rgb[:: max(1, len(rgb) // 50_000)]}
    # axes, text, grid and at least one coloured curve: far more than a blank or single-colour image
    assert len(colours) > 20, (path, len(colours))
    assert rgb.std() > 5, path
    # some pixels are clearly coloured (a curve), not only greys
    assert (rgb.max(axis=1).astype(int) - rgb.min(axis=1).astype(int) > 80).sum() > 100, path


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    lines = _lines(gpu=True)
    run = _write(tmp_path_factory.mktemp("gpu") / "run", lines)
    result = CliRunner().invoke(app, ["report", str(run), "--json"])
    assert result.exit_code == 0, result.output
    return run, lines, json.loads(result.stdout)


def test_report_writes_valid_pngs_with_content(gpu_run):
    run, _, summary = gpu_run
    names = sorted(Path(p).name for p in summary["plots"])
    assert names == ["gpu_memory.png", "loss.png", "lr.png", "overview.png", "tokens_per_s.png"]
    for name in names:
        path = run / "report" / name
        assert path.is_file()
        big = name == "overview.png"
        _check_png(path, 1000 if big else 700, 700 if big else 400)


def test_summary_numbers_match_metrics_file(gpu_run):
    _, lines, summary = gpu_run
    expected = _expected(lines)
    assert summary["steps"] == expected["steps"] == 60
    assert summary["tokens"] == expected["tokens"] == 60 * 16 * 128
    assert summary["wall_s"] == expected["wall_s"]
    assert summary["mean_tokens_per_s"] == pytest.approx(expected["mean_tokens_per_s"])
    assert summary["best_eval_loss"] == pytest.approx(expected["best_eval_loss"])
    assert summary["best_eval_step"] == expected["best_eval_step"] == 40
    assert summary["first_loss"] == pytest.approx(expected["first_loss"])
    assert summary["last_loss"] == pytest.approx(expected["last_loss"])
    assert summary["mean_mfu"] == pytest.approx(sum(expected["mfus"]) / len(expected["mfus"]))
    assert summary["peak_gpu_mem_gib"] == pytest.approx(30.6)
    assert summary["strategy"] == "zero2+offload_optimizer"
    assert summary["complete"] is True


def test_table_output_on_cpu_run(tmp_path):
    lines = _lines(gpu=False, steps=40, every=4, eval_every=8)
    run = _write(tmp_path / "cpu-run", lines)
    out = tmp_path / "plots"
    result = _run_cli("report", str(run), "--out", str(out))
    assert result.returncode == 0, result.stderr
    expected = _expected(lines)
    text = result.stdout
    assert "zero2" in text
    assert f"{expected['tokens']:,}" in text
    assert f"{expected['mean_tokens_per_s']:,.0f}" in text
    assert f"{expected['best_eval_loss']:.4f} (step {expected['best_eval_step']})" in text
    assert "n/a (CPU)" in text  # MFU and memory: null on CPU, never a made-up 0
    assert "7.2 s from process start" in text  # where launch time went
    assert "imports 3.1, data 3.6, model 4.0, engine 4.5" in text
    # memory is null on CPU: no memory plot of its own; the overview says so instead
    assert sorted(p.name for p in out.iterdir()) == ["loss.png", "lr.png", "overview.png", "tokens_per_s.png"]
    assert not (run / "report").exists()
    for png in out.iterdir():
        _check_png(png, 700, 400)
    summary = summarize(read_metrics(run))
    assert summary["mean_mfu"] is None and summary["peak_gpu_mem_gib"] is None


def test_truncated_last_line_is_tolerated_with_a_warning(tmp_path):
    lines = _lines(gpu=False, steps=30, every=5, eval_every=10)[:-1]  # crashed: no end line ...
    run = _write(tmp_path / "crashed", lines, tail='{"step": 35, "time_s": 15.7, "loss": 2.4')  # ... mid-write
    result = CliRunner().invoke(app, ["report", str(run), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 30 and summary["complete"] is False
    assert summary["tokens"] == 30 * 16 * 128
    assert "incomplete" in result.stderr and "metrics.jsonl" in result.stderr
    assert "Traceback" not in result.stderr


def test_nan_loss_gives_strict_json(tmp_path):
    lines = _lines(gpu=False, steps=20, every=5, eval_every=10)
    [t for t in lines if "loss" in t][-1]["loss"] = float("nan")  # the last train line: a diverged run
    run = _write(tmp_path / "nan", lines)
    summary = summarize(read_metrics(run))
    assert math.isnan(summary["last_loss"])
    assert dict(summary_rows(summary))["loss first -> last"].endswith("-> nan")
    text = json.dumps(json_safe(summary), allow_nan=False)  # raises on NaN
    assert json.loads(text)["last_loss"] is None


def _bad_run(tmp_path: Path, case: str) -> tuple[Path, str]:
    run = tmp_path / case
    if case == "missing-folder":
        return run, "does not exist"
    run.mkdir()
    metrics = run / "metrics.jsonl"
    if case == "missing-file":
        return run, "does not exist"
    if case == "empty":
        metrics.write_text("")
        return run, "is empty"
    if case == "corrupt-middle":
        good = [json.dumps(line) for line in _lines(gpu=False, steps=20)]
        metrics.write_text("\n".join(good[:2] + ["{not json"] + good[2:]) + "\n")
        return run, "metrics.jsonl:3"
    if case == "binary":
        metrics.write_bytes(b"\x00\xff\xfe garbage\n")
        return run, "metrics.jsonl"
    if case == "not-metrics":
        metrics.write_text('{"hello": 1}\n{"hello": 2}\n')
        return run, "no integer `step`"
    if case == "start-only":
        metrics.write_text(json.dumps(_lines(gpu=False)[0]) + "\n")
        return run, "no train lines"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing-folder", "missing-file", "empty", "corrupt-middle", "binary",
                                  "not-metrics", "start-only"])
def test_bad_input_exits_2_with_one_clear_message(tmp_path, capsys, case):
    run, expected = _bad_run(tmp_path, case)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(run)])  # the console entry point, in process
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2, stderr
    assert stderr.startswith("craken: cannot read metrics: ") and stderr.count("craken:") == 1
    assert expected in stderr
    assert str(run) in stderr.replace("\n", "")
    assert not (run / "report").exists()


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    run, _ = _bad_run(tmp_path, "corrupt-middle")
    result = _run_cli("report", str(run))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("craken: cannot read metrics: ")
    assert "metrics.jsonl:3 is not a JSON object" in result.stderr


def test_command_module_is_light_to_import():
    code = ("import sys, craken_cli.app, craken_cli.commands.report, craken_cli.report.report, craken_cli.report.progress; "
            "print(sorted(m for m in ('matplotlib', 'torch', 'deepspeed') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
