"""Worker side of `craken launch`: each process runs the user's script through this host,

    accelerate launch --config_file RUN/accelerate.yaml -m craken_cli.launch.script_host RUN/run.yaml \
        (SCRIPT | -m MODULE) [SCRIPT ARGS...]

which prepares what a script cannot know, then runs it with runpy as `__main__` (sys.argv as if it
had been started itself):

- CPU processes: accelerate finds no distributed backend on a CPU and would run each process alone
  (num_processes 1, no data sharding); the host starts the gloo group first (accelerate's PartialState),
  which the script's Accelerator or TrainingArguments then joins.
- HF Trainer scripts: `TrainingArguments.__post_init__` is wrapped so that what the script leaves at
  its default takes craken's planned value (userscript.trainer_plan) and what it sets against the plan
  stops the run with one message naming the craken flag; the Trainer's DeepSpeed check then finds the
  JSON and the arguments equal.
- Plain Accelerate scripts: `accelerator.prepare(model, ...)` called from the script stops the run when
  its DataLoader or its optimizer's lr contradicts the plan (userscript.prepare_problems).
- Raw DeepSpeed scripts (DeepSpeedExamples' shape, written for the deepspeed launcher): an argparse
  parser that declares `--local_rank` gets `--local_rank=N` as that launcher passes it (torchrun sets
  only LOCAL_RANK), and the script's own `deepspeed.initialize(...)` gets the rendered JSON; a config
  of its own, or no optimizer on either side, stops the run (userscript.initialize_problems).
- Failures: the script's exception is printed from the script's own frames and recorded in torchrun's
  per-rank error file (TORCHELASTIC_ERROR_FILE), from which `craken launch` words its one message.

Plain Accelerate scripts read the plan from the CRAKEN_PLAN_* variables (userscript.plan_env).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import MISSING, fields
from pathlib import Path

from ..runfolder import DS_FILE, EXIT_CODES as CODES, machine_file
from . import userscript
from .launcher import record_error

PLAN_CONFLICT_EXIT = CODES["bad_input"]


class PlanConflict(Exception):
    """The script set TrainingArguments against craken's plan; `problems` lists every such value, one each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))  # for display only; readers take .problems


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or (args[1] == "-m" and len(args) < 3):
        print("usage: python -m craken_cli.launch.script_host RUN/run.yaml (SCRIPT | -m MODULE) [ARGS...]", file=sys.stderr)
        return CODES["bad_input"]
    run_file = Path(args[0]).resolve()
    module = args[2] if args[1] == "-m" else None
    script = None if module else args[1]
    script_args = args[3:] if module else args[2:]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from ..config.sources import build_spec, file_layer

    spec = build_spec([file_layer(run_file)]).spec
    run_dir = run_file.parent
    if spec.cluster.use_cpu:
        from accelerate import PartialState

        PartialState(backend="gloo")
    ds_path = run_dir / machine_file(DS_FILE, spec.cluster.machine_rank)
    ds_config = rendered_ds_config(ds_path)
    install_trainer_plan(userscript.trainer_plan(spec, run_dir, "optimizer" in ds_config,
                                                 "scheduler" in ds_config))
    patch_argparse_local_rank()
    patch_on_import("accelerate.accelerator", lambda module: patch_accelerator_prepare(
        module.Accelerator, spec.batch.micro_batch, spec.optimizer.lr, ds_config))
    patch_on_import("deepspeed", lambda module: patch_deepspeed_initialize(module, ds_path, ds_config))
    return run_target(script, module, script_args)


def rendered_ds_config(path: Path) -> dict:
    """The JSON DeepSpeed reads (the one fact: whether it holds the optimizer); {} without DeepSpeed."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_target(script: str | None, module: str | None, script_args: list[str]) -> int:
    import runpy

    sys.argv = [module or script, *script_args]
    try:
        if module:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, str(Path(script).resolve().parent))  # as `python SCRIPT` does
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exit_code(exc.code)
        if code:
            record_error(exc)  # "SystemExit: 3", and when: the rank that exited first is the one named
        return code
    except KeyboardInterrupt:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the second copy of the same Ctrl-C
        return CODES["sigint"]
    except PlanConflict as exc:  # craken launch words it from the error file; printed only without one
        if not record_error(exc, exc.problems) and int(os.environ.get("RANK", "0")) == 0:
            for problem in exc.problems:
                print(f"craken: {problem}", file=sys.stderr, flush=True)
        return PLAN_CONFLICT_EXIT
    except BaseException as exc:  # the script's own failure: its traceback, and torchrun's error file
        print_script_traceback(exc, script or module)
        record_error(exc)
        return CODES["failed"]
    return 0


def exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr, flush=True)  # sys.exit("message") prints it and exits 1
    return 1


def print_script_traceback(exc: BaseException, name: str) -> None:
    """The traceback from the first frame of the user's code on (runpy's and the host's frames dropped)."""
    tb = exc.__traceback__
    while tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().parent == Path(__file__).parent:
        tb = tb.tb_next
    while tb is not None and "runpy" in Path(tb.tb_frame.f_code.co_filename).name:
        tb = tb.tb_next
    rank = os.environ.get("RANK", "0")
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    print(f"[rank {rank}] {text}", end="", file=sys.stderr, flush=True)


