"""The run report: `metrics.jsonl` (see docs/metrics-format.md) -> summary numbers and PNG plots.

    metrics = read_metrics(run_dir)        # CrakenError on a missing, empty or corrupt file
    summary = summarize(metrics)           # plain dict, JSON-ready
    paths = write_plots(metrics, run_dir / "report")

Nothing here prints. matplotlib is imported only inside `write_plots`, and through its
object-oriented API (`Figure` + Agg canvas), so importing this module stays cheap and drawing
never touches pyplot's global backend or a display.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CrakenError
from ..runfolder import METRICS, REPORT, note_written


@dataclass
class Metrics:
    """The lines of one metrics.jsonl, sorted by kind, in file order."""

    path: Path
    start: dict[str, Any] | None = None
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    ends: list[dict[str, Any]] = field(default_factory=list)  # one per segment (a run resumed has several)
    warnings: list[str] = field(default_factory=list)


def metrics_path(run: str | Path) -> Path:
    """The metrics file of a run folder (a path to the file itself is taken as is)."""
    run = Path(run)
    return run if run.suffix == ".jsonl" else run / METRICS


def _problem(message: str) -> CrakenError:
    return CrakenError(message, title="cannot read metrics")


def read_metrics(run: str | Path) -> Metrics:
    """Parse `<run>/metrics.jsonl`. A last line cut short (a crashed run) is dropped with a warning;
    any other unreadable line, a missing file, or a file without a single train line is an error."""
    path = metrics_path(run)
    if not path.parent.is_dir():
        raise _problem(f"run folder {path.parent} does not exist; pass the folder `craken train` wrote "
                       "(it holds metrics.jsonl).")
    if not path.is_file():
        raise _problem(f"{path} does not exist; `craken train` writes it on the main process once "
                       "training starts. Pass the run folder of a run that has started.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _problem(f"{path} cannot be read ({exc}).") from None

    metrics = Metrics(path=path)
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    for i, (lineno, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if i == len(lines) - 1 and i > 0:
                # The writer died mid-line: everything before it is still good.
                metrics.warnings.append(f"{path}:{lineno}: last line is incomplete ({_short(line)!r}), "
                                        "ignored; the run probably stopped while writing it.")
                break
            raise _problem(f"{path}:{lineno} is not a JSON object ({exc}): {_short(line)!r}. "
                           "The file is corrupt; re-run training or remove the damaged line.") from None
        _sort(metrics, record, path, lineno)

    if not lines:
        raise _problem(f"{path} is empty: the run stopped before writing anything. Start it again "
                       "(`craken train ...`) and let it reach its first logged step.")
    if not metrics.train:
        raise _problem(f"{path} has no train lines: the run stopped before its first logged step "
                       "(train lines come every `steps_per_print` steps). Let a run get further, or "
                       "lower --steps-per-print.")
    if metrics.end is None:
        metrics.warnings.append(f"{path}: no end line; the run did not finish (crashed, killed or still "
                                "running). The report covers the steps logged so far.")
    return metrics


def _sort(metrics: Metrics, record: dict[str, Any], path: Path, lineno: int) -> None:
    event = record.get("event")
    if event == "start":
        metrics.start = record
    elif event == "end":
        metrics.end = record
        metrics.ends.append(record)
    elif event is not None:
        return  # an event kind newer than this reader: not needed for the report
    elif not isinstance(record.get("step"), int):
        raise _problem(f"{path}:{lineno} has no integer `step` and no `event`: {_short(json.dumps(record))!r}. "
                       "This is not a craken metrics file (see docs/metrics-format.md).")
    elif not_numbers := [k for k in NUMERIC if k in record and not _is_number(record[k])]:
        raise _problem(f"{path}:{lineno}: {not_numbers[0]} is {record[not_numbers[0]]!r}, not a number: the line was "
                       "edited or the file is not craken's; fix or remove that line")
    elif "eval_loss" in record:
        metrics.evals.append(record)
    elif "loss" in record:
        metrics.train.append(record)


# The values of a metrics line that the report computes with (null where a device has none).
NUMERIC = ("loss", "eval_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "tokens_per_s_per_gpu", "mfu",
           "gpu_mem_gib", "gpu_mem_reserved_gib", "time_s")


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _finite(values) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _mean(values) -> float | None:
    values = _finite(values)
    return sum(values) / len(values) if values else None


def summarize(metrics: Metrics) -> dict[str, Any]:
    """The numbers of the report. Means are over the logged train lines (one per interval of
    `steps_per_print` steps); null values (MFU and memory on CPU) are left out of them."""
    start = metrics.start or {}
    end = metrics.end or {}
    train = metrics.train
    last = train[-1]
    finite_evals = [e for e in metrics.evals if _finite([e.get("eval_loss")])]
    best = min(finite_evals, key=lambda e: e["eval_loss"]) if finite_evals else None
    times = _finite([r.get("time_s") for r in train + metrics.evals])
    return {
        "strategy": start.get("strategy"),
        "device": start.get("device"),
        "num_processes": start.get("num_processes"),
        "precision": start.get("precision"),
        "complete": metrics.end is not None,
        "steps": max(end.get("steps") or 0, last["step"]),  # the run's last step, over every segment
        "max_steps": start.get("max_steps"),
        "tokens": last.get("tokens"),
        # every segment's time: a resumed run's last segment alone undercounts it
        "wall_s": _segments_wall(metrics.ends) if metrics.ends else (max(times) if times else None),
        "segments": max(1, len(metrics.ends)),
        "first_step_s": end.get("first_step_s"),
        "startup": end.get("startup"),
        "mean_tokens_per_s": _mean(r.get("tokens_per_s") for r in train),
        "mean_tokens_per_s_per_gpu": _mean(r.get("tokens_per_s_per_gpu") for r in train),
        "mean_mfu": _mean(r.get("mfu") for r in train),
        "peak_gpu_mem_gib": max(_finite(r.get("gpu_mem_gib") for r in train), default=None),
        "first_loss": train[0].get("loss"),
        "last_loss": last.get("loss"),
        "best_eval_loss": best["eval_loss"] if best else None,
        "best_eval_step": best["step"] if best else None,
        "final_dir": end.get("final_dir"),
    }


def _segments_wall(ends: list[dict[str, Any]]) -> float | None:
    walls = _finite(e.get("wall_s") for e in ends)
    return sum(walls) if walls else None


def json_safe(summary: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf (a diverged loss) become null, so that `--json` output is strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}


def _num(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    return format(value, fmt)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    minutes, secs = divmod(float(seconds), 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{secs:04.1f}" if hours else f"{minutes}:{secs:04.1f}"


STARTUP_LABELS = {"imports_s": "imports", "data_s": "data", "model_s": "model", "prepare_s": "engine"}


def _startup_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """When the first step ended and, where recorded, each start-up phase: seconds from process start."""
    if summary.get("first_step_s") is None:
        return [("first step at", "n/a")]
    rows = [("first step at", f"{summary['first_step_s']:.1f} s from process start")]
    phases = summary.get("startup") or {}
    parts = [f"{label} {phases[key]:.1f}" for key, label in STARTUP_LABELS.items() if key in phases]
    return rows + ([("start-up phases done", ", ".join(parts))] if parts else [])


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary as (label, text) rows, for a table; no Rich needed here."""
    on_cpu = summary.get("peak_gpu_mem_gib") is None and summary.get("mean_mfu") is None
    steps = str(summary["steps"])
    if summary.get("max_steps"):
        steps += f" / {summary['max_steps']}"
    if not summary["complete"]:
        steps += " (no end line: unfinished)"
    best = _num(summary["best_eval_loss"], ".4f")
    if summary["best_eval_step"] is not None:
        best += f" (step {summary['best_eval_step']})"
    processes = summary.get("num_processes")
    return [
        ("strategy", str(summary.get("strategy") or "n/a")),
        ("device", f"{summary.get('device') or 'n/a'}" + (f" x {processes}" if processes else "")),
        ("precision", str(summary.get("precision") or "n/a")),
        ("steps", steps),
        ("tokens", _num(summary["tokens"], ",")),
        ("wall time", _duration(summary["wall_s"]) + (f" ({summary['segments']} segments: resumed)"
                                                       if summary.get("segments", 1) > 1 else "")),
        *_startup_rows(summary),
        ("mean tokens/s", _num(summary["mean_tokens_per_s"], ",.0f")),
        ("mean tokens/s per " + ("process" if on_cpu else "GPU"), _num(summary["mean_tokens_per_s_per_gpu"], ",.0f")),
        ("mean MFU", "n/a (CPU)" if on_cpu else _num(summary["mean_mfu"], ".1%")),
        ("peak GPU memory", "n/a (CPU)" if on_cpu else _num(summary["peak_gpu_mem_gib"], ".1f") + " GiB"),
        ("loss first -> last", f"{_num(summary['first_loss'], '.4f')} -> {_num(summary['last_loss'], '.4f')}"),
        ("best eval loss", best),
    ]


