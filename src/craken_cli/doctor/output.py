"""The report: JSON for --json, plain text for pipes and logs."""

from __future__ import annotations

from dataclasses import asdict

from ..plan.hardware import Hardware
from ..runfolder import VERDICT_EXIT
from .model import STACK, Check, Facts, verdict


def hardware_dict(hw: Hardware) -> dict:
    out = asdict(hw)
    out["nvlink_pairs"] = sorted(map(list, hw.nvlink_pairs))
    out["p2p_pairs"] = sorted(map(list, hw.p2p_pairs))
    for gpu, raw in zip(out["gpus"], hw.gpus):
        gpu["capability"] = list(raw.capability)
        gpu["bf16"], gpu["fp8"] = raw.bf16, raw.fp8
    out["links"] = hw.links()
    return out


def report_dict(checks: list[Check], facts: Facts) -> dict:
    overall = verdict(checks)
    return {
        "verdict": overall, "exit_code": VERDICT_EXIT[overall],
        "counts": {s: sum(c.status == s for c in checks) for s in VERDICT_EXIT},
        "checks": [asdict(c) for c in checks],
        "hardware": hardware_dict(facts.hardware),
        "versions": {k: facts.versions.get(k) for k in STACK},
        "torch_build": facts.torch_build,
    }


def verdict_line(checks: list[Check]) -> str:
    overall = verdict(checks)
    counts = {s: sum(c.status == s for c in checks) for s in VERDICT_EXIT}
    if overall == "ok":
        return f"verdict: ok, all {len(checks)} checks passed (exit 0)"
    parts = [f"{counts['fail']} failure(s)"] if counts["fail"] else []
    parts += [f"{counts['warn']} warning(s)"] if counts["warn"] else []
    word = "FAIL" if overall == "fail" else "WARN"
    return f"verdict: {word}, {', '.join(parts)} in {len(checks)} checks (exit {VERDICT_EXIT[overall]})"


def render_plain(checks: list[Check]) -> str:
    """Text for pipes and logs: no colours, no box drawing, one line per check (+ its fix)."""
    lines = []
    area = None
    for c in checks:
        if c.area != area:
            area = c.area
            lines.append(f"[{area}]")
        lines.append(f"  {c.status.upper():4}  {c.name}: {c.detail}")
        if c.fix and c.status != "ok":
            lines.append(f"        fix: {c.fix}")
    lines.append(verdict_line(checks))
    return "\n".join(lines)