# --- HF TrainingArguments -----------------------------------------------------------------------------

def install_trainer_plan(plan: dict) -> None:
    """Wrap TrainingArguments.__post_init__ once transformers' training_args is imported (a script that
    never imports transformers pays nothing)."""
    patch_on_import("transformers.training_args", lambda module: patch_training_arguments(module.TrainingArguments,
                                                                                          plan))


def patch_on_import(name: str, patch) -> None:
    """`patch(module)` now if `name` is imported, else right after it first executes."""
    if name in sys.modules:
        patch(sys.modules[name])
        return
    sys.meta_path.insert(0, _PatchOnImport(name, patch))


class _PatchOnImport:
    """Import hook: runs `patch` on module `name` right after it executes."""

    def __init__(self, name: str, patch):
        self.name, self.patch = name, patch

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        import importlib.machinery

        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader, patch = spec.loader, self.patch
        original = loader.exec_module

        def exec_module(module):
            original(module)
            patch(module)

        loader.exec_module = exec_module
        return spec


def patch_training_arguments(cls, plan: dict) -> None:
    """`__new__` notes which fields the script passed (inherited by subclasses such as trl's SFTConfig, whose
    dataclass __init__ is their own); `__post_init__` then reconciles them with the plan before anything
    reads them."""
    if getattr(cls.__post_init__, "_craken_plan", False):
        return
    original = cls.__post_init__

    def __new__(klass, *args, **kwargs):
        self = object.__new__(klass)
        names = [f.name for f in fields(klass) if f.init]
        self.__dict__["_craken_given"] = {*names[:len(args)], *kwargs}
        return self

    def __post_init__(self, *args, **kwargs):
        reconcile(self, plan)
        original(self, *args, **kwargs)

    __post_init__._craken_plan = True
    cls.__new__ = __new__
    cls.__post_init__ = __post_init__


def reconcile(args, plan: dict) -> None:
    """Fill the fields the script left unset from the plan; refuse the ones it set against the plan."""
    conflicts = []
    defaults = {f.name: field_default(f) for f in fields(type(args)) if f.init}
    given = args.__dict__.pop("_craken_given", set())
    if set(defaults) <= given:  # HfArgumentParser passes every field: what equals its default was not given
        given = {name for name in defaults if not is_default(getattr(args, name), defaults[name])}
    for name, planned in plan.items():
        if name not in defaults:
            continue
        value = getattr(args, name)
        if name not in given:
            setattr(args, name, planned.value)
        elif planned.must_agree and not userscript.agrees(value, planned.value):
            conflicts.append(userscript.conflict_message(name, value, planned))
    if getattr(args, "deepspeed", None):
        conflicts.append(userscript.trainer_deepspeed_message(args.deepspeed))
    if conflicts:
        raise PlanConflict(conflicts)


def field_default(f):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def is_default(value, default) -> bool:
    if default is MISSING:
        return False
    return value == default or str(getattr(value, "value", value)) == str(getattr(default, "value", default))


# --- raw DeepSpeed scripts ----------------------------------------------------------------------------

def wrap_once(owner, name: str, wrap) -> None:
    """`owner.name = wrap(original)`, marked: a second patch of the same function leaves it as it is."""
    original = getattr(owner, name)
    if getattr(original, "_craken_plan", False):
        return
    wrapped = wrap(original)
    wrapped._craken_plan = True
    setattr(owner, name, wrapped)


def called_by_library() -> bool:
    """Whether the patched function's caller (two frames up) is one of LIBRARY_CALLERS."""
    return sys._getframe(2).f_globals.get("__name__", "").split(".")[0] in LIBRARY_CALLERS