# ----------------------------------------------------------------------------------------- plots

PLOT_FILES = ("loss.png", "lr.png", "tokens_per_s.png", "gpu_memory.png", "overview.png")


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def _subtitle(metrics: Metrics) -> str:
    start = metrics.start or {}
    parts = [str(start.get(k)) for k in ("strategy", "precision") if start.get(k)]
    if start.get("device"):
        processes = start.get("num_processes")
        parts.append(f"{start['device']}" + (f" x {processes}" if processes else ""))
    # the run's name first: plots of several runs side by side are told apart by it
    return f"run {metrics.path.parent.name}" + (f": {', '.join(parts)}" if parts else "")


def _draw_loss(ax, metrics: Metrics) -> bool:
    x, y = _series(metrics.train, "loss")
    ax.plot(x, y, label="train loss", color="tab:blue", marker="." if len(x) < 30 else None)
    ex, ey = _series(metrics.evals, "eval_loss")
    if ex:
        ax.plot(ex, ey, label="eval loss", color="tab:orange", marker="o")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    return True


def _draw_lr(ax, metrics: Metrics) -> bool:
    x, y = _series(metrics.train, "lr")
    if not x:
        return False
    ax.plot(x, y, color="tab:green")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return True


def _draw_throughput(ax, metrics: Metrics) -> bool:
    x, y = _series(metrics.train, "tokens_per_s")
    if not x:
        return False
    ax.plot(x, y, color="tab:purple", label="tokens/s (all processes)")
    mean = sum(y) / len(y)
    ax.axhline(mean, color="tab:purple", linestyle="--", linewidth=1, label=f"mean {mean:,.0f}")
    ax.set_ylabel("tokens/s")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right")
    return True


