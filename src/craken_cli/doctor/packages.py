"""Checks of Python and the installed training stack, read from package metadata (nothing imported)."""

from __future__ import annotations

import re
import sys

from .model import DECLARERS, KNOWN_BAD, STACK, Check, Facts, RunView, Status, fmt_gib, parse_version


def check_system(facts: Facts) -> list[Check]:
    out = []
    py = ".".join(map(str, facts.python))
    if facts.python_requires:
        from packaging.specifiers import SpecifierSet

        ok = SpecifierSet(facts.python_requires).contains(py)
        out.append(Check("system", "python", "ok" if ok else "fail", f"Python {py} ({sys.executable})" if ok else
                         f"Python {py}; craken needs {facts.python_requires}",
                         "" if ok else f"use a Python {facts.python_requires} environment"))
    else:
        out.append(Check("system", "python", "ok", f"Python {py}"))
    hw = facts.hardware
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
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
        except (InvalidRequirement, Exception):  # an unknown marker variable: not ours to judge
            continue
        out.append(requirement)
    return out


def _broken(requirement, installed: str | None) -> bool:
    """Does the installed version (None: missing) break `requirement`?"""
    if installed is None:
        return True
    version = parse_version(installed)
    return (version is not None and bool(requirement.specifier)
            and not requirement.specifier.contains(version, prereleases=True))


def check_packages(facts: Facts) -> list[Check]:
    from packaging.utils import canonicalize_name as canon

    out = []
    versions = facts.versions
    installed = {canon(k): val for k, val in versions.items()}
    declared = {d: applicable_requirements(facts.requires.get(d, [])) for d in DECLARERS}
    stack = {canon(d) for d in STACK}
    for dist in STACK:
        if versions.get(dist) is None:
            hint = ("install a torch build for this machine first (https://pytorch.org/get-started/locally/)"
                    if dist == "torch" else f"pip install {dist}")
            status: Status = "warn" if dist == "nvidia-ml-py" and not facts.hardware.gpus else "fail"
            why = " (GPUs cannot be detected)" if dist == "nvidia-ml-py" else ""
            out.append(Check("packages", dist, status, f"not installed{why}", hint))
            continue
        broken = [(declarer, r) for declarer, reqs in declared.items() if declarer != dist
                  for r in reqs if canon(r.name) == canon(dist) and _broken(r, versions[dist])]
        detail = versions[dist]
        if dist == "torch" and facts.torch_build:
            detail += f" ({'CPU-only build' if facts.torch_build == 'cpu' else 'build for ' + facts.torch_build})"
        if broken:
            why = "; ".join(f"{d} {versions.get(d)} needs {r.name}{r.specifier}" for d, r in broken)
            out.append(Check("packages", dist, "fail", f"{versions[dist]}: {why}",
                             f"pip install '{dist}{broken[0][1].specifier}'"))
        else:
            out.append(Check("packages", dist, "ok", detail))
    # what the stack declares on other packages (numpy, huggingface-hub, tokenizers, ...)
    for declarer, reqs in declared.items():
        for r in reqs:
            name = canon(r.name)
            if name in stack or name not in installed or installed[name] is None:
                continue  # the stack is above; a missing one pip would have installed
            if _broken(r, installed[name]):
                out.append(Check("packages", r.name, "fail", f"{installed[name]}, but {declarer} "
                                 f"{versions.get(declarer)} needs {r.name}{r.specifier}",
                                 f"pip install '{r.name}{r.specifier}'"))
    for pkg, below, other, at_least, why, fix in KNOWN_BAD:
        pkg_version, other_version = parse_version(versions.get(pkg)), parse_version(versions.get(other))
        if (pkg_version is not None and other_version is not None and pkg_version < parse_version(below)
                and other_version >= parse_version(at_least)):
            out.append(Check("packages", f"{pkg} + {other}", "fail",
                             f"{pkg} {versions[pkg]} with {other} {versions[other]}: {why}", fix))
    return out


def check_tracker(facts: Facts, view: RunView | None) -> list[Check]:
    """The package of the run's --report-to tracker (accelerate would drop a missing one silently)."""
    from ..launch.preflight import TRACKER_PACKAGES

    if view is None or view.spec.logging.report_to == "none":
        return []
    report_to = view.spec.logging.report_to
    names = TRACKER_PACKAGES[report_to]
    found = [(n, facts.versions.get(n)) for n in names if facts.versions.get(n)]
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
    cuda = re.fullmatch(r"cu(\d+)(\d)", local)
    if cuda:
        return f"{int(cuda.group(1))}.{cuda.group(2)}"
    if local == "cpu":
        return "cpu"
    if local.startswith("rocm"):
        return local
    for req in requires:
        # torch <= 2.8 pins nvidia-cuda-runtime(-cu12); the CUDA 13 wheels pin cuda-toolkit[cudart,...]
        cuda = re.match(r"(?:nvidia-cuda-runtime(?:-cu\d+)?|cuda-toolkit)(?:\[[^\]]*\])?\s*[=~]=\s*(\d+)\.(\d+)", req)
        if cuda:
            return f"{cuda.group(1)}.{cuda.group(2)}"
    return None
