"""`craken doctor`'s checks: every environment problem found before launch, each with its fix.

Two halves, kept apart so that tests call the checks on any machine they can describe:

    facts = gather(hardware, view, environ)      # impure: package metadata, PATH, sockets, disks
    checks = run_checks(facts, view)             # pure: Facts -> [Check(area, name, status, ...)]

One module per group of checks (`packages`, `gpu`, `ops`, `resources`, `network`, `run`), the data
they share in `model`, the reading in `collect` (`gather`), `--deep` in `deep`, the report in `output`; the
DeepSpeed-op facts the preflight also reads live in `dsops`. Nothing here imports torch,
deepspeed, transformers or accelerate (`craken doctor` answers in well under a second); versions come
from package metadata. Only `deep_checks()` (`--deep`) imports torch and DeepSpeed and builds the ops.
"""

from __future__ import annotations

from typing import Sequence

from ..runfolder import VERDICT_EXIT
from .collect import gather, path_state
from .deep import deep_checks
from .gpu import check_fp8, check_gpus
from .model import (AREAS, BUILTIN_PARAMS_BOUND, STACK, Check, Facts, PathState, RunView, exit_code,
                    needed_ops, run_view, verdict)
from .network import check_env, check_network, port_error, resolve_address
from .ops import check_ops
from .output import render_plain, report_dict, verdict_line
from .packages import check_packages, check_system, check_tracker, torch_build_of
from .resources import check_disk, check_memory, model_params, offload_ram, params_from_config
from .run import check_run

__all__ = ["AREAS", "BUILTIN_PARAMS_BOUND", "STACK", "VERDICT_EXIT", "Check", "Facts", "PathState", "RunView",
           "check_disk", "check_env", "check_fp8", "check_gpus", "check_memory", "check_network", "check_ops",
           "check_packages", "check_run", "check_system", "check_tracker", "deep_checks", "exit_code", "gather",
           "model_params", "needed_ops", "offload_ram", "params_from_config", "path_state", "port_error",
           "render_plain", "report_dict", "resolve_address", "run_checks", "run_view", "torch_build_of",
           "verdict", "verdict_line"]


def run_checks(facts: Facts, view: RunView | None, spec_problems: Sequence[str] = ()) -> list[Check]:
    """Every check, in area order. `view` is None when the settings themselves are invalid (`spec_problems`)."""
    checks: list[Check] = []
    checks += check_system(facts)
    checks += check_packages(facts)
    checks += check_tracker(facts, view)
    checks += check_gpus(facts, view)
    checks += check_fp8(facts, view)
    if view is not None:
        checks += check_ops(facts, view)
        checks += check_memory(facts, view)
        checks += check_disk(facts, view)
    else:
        checks += check_ops(facts, None)
    checks += check_network(facts, view)
    checks += check_run(view, spec_problems)
    order = {a: i for i, a in enumerate(AREAS)}
    return sorted(checks, key=lambda c: order.get(c.area, len(order)))  # stable within an area