def _draw_memory(ax, metrics: Metrics) -> bool:
    x, y = _series(metrics.train, "gpu_mem_gib")
    if not x:
        return False
    ax.plot(x, y, color="tab:red", label="peak allocated")
    rx, ry = _series(metrics.train, "gpu_mem_reserved_gib")
    if rx:
        ax.plot(rx, ry, color="tab:red", linestyle="--", label="peak reserved")
    ax.set_ylabel("GPU memory (GiB, per process)")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right")
    return True


_PANELS = (
    ("loss.png", "loss", _draw_loss),
    ("lr.png", "learning rate", _draw_lr),
    ("tokens_per_s.png", "throughput", _draw_throughput),
    ("gpu_memory.png", "GPU memory", _draw_memory),
)


def write_plots(metrics: Metrics, out_dir: str | Path) -> list[Path]:
    """Write one PNG per panel that has data, then `overview.png` with all four; return the paths.

    A panel without data (GPU memory on a CPU run, where it is null) gets no file of its own, and
    in the overview a note saying so instead of an empty or made-up curve. Existing files of these
    names in `out_dir` are replaced: they are generated from metrics.jsonl and nothing else.
    """
    from matplotlib.figure import Figure  # lazy: matplotlib costs ~0.5 s to import

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CrakenError(f"--out {out_dir} is a file: give a folder for the plots", title="cannot write the report")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CrakenError(f"--out {out_dir}: cannot create it ({exc.strerror or exc}): choose a writable folder",
                          title="cannot write the report") from None
    subtitle = _subtitle(metrics)
    written: list[Path] = []

    for filename, title, draw in _PANELS:
        # Fixed margins rather than a layout engine: constrained layout draws every figure twice.
        fig = Figure(figsize=(8, 4.5), dpi=100)
        fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.86)
        ax = fig.subplots()
        if draw(ax, metrics):
            _finish(ax, title, subtitle)
            path = out_dir / filename
            fig.savefig(path, format="png")
            written.append(path)
        else:
            stale = out_dir / filename  # from an earlier report of another run in the same folder
            stale.unlink(missing_ok=True)

    fig = Figure(figsize=(12, 8), dpi=100)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.07, top=0.9, wspace=0.22, hspace=0.35)
    axes = fig.subplots(2, 2).ravel()
    for ax, (_, title, draw) in zip(axes, _PANELS):
        if draw(ax, metrics):
            _finish(ax, title, None)
        else:
            ax.set_axis_off()
            device = (metrics.start or {}).get("device")
            why = f"device: {device}" if device else "no values in metrics.jsonl"
            ax.text(0.5, 0.5, f"{title}: not recorded\n({why})", ha="center", va="center",
                    transform=ax.transAxes, fontsize=12, color="0.4")
    if subtitle:
        fig.suptitle(subtitle)
    path = out_dir / "overview.png"
    fig.savefig(path, format="png")
    written.append(path)
    return written


def _finish(ax, title: str, subtitle: str | None) -> None:
    ax.set_title(f"{title}\n{subtitle}" if subtitle else title, fontsize=11)
    ax.set_xlabel("optimizer step")
    ax.grid(True, alpha=0.3)


def write_report(run: str | Path, out_dir: str | Path | None = None) -> tuple[Metrics, dict[str, Any], list[Path]]:
    """Read, summarize and plot one run; the plots go to `<run>/report/` unless `out_dir` is given.
    What `craken report` does, minus the printing (and what `craken train` calls at the end)."""
    metrics = read_metrics(run)
    summary = summarize(metrics)
    target = Path(out_dir) if out_dir is not None else metrics.path.parent / REPORT
    written = write_plots(metrics, target)
    if out_dir is None:  # the run's own report/: `train --force` removes these and leaves its other files
        note_written(target, written)
    return metrics, summary, written
