"""The report: JSON for --json, plain text for pipes and logs."""

from __future__ import annotations

from dataclasses import asdict

from ..plan.hardware import Hardware
from ..runfolder import VERDICT_EXIT
from .model import STACK, Check, Facts, verdict


def hardware_dict(hw: Hardware) -> dict:
    d = asdict(hw)
    d["nvlink_pairs"] = sorted(map(list, hw.nvlink_pairs))
    d["p2p_pairs"] = sorted(map(list, hw.p2p_pairs))
    for g, raw in zip(d["gpus"], hw.gpus):
        g["capability"] = list(raw.capability)
        g["bf16"], g["fp8"] = raw.bf16, raw.fp8
    d["links"] = hw.links()
    return d


def report_dict(checks: list[Check], facts: Facts) -> dict:
    v = verdict(checks)
    return {
        "verdict": v, "exit_code": VERDICT_EXIT[v],
        "counts": {s: sum(c.status == s for c in checks) for s in VERDICT_EXIT},
        "checks": [asdict(c) for c in checks],
        "hardware": hardware_dict(facts.hardware),
        "versions": {k: facts.versions.get(k) for k in STACK},
        "torch_build": facts.torch_build,
    }


def verdict_line(checks: list[Check]) -> str:
    v = verdict(checks)
    n = {s: sum(c.status == s for c in checks) for s in VERDICT_EXIT}
    if v == "ok":
        return f"verdict: ok, all {len(checks)} checks passed (exit 0)"
    parts = [f"{n['fail']} failure(s)"] if n["fail"] else []
    parts += [f"{n['warn']} warning(s)"] if n["warn"] else []
    word = "FAIL" if v == "fail" else "WARN"
    return f"verdict: {word}, {', '.join(parts)} in {len(checks)} checks (exit {VERDICT_EXIT[v]})"


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
