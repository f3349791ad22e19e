"""Checks of Python and the installed training stack, read from package metadata (nothing imported)."""

from __future__ import annotations

import re
import sys

from .model import DECLARERS, KNOWN_BAD, STACK, Check, Facts, RunView, Status, fmt_gib, parse_version


def check_system(f: Facts) -> list[Check]:
    out = []
    py = ".".join(map(str, f.python))
    if f.python_requires:
        from packaging.specifiers import SpecifierSet

        ok = SpecifierSet(f.python_requires).contains(py)
        out.append(Check("system", "python", "ok" if ok else "fail", f"Python {py} ({sys.executable})" if ok else
                         f"Python {py}; craken needs {f.python_requires}",
                         "" if ok else f"use a Python {f.python_requires} environment"))
    else:
        out.append(Check("system", "python", "ok", f"Python {py}"))
    hw = f.hardware
    out.append(Check("system", "cpu", "ok", f"{hw.cpu_count} cores, RAM {fmt_gib(hw.ram_total)} "
                     f"({fmt_gib(hw.ram_available)} available)"))
    return out


def applicable_requirements(lines: list[str]) -> list:
    """Parsed requirements that apply to this install: optional extras and other platforms dropped."""
    from packaging.requirements import InvalidRequirement, Requirement

    out = []
    for line in lines:
        if "extra ==" in line or "extra==" in line:  # cheap filter first: transformers lists hundreds
            continue
        try:
            r = Requirement(line)
            if r.marker is not None and not r.marker.evaluate({"extra": ""}):
                continue
        except (InvalidRequirement, Exception):  # an unknown marker variable: not ours to judge
            continue
        out.append(r)
    return out


def _broken(r, installed: str | None) -> bool:
    """Does the installed version (None: missing) break requirement `r`?"""
    if installed is None:
        return True
    v = parse_version(installed)
    return v is not None and bool(r.specifier) and not r.specifier.contains(v, prereleases=True)


def check_packages(f: Facts) -> list[Check]:
    from packaging.utils import canonicalize_name as canon

    out = []
    v = f.versions
    installed = {canon(k): val for k, val in v.items()}
    declared = {d: applicable_requirements(f.requires.get(d, [])) for d in DECLARERS}
    stack = {canon(d) for d in STACK}
    for dist in STACK:
        if v.get(dist) is None:
            hint = ("install a torch build for this machine first (https://pytorch.org/get-started/locally/)"
                    if dist == "torch" else f"pip install {dist}")
            status: Status = "warn" if dist == "nvidia-ml-py" and not f.hardware.gpus else "fail"
            why = " (GPUs cannot be detected)" if dist == "nvidia-ml-py" else ""
            out.append(Check("packages", dist, status, f"not installed{why}", hint))
            continue
        broken = [(declarer, r) for declarer, reqs in declared.items() if declarer != dist
                  for r in reqs if canon(r.name) == canon(dist) and _broken(r, v[dist])]
        detail = v[dist]
        if dist == "torch" and f.torch_build:
            detail += f" ({'CPU-only build' if f.torch_build == 'cpu' else 'build for ' + f.torch_build})"
        if broken:
            why = "; ".join(f"{d} {v.get(d)} needs {r.name}{r.specifier}" for d, r in broken)
            out.append(Check("packages", dist, "fail", f"{v[dist]}: {why}", f"pip install '{dist}{broken[0][1].specifier}'"))
        else:
            out.append(Check("packages", dist, "ok", detail))
    # what the stack declares on other packages (numpy, huggingface-hub, tokenizers, ...)
    for declarer, reqs in declared.items():
        for r in reqs:
            name = canon(r.name)
            if name in stack or name not in installed or installed[name] is None:
                continue  # the stack is above; a missing one pip would have installed
            if _broken(r, installed[name]):
                out.append(Check("packages", r.name, "fail", f"{installed[name]}, but {declarer} {v.get(declarer)} "
                                 f"needs {r.name}{r.specifier}", f"pip install '{r.name}{r.specifier}'"))
    for pkg, below, other, at_least, why, fix in KNOWN_BAD:
        a, b = parse_version(v.get(pkg)), parse_version(v.get(other))
        if a is not None and b is not None and a < parse_version(below) and b >= parse_version(at_least):
            out.append(Check("packages", f"{pkg} + {other}", "fail", f"{pkg} {v[pkg]} with {other} {v[other]}: {why}",
                             fix))
    return out


def check_tracker(f: Facts, view: RunView | None) -> list[Check]:
    """The package of the run's --report-to tracker (accelerate would drop a missing one silently)."""
    from ..launch.preflight import TRACKER_PACKAGES

    if view is None or view.spec.logging.report_to == "none":
        return []
    report_to = view.spec.logging.report_to
    names = TRACKER_PACKAGES[report_to]
    found = [(n, f.versions.get(n)) for n in names if f.versions.get(n)]
    if found:
        return [Check("packages", found[0][0], "ok", f"{found[0][1]} (--report-to {report_to})")]
    return [Check("packages", names[0], "fail", f"not installed (--report-to {report_to})",
                  f"pip install {names[0]}, or --report-to none")]


def torch_build_of(version: str | None, requires: list[str]) -> str | None:
    """'cpu', '12.4', 'rocm6.1' or None, from torch's version string and its declared CUDA wheels.

    '+cu124' -> '12.4'; '+cpu' -> 'cpu'; no local tag (PyPI's Linux wheels) -> the version of the
    nvidia-cuda-runtime wheel torch depends on.
    """
    if version is None:
        return None
    local = version.partition("+")[2]
    m = re.fullmatch(r"cu(\d+)(\d)", local)
    if m:
        return f"{int(m.group(1))}.{m.group(2)}"
    if local == "cpu":
        return "cpu"
    if local.startswith("rocm"):
        return local
    for req in requires:
        # torch <= 2.8 pins nvidia-cuda-runtime(-cu12); the CUDA 13 wheels pin cuda-toolkit[cudart,...]
        m = re.match(r"(?:nvidia-cuda-runtime(?:-cu\d+)?|cuda-toolkit)(?:\[[^\]]*\])?\s*[=~]=\s*(\d+)\.(\d+)", req)
        if m:
            return f"{m.group(1)}.{m.group(2)}"
    return None