def patch_argparse_local_rank() -> None:
    """A parser reading the command line that declares `--local_rank` / `--local-rank` gets this process's
    rank, as the deepspeed launcher and torch.distributed.launch pass it (userscript.local_rank_args)."""
    import argparse

    def wrap(original):
        def parse_known_args(self, args=None, namespace=None):
            if args is None:
                argv = sys.argv[1:]
                extra = userscript.local_rank_args(list(self._option_string_actions), argv,
                                                   os.environ.get("LOCAL_RANK"))
                if extra:
                    args = [*argv, *extra]
            return original(self, args, namespace)
        return parse_known_args

    wrap_once(argparse.ArgumentParser, "parse_known_args", wrap)


def patch_accelerator_prepare(cls, micro_batch: int, lr: float, ds_config: dict) -> None:
    """The script's own `accelerator.prepare(model, ...)` (not the Trainer's, whose values the plan fills)
    is checked before DeepSpeed is built from it: its loader and lr against the plan, its torch optimizer
    and scheduler against the JSON's blocks."""
    import functools

    def wrap(original):
        @functools.wraps(original)
        def prepare(self, *objects, **kwargs):
            if not called_by_library():
                split_across = self.num_processes if getattr(self, "split_batches", False) else 1
                problems = (userscript.prepare_problems(*prepared_values(objects), micro_batch, lr, split_across)
                            + userscript.client_block_problems(*client_classes(objects), ds_config))
                if problems:
                    raise PlanConflict(problems)
            return original(self, *objects, **kwargs)
        return prepare

    wrap_once(cls, "prepare", wrap)


def prepared_values(objects) -> tuple[list[int], list[list[float]]]:
    """The DataLoaders' batch sizes and the torch optimizers' base lrs of a training prepare call (one with
    the model; a later call for an eval loader alone is the script's business)."""
    import torch

    if not any(isinstance(o, torch.nn.Module) for o in objects):
        return [], []
    sizes = [o.batch_size for o in objects if isinstance(o, torch.utils.data.DataLoader) and o.batch_size]
    lrs = [[g.get("initial_lr", g.get("lr")) for g in o.param_groups if isinstance(g.get("lr"), (int, float))]
           for o in objects if isinstance(o, torch.optim.Optimizer)]  # accelerate's DummyOptim is none
    return sizes, lrs


def client_classes(objects) -> tuple[list[str], list[str]]:
    """The class names of the torch optimizers and schedulers among a prepare call's objects (accelerate's
    DummyOptim / DummyScheduler are neither)."""
    import torch

    if not any(isinstance(o, torch.nn.Module) for o in objects):  # as prepared_values: the training call
        return [], []
    return ([type(o).__name__ for o in objects if isinstance(o, torch.optim.Optimizer)],
            [type(o).__name__ for o in objects if isinstance(o, torch.optim.lr_scheduler.LRScheduler)])


# Callers left alone: the Trainer's prepare calls carry its TrainingArguments (the plan's already, or
# stopped), accelerate's deepspeed.initialize the JSON as accelerate filled it; an eval loader of the
# Trainer may differ from the micro-batch.
LIBRARY_CALLERS = ("accelerate", "transformers", "trl")


def patch_deepspeed_initialize(module, ds_path: Path, ds_config: dict) -> None:
    """The script's own `deepspeed.initialize(...)` trains with the rendered JSON: given none, it gets that
    file; given another, or no optimizer where the JSON has none, the run stops (PlanConflict)."""
    import functools
    import inspect

    def wrap(original):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def initialize(*args, **kwargs):
            if called_by_library():
                return original(*args, **kwargs)
            bound = signature.bind(*args, **kwargs).arguments
            namespace = bound.get("args")
            configs = {name: bound[name] for name in ("config", "config_params") if bound.get(name) is not None}
            for name in ("deepspeed_config", "deepscale_config"):
                if getattr(namespace, name, None) is not None:
                    configs[f"args.{name} (--{name})"] = getattr(namespace, name)
            problems = userscript.initialize_problems(configs, bound.get("optimizer") is not None, ds_path,
                                                      ds_config)
            if problems:
                raise PlanConflict(problems)
            if not configs:
                return original(**{**bound, "config": str(ds_path)})
            return original(*args, **kwargs)
        return initialize

    wrap_once(module, "initialize", wrap)


def leave(code: int) -> None:
    """Exit without interpreter teardown (train.loop.exit_without_teardown says why), deaf to a second
    Ctrl-C: craken and torchrun both pass the first one on, and the script has already returned."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # leaving anyway; the group dies with the process
        pass
    from ..train.loop import exit_without_teardown

    exit_without_teardown(code)


if __name__ == "__main__":
    leave(main())
