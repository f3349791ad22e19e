"""`craken launch`: what craken knows about a user's own training script, as pure functions.

    Target              the script file or module, and the arguments that go to it untouched
    target_problems     a missing / non-Python script, a module that is not found (before launch)
    find_module         a `-m` module's spec, found without running its packages' __init__.py
    script_files        the rendered files as a user script gets them: without DeepSpeed's optimizer and
                        scheduler blocks, unless DeepSpeed runs the optimizer (offload, --ds-optimizer)
    plan_env            the planned values, as the CRAKEN_PLAN_* variables a plain Accelerate script reads
    trainer_plan        the TrainingArguments fields craken plans (value, and the craken flag that sets it)
    arg_problems        script arguments that contradict the plan (`--per_device_train_batch_size 8`) or
                        bring a DeepSpeed config of their own (`--deepspeed ds.json`, `--deepspeed_config ds.json`)
    engine_without_optimizer   a raw DeepSpeed script whose deepspeed.initialize gets no optimizer (read with ast)
    dummy_use           an Accelerate script that builds accelerate's DummyOptim / DummyScheduler whatever the
                        plan (read with ast), and `dummy_problems`: where the JSON cannot hold what they need
    local_rank_args     the `--local_rank=N` the deepspeed launcher would pass, for a parser that declares it
    prepare_problems    a plain Accelerate script's DataLoader batch size and optimizer lr against the plan
    initialize_problems a raw DeepSpeed script's deepspeed.initialize call judged against the rendered JSON

The worker side (`script_host`) applies `trainer_plan` to the script's TrainingArguments, `local_rank_args`
to its argparse parsers and `initialize_problems` to its deepspeed.initialize. Standard library only, so
the host can import it before torch.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from ..config.spec import ADAM_TYPES
from ..runfolder import DS_FILE, machine_file

PLAN_ENV_PREFIX = "CRAKEN_PLAN_"
# What a script finds beside its own output: the Trainer's output_dir when the script leaves it unset.
SCRIPT_OUTPUT = "output"
# The planned schedule, as the HF Trainer names it (cosine ends at min_lr_ratio through its kwargs).
HF_SCHEDULERS = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass(frozen=True)
class Target:
    """`craken launch SCRIPT ARGS` (module None) or `craken launch -m MODULE ARGS` (script None)."""

    script: str | None = None
    module: str | None = None
    args: tuple[str, ...] = field(default_factory=tuple)

    @property
    def host_args(self) -> list[str]:
        """What follows `-m craken_cli.launch.script_host RUN/run.yaml` in the workers' command."""
        head = ["-m", self.module] if self.module else [str(Path(self.script).absolute())]
        return [*head, *self.args]

    @property
    def shown(self) -> str:
        return f"-m {self.module}" if self.module else str(self.script)


def target_problems(target: Target) -> list[str]:
    """What makes the target unrunnable, found before anything is launched or written."""
    if target.module:
        return module_problems(target.module)
    path = Path(target.script)
    if not path.exists():
        return [f"script {path} does not exist: check the path (a module is run with -m MODULE)"]
    if path.is_dir():
        return [f"script {path} is a folder, not a Python file: name the .py file, or run a package with -m PACKAGE"]
    if not path.is_file():
        return [f"script {path} is not a regular file (a device, a pipe, ...): name the .py file"]
    if path.suffix != ".py":
        return [f"script {path} is not a .py file: craken launch runs Python training scripts "
                "(run other programs with accelerate launch --no_python yourself)"]
    try:
        compile(path.read_bytes(), str(path), "exec")
    except SyntaxError as exc:
        return [f"script {path} is not valid Python (line {exc.lineno}: {exc.msg}): fix the script"]
    except (OSError, ValueError) as exc:
        return [f"script {path} cannot be read as Python ({exc}): fix the script"]
    return []


def find_module(module: str):
    """The spec of `module` as `python -m` in the current folder would find it, without running any of its
    code: importlib.util.find_spec imports a dotted name's parent packages (their __init__.py runs in the
    CLI process), so past the top-level name each part is looked up in its parent's folders alone. None
    when it is not found (or is no module name). A parent that rewrites its __path__ when imported is not
    followed; the workers still run the module as Python would."""
    import sys

    parts = module.split(".")
    if not all(part.isidentifier() for part in parts):
        return None
    # The workers start as `python -m`, which puts the current folder first on the path.
    sys.path.insert(0, os.getcwd())
    try:
        # A top-level name is found without being imported, by every finder (editable installs' too).
        found = importlib.util.find_spec(parts[0])
    except Exception:  # a finder of an installed package's own (an editable install's) failing
        return None
    finally:
        sys.path.pop(0)
    for depth in range(1, len(parts)):
        if found is None or found.submodule_search_locations is None:
            return None
        found = importlib.machinery.PathFinder.find_spec(".".join(parts[:depth + 1]),
                                                         list(found.submodule_search_locations))
    return found


def module_main(found) -> str | None:
    """The file `python -m` runs for a found module: its own, or a package's __main__.py (None: none)."""
    if found.submodule_search_locations is None:
        return found.origin
    return next((str(Path(folder) / "__main__.py") for folder in found.submodule_search_locations
                 if (Path(folder) / "__main__.py").is_file()), None)


def module_problems(module: str) -> list[str]:
    found = find_module(module)
    if found is None:
        return [f"module {module} is not found on this Python's path: install it, or run from the folder that "
                "holds it"]
    if module_main(found) is None:
        return [f"module {module} is a package without __main__.py: name the module that trains ({module}.train?)"]
    return []


class DummyUse(NamedTuple):
    """accelerate's placeholders a script builds outside any condition: DummyOptim trains with the JSON's
    optimizer block, DummyScheduler (without its lr_scheduler_callable) with the JSON's scheduler block."""

    optimizer: bool = False
    scheduler: bool = False


def keeps_ds_optimizer(spec, requested: bool | None, engine_without_optimizer: bool = False,
                       dummy: DummyUse = DummyUse()) -> bool:
    """Whether the JSON keeps craken's optimizer block for a user script. A script builds its own
    optimizer (torch.optim.AdamW, or the Trainer's), and accelerate refuses one in the code beside one
    in the config; offloaded optimizer states, though, only DeepSpeed's CPU Adam steps (it refuses a
    torch optimizer there), so then the script takes accelerate's DummyOptim/DummyScheduler.
    A raw DeepSpeed script that gives deepspeed.initialize no optimizer trains with the JSON's, and
    without one DeepSpeed would build an engine that never updates the weights; a script that builds
    DummyOptim whatever the plan needs the JSON's too (accelerate refuses a DummyOptim without one), and
    so does a deepspeed.extra optimizer the user asked for (asks_ds_optimizer)."""
    if requested is not None:
        return requested
    return (spec.offload.optimizer.device != "none" or engine_without_optimizer or dummy.optimizer
            or asks_ds_optimizer(spec))


def asks_ds_optimizer(spec) -> bool:
    """deepspeed.extra names an optimizer other than the Adam a script builds itself (Lamb, Lion, Adagrad,
    a torch.optim class): the user asked for DeepSpeed's, which dropping the block would replace by the
    script's without a word. An Adam/AdamW type only restates craken's own optimizer."""
    kind = spec.deepspeed.optimizer_type()
    return spec.uses_deepspeed and kind is not None and kind not in ADAM_TYPES


def keeps_ds_scheduler(spec, requested: bool | None, engine_without_optimizer: bool = False,
                       dummy: DummyUse = DummyUse()) -> bool:
    """Whether the JSON keeps its scheduler block (craken's, or the one deepspeed.extra gives): with the
    optimizer block (offload, a raw DeepSpeed engine, --ds-optimizer, a deepspeed.extra optimizer), for a
    script that builds DummyScheduler whatever the plan, or for a deepspeed.extra scheduler. A DummyOptim
    script without one keeps no scheduler block: accelerate refuses any other scheduler object beside a
    DummyOptim, so such a script steps none, and a block would be a schedule it never asked for."""
    if requested is not None:
        return requested
    return (spec.offload.optimizer.device != "none" or engine_without_optimizer or dummy.scheduler
            or asks_ds_optimizer(spec) or "scheduler" in spec.deepspeed.extra)  # a schedule the user wrote


DUMMY_NAMES = ("DummyOptim", "DummyScheduler")
# What makes a call run only sometimes: an `if` (the CRAKEN_PLAN_DS_OPTIMIZER test, accelerate's
# `"optimizer" in deepspeed_config` test), `a if c else b`, `c and f()`, a `match` case, an except branch.
CONDITIONAL = (ast.If, ast.IfExp, ast.BoolOp, ast.ExceptHandler, ast.match_case)


def dummy_use(source: str | None) -> DummyUse:
    """Which of accelerate's DummyOptim / DummyScheduler the script calls outside any condition (by name,
    under an `import ... as` alias, or as an attribute: `accelerate.utils.DummyOptim(...)`). A
    DummyScheduler given its lr_scheduler_callable (keyword or fourth argument) builds its own
    schedule and needs no scheduler block; one given **kwargs cannot be told and counts as needing it."""
    try:
        tree = ast.parse(source or "")
    except (SyntaxError, ValueError):
        return DummyUse()
    aliases = {name: name for name in DUMMY_NAMES}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "accelerate":
            aliases.update({a.asname: a.name for a in node.names if a.name in DUMMY_NAMES and a.asname})
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def unconditional(node) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, CONDITIONAL):
                return False
        return True

    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = (aliases.get(func.id) if isinstance(func, ast.Name)
                else func.attr if isinstance(func, ast.Attribute) and func.attr in DUMMY_NAMES else None)
        if name is None or not unconditional(node):
            continue
        if name == "DummyScheduler" and (len(node.args) >= 4 or any(
                k.arg == "lr_scheduler_callable" for k in node.keywords)):
            continue
        found.add(name)
    return DummyUse(optimizer="DummyOptim" in found, scheduler="DummyScheduler" in found)


def dummy_problems(spec, requested: bool | None, dummy: DummyUse) -> list[str]:
    """What a DummyOptim / DummyScheduler script (or --ds-optimizer) would meet inside the workers, as
    accelerate's own error and no hint: no DeepSpeed config at all (ZeRO stage 0 on GPUs runs plain
    Accelerate), or --no-ds-optimizer dropping the block the script's placeholder needs."""
    built = " and ".join(f"accelerate's {name}" for name, used in zip(DUMMY_NAMES, dummy) if used)
    if not spec.uses_deepspeed:
        if built:
            return [f"the script builds {built} whatever the plan, placeholders for the DeepSpeed config's "
                    "optimizer and schedule, and this plan renders no DeepSpeed config (ZeRO stage 0 on GPUs runs "
                    "plain Accelerate): pass --zero 1, 2 or 3, or build a torch optimizer in the script when "
                    "CRAKEN_PLAN_DS_OPTIMIZER is 0"]
        if requested:
            return ["--ds-optimizer keeps DeepSpeed's optimizer in the DeepSpeed config, and this plan renders none "
                    "(ZeRO stage 0 on GPUs runs plain Accelerate): pass --zero 1, 2 or 3, or drop --ds-optimizer"]
        return []
    asked = [f"deepspeed.extra.optimizer asks for DeepSpeed's {spec.deepspeed.extra['optimizer']['type']}, and "
             "--no-ds-optimizer drops the JSON's optimizer block (the script's own optimizer would train instead): "
             "drop one of them"] if asks_ds_optimizer(spec) else []
    if "scheduler" in spec.deepspeed.extra:  # a schedule the user wrote (or `config import` kept)
        asked.append("deepspeed.extra.scheduler is a schedule for DeepSpeed to step, and --no-ds-optimizer drops the "
                     "JSON's scheduler block (the script's own schedule, or none, would run instead): drop one of them")
    if requested is False and asked:
        return asked
    if requested is False and built:
        return [f"the script builds {built} whatever the plan, and --no-ds-optimizer drops the JSON's optimizer "
                "and scheduler blocks, without which accelerate refuses the placeholders: drop --no-ds-optimizer, "
                "or build a torch optimizer in the script when CRAKEN_PLAN_DS_OPTIMIZER is 0"]
    return []


def script_source(target: Target) -> str | None:
    """The text of the script, or of the module's file; None when it cannot be read (target_problems says why)."""
    path: str | None = target.script
    if target.module:
        found = find_module(target.module)
        path = module_main(found) if found is not None else None
    try:
        return Path(path).read_text() if path else None
    except (OSError, ValueError):
        return None


def engine_without_optimizer(source: str | None) -> bool:
    """Whether the script calls `deepspeed.initialize(...)` without an optimizer (neither `optimizer=` nor
    the third positional argument): the raw DeepSpeed shape (DeepSpeedExamples), which trains with the
    optimizer of the JSON it is given."""
    try:
        tree = ast.parse(source or "")
    except (SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "initialize"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "deepspeed"):
            if len(node.args) < 3 and not any(k.arg in ("optimizer", None) for k in node.keywords):
                return True
    return False


def script_ds_config(cfg: dict, keep_optimizer: bool, keep_scheduler: bool) -> dict:
    """The JSON less the blocks the script brings itself."""
    kept = {"optimizer": keep_optimizer, "scheduler": keep_scheduler}
    return {k: v for k, v in cfg.items() if kept.get(k, True)}


def script_files(files: dict[str, str], machine_rank: int, keep_optimizer: bool,
                 keep_scheduler: bool) -> dict[str, str]:
    """The rendered files of a user-script run (the DeepSpeed JSON rewritten where it has one)."""
    name = machine_file(DS_FILE, machine_rank)
    if name not in files or (keep_optimizer and keep_scheduler):
        return files
    cfg = script_ds_config(json.loads(files[name]), keep_optimizer, keep_scheduler)
    return {**files, name: json.dumps(cfg, indent=2, allow_nan=False) + "\n"}


def warmup_steps(spec) -> int:
    """The warm-up the DeepSpeed scheduler block holds (train.schedule.deepspeed_block: at least 1)."""
    return max(1, min(spec.schedule.warmup_steps, spec.train.max_steps))


def plan_env(spec, run_dir: Path, keep_optimizer: bool, keep_scheduler: bool) -> dict[str, str]:
    """CRAKEN_PLAN_*: the plan, for a plain Accelerate script to size its data loader and loop by."""
    values = {
        "RUN_DIR": str(run_dir.absolute()),
        "OUTPUT_DIR": str(run_dir.absolute() / SCRIPT_OUTPUT),
        "MICRO_BATCH": spec.batch.micro_batch,
        "GRAD_ACCUM": spec.grad_accum,
        "GLOBAL_BATCH": spec.train_batch_size,
        "SEQ_LEN": spec.data.seq_len,
        "MAX_STEPS": spec.train.max_steps,
        "LR": spec.optimizer.lr,
        "WEIGHT_DECAY": spec.optimizer.weight_decay,
        "ADAM_BETA1": spec.optimizer.betas[0],
        "ADAM_BETA2": spec.optimizer.betas[1],
        "ADAM_EPS": spec.optimizer.eps,
        "CLIP": spec.optimizer.clip,
        "WARMUP_STEPS": warmup_steps(spec),
        "SCHEDULE": spec.schedule.kind,
        "MIN_LR_RATIO": spec.schedule.min_lr_ratio,
        "SEED": spec.train.seed,
        "PRECISION": spec.base_precision,
        "ZERO_STAGE": spec.zero.stage,
        "MODEL": spec.model.name_or_path,
        "DATASET": spec.data.dataset,
        "SAVE_EVERY": spec.train.save_every,
        "STEPS_PER_PRINT": spec.logging.steps_per_print,
        # 1: the JSON holds DeepSpeed's optimizer (scheduler); build accelerate's DummyOptim (DummyScheduler)
        "DS_OPTIMIZER": int(keep_optimizer),
        "DS_SCHEDULER": int(keep_scheduler),
    }
    env = {PLAN_ENV_PREFIX + k: str(v) for k, v in values.items()}
    # accelerate's Accelerator() reads its accumulation default from here: the script's then starts with the
    # JSON's instead of 1 (which accelerate overrides from the JSON with a "mismatch" warning).
    env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = str(spec.grad_accum)
    return env


class Planned(NamedTuple):
    value: Any
    flag: str  # the craken flag that changes it
    must_agree: bool = True  # False: craken only fills it when the script leaves it unset


def trainer_plan(spec, run_dir: Path, keep_optimizer: bool, keep_scheduler: bool) -> dict[str, Planned]:
    """TrainingArguments field -> what craken planned for it. The must-agree fields are the ones the HF
    Trainer checks against the DeepSpeed JSON, or that decide what is trained (steps, schedule)."""
    optimizer, precision = spec.optimizer, spec.base_precision
    plan = {
        "per_device_train_batch_size": Planned(spec.batch.micro_batch, "--micro-batch"),
        "gradient_accumulation_steps": Planned(spec.grad_accum, "--grad-accum"),
        "max_grad_norm": Planned(optimizer.clip, "--clip"),
        "learning_rate": Planned(optimizer.lr, "--lr"),
        "weight_decay": Planned(optimizer.weight_decay, "--set optimizer.weight_decay=..."),
        "adam_beta1": Planned(optimizer.betas[0], "--set optimizer.betas=[b1,b2]"),
        "adam_beta2": Planned(optimizer.betas[1], "--set optimizer.betas=[b1,b2]"),
        "adam_epsilon": Planned(optimizer.eps, "--set optimizer.eps=..."),
        "bf16": Planned(precision == "bf16", "--precision"),
        "fp16": Planned(precision == "fp16", "--precision"),
        "max_steps": Planned(spec.train.max_steps, "--max-steps"),
        "warmup_steps": Planned(warmup_steps(spec), "--set schedule.warmup_steps=..."),
        "output_dir": Planned(str(run_dir.absolute() / SCRIPT_OUTPUT), "--output-dir", must_agree=False),
        "seed": Planned(spec.train.seed, "--seed", must_agree=False),
        # on CPU processes the Trainer refuses bf16 unless told it runs on the CPU
        "use_cpu": Planned(bool(spec.cluster.use_cpu), "--cpu", must_agree=False),
        "logging_steps": Planned(spec.logging.steps_per_print, "--steps-per-print", must_agree=False),
    }
    if not keep_scheduler:  # the Trainer builds the schedule itself, from these
        plan["lr_scheduler_type"] = Planned(HF_SCHEDULERS[spec.schedule.kind], "--set schedule.kind=...")
        if spec.schedule.kind == "cosine":
            plan["lr_scheduler_kwargs"] = Planned({"min_lr_rate": spec.schedule.min_lr_ratio},
                                                  "--set schedule.min_lr_ratio=...")
    if spec.train.save_every:
        plan["save_steps"] = Planned(spec.train.save_every, "--save-every", must_agree=False)
    return plan


def agrees(value: Any, planned: Any) -> bool:
    """Equal as the Trainer would use them: booleans by truth, numbers within rounding, enums by value."""
    if isinstance(planned, bool) or isinstance(value, bool):
        return bool(value) == bool(planned)
    if isinstance(planned, (int, float)) and isinstance(value, (int, float)):
        return math.isclose(float(value), float(planned), rel_tol=1e-9)
    if isinstance(planned, dict):
        return value == planned
    return str(getattr(value, "value", value)) == str(planned)  # SchedulerType("linear") == "linear"


def conflict_message(name: str, value: Any, planned: Planned, argument: str | None = None) -> str:
    said = f"the script's argument {argument} contradicts" if argument else f"the script sets {name}={value!r} against"
    return (f"{said} craken's plan, {name}={planned.value!r}: give it the plan's value, or drop it where the HF "
            f"Trainer reads it (craken fills the Trainer's), or change the plan with {planned.flag}")


def arg_problems(spec, run_dir: Path, target: Target, keep_optimizer: bool, keep_scheduler: bool) -> list[str]:
    """Script arguments in HfArgumentParser's spelling (`--name value`, `--name=value`) that contradict
    the plan, found before launch; what a script sets in its code, the host finds when it runs."""
    plan = trainer_plan(spec, run_dir, keep_optimizer, keep_scheduler)
    found = parsed_options(target.args)
    problems = own_config_problems(target.args) + local_rank_problems(target.args)
    for name, raw in found.items():
        if name in DS_CONFIG_OPTIONS:
            continue
        planned = plan.get(name)
        if planned is None or not planned.must_agree:
            continue
        value = read_scalar(raw, planned.value)
        if value is not None and not agrees(value, planned.value):
            problems.append(conflict_message(name, value, planned, argument=f"--{name} {raw}"))
    return problems


# The script options that hand DeepSpeed a config file: the HF Trainer's `--deepspeed FILE`, and the
# `--deepspeed_config FILE` (`--deepscale_config`, its old name) of deepspeed.add_config_arguments, whose
# own `--deepspeed` is a bare on/off flag and harmless.
DS_CONFIG_OPTIONS = ("deepspeed", "deepspeed_config", "deepscale_config")


def own_config_problems(args: Sequence[str]) -> list[str]:
    """Script arguments that would have DeepSpeed read another JSON than the one craken renders and shows."""
    problems = []
    items = list(args)
    for i, item in enumerate(items):
        if not item.startswith("--"):
            continue
        name, sep, value = item[2:].partition("=")
        name = name.replace("-", "_")
        if name not in DS_CONFIG_OPTIONS:
            continue
        if not sep:
            following = items[i + 1] if i + 1 < len(items) else None
            if following is None or following.startswith("-"):
                continue  # add_config_arguments' bare --deepspeed switch, or an option without a value
            value = following
        problems.append(f"the script gets --{item[2:].partition('=')[0]} {value}: craken launch renders the "
                        "DeepSpeed config itself and the script trains with that one; drop the option and pass "
                        f"the file to craken instead (craken launch --config {value} ... imports it; craken's flags "
                        "change it)")
    return problems


def local_rank_problems(args: Sequence[str]) -> list[str]:
    """A `--local_rank N` the user wrote would reach every process alike (each then takes the same GPU):
    the rank is each process's own, which the host adds where the script's parser declares it."""
    given = [a for a in args if any(a == o or a.startswith(o + "=") for o in LOCAL_RANK_OPTIONS)]
    if not given:
        return []
    return [f"the script gets {given[0].partition('=')[0]} on its command line, the same in every process: drop it "
            "(each process gets its own --local_rank=N from craken, where the script's parser declares the option)"]


def trainer_deepspeed_message(value: Any) -> str:
    """TrainingArguments(deepspeed=...) in the script's code: a file is shown with how to import it (as
    `--deepspeed FILE` on its command line is, own_config_problems), a dict only as one."""
    if isinstance(value, (str, os.PathLike)):
        return (f"the script sets TrainingArguments(deepspeed={os.fspath(value)!r}): craken launch renders the "
                "DeepSpeed config itself and the script trains with that one; drop it and pass the file to craken "
                f"instead (craken launch --config {os.fspath(value)} ... imports it; craken's flags change it)")
    return ("the script sets TrainingArguments(deepspeed=) to a dict of its own: craken launch renders the DeepSpeed "
            "config itself and the script trains with that one; drop it and set the run with craken's flags "
            "(craken launch --config FILE imports a DeepSpeed JSON)")


def parsed_options(args: Sequence[str]) -> dict[str, str]:
    """`--name value` / `--name=value` pairs (a bare boolean flag reads as "true")."""
    out: dict[str, str] = {}
    items = list(args)
    for i, item in enumerate(items):
        if not item.startswith("--") or item == "--":
            continue
        name, sep, value = item[2:].partition("=")
        if not sep:
            following = items[i + 1] if i + 1 < len(items) else None
            value = following if following is not None and not following.startswith("--") else "true"
        out[name.replace("-", "_")] = value
    return out


def read_scalar(raw: str, like: Any) -> Any:
    """`raw` read as the planned value's type; None when it is not one (the script's own parser judges)."""
    try:
        if isinstance(like, bool):
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[raw.lower()]
        if isinstance(like, int):
            return int(raw)
        if isinstance(like, float):
            return float(raw)
    except (KeyError, ValueError):
        return None
    return None if isinstance(like, dict) else raw


# --- the deepspeed launcher's side of a raw DeepSpeed script --------------------------------------------

LOCAL_RANK_OPTIONS = ("--local_rank", "--local-rank")


def local_rank_args(option_strings: Sequence[str], argv: Sequence[str], local_rank: str | None) -> list[str]:
    """What to add to a parser's command line so that a script written for the deepspeed launcher or
    torch.distributed.launch (which pass `--local_rank=N`) gets its process's rank: torchrun, under
    accelerate launch, sets only LOCAL_RANK, and the script's `--local_rank` would stay at its default
    (-1: every process on the first GPU). Nothing when the parser declares no such option, the command
    line already has it, or no LOCAL_RANK is set."""
    declared = [o for o in LOCAL_RANK_OPTIONS if o in option_strings]
    if not declared or local_rank is None:
        return []
    if any(a == o or a.startswith(o + "=") for a in argv for o in LOCAL_RANK_OPTIONS):
        return []
    return [f"{declared[0]}={local_rank}"]


def initialize_problems(configs: dict[str, Any], has_optimizer: bool, ds_path: Path, ds_config: dict) -> list[str]:
    """A raw DeepSpeed script's `deepspeed.initialize(...)` judged against the JSON craken rendered:
    `configs` maps where a config was given (`config=`, `args.deepspeed_config`, ...) to its value.
    Any other config than craken's would train a run `craken config show` does not describe; an engine
    without an optimizer would not train at all."""
    if not ds_config:
        return ["the script runs DeepSpeed itself (deepspeed.initialize), and this plan renders no DeepSpeed config "
                "(ZeRO stage 0 on GPUs runs plain Accelerate): pass --zero 1, 2 or 3"]
    problems = []
    for where, value in configs.items():
        if isinstance(value, dict):
            same = value == ds_config
        else:
            try:
                same = Path(os.fspath(value)).resolve() == ds_path.resolve()
            except TypeError:
                same = False
        if not same:
            shown = "a dict of its own" if isinstance(value, dict) else repr(value)
            problems.append(f"the script gives deepspeed.initialize its own DeepSpeed config ({where}: {shown}): "
                            f"craken launch hands it the one it rendered, {ds_path}; drop {where} and set the run "
                            "with craken's flags (craken launch --config FILE imports a DeepSpeed JSON)")
    if not has_optimizer and "optimizer" not in ds_config:
        problems.append("the script gives deepspeed.initialize no optimizer and craken's JSON holds none (a "
                        "script's own optimizer is the default): pass --ds-optimizer to train with DeepSpeed's, "
                        "or hand deepspeed.initialize the script's optimizer=")
    return problems


def prepare_problems(batch_sizes: Sequence[int], lrs: Sequence[Sequence[float]], micro_batch: int,
                     lr: float, split_across: int = 1) -> list[str]:
    """What a script hands `accelerator.prepare(model, ...)` against the plan: `batch_sizes` of its
    DataLoaders, `lrs` the base lrs of each torch optimizer's parameter groups. The JSON's micro-batch
    is only DeepSpeed's arithmetic (train_batch_size, the schedule): a loader of another batch size
    trains another run than the one shown, with nothing to warn. One loader at the plan's micro-batch
    (an eval loader may differ), one group at the plan's lr (others may scale it) is enough. Under
    accelerate's split_batches a loader batch is cut across `split_across` processes."""
    problems = []
    if batch_sizes and micro_batch * split_across not in batch_sizes:
        shown = ", ".join(str(b) for b in sorted(set(batch_sizes)))
        planned, size = (f"micro-batch {micro_batch}", "int(os.environ['CRAKEN_PLAN_MICRO_BATCH'])")
        if split_across > 1:
            planned += f" x {split_across} processes (split_batches)"
            size += f" * {split_across}"
        problems.append(f"the script's DataLoader gives batches of {shown} against craken's plan, {planned}: "
                        f"build it with batch_size={size} or change the plan with --micro-batch")
    for groups in lrs:
        if groups and not any(math.isclose(g, lr, rel_tol=1e-6) for g in groups):
            shown = ", ".join(f"{g:g}" for g in sorted(set(groups)))
            problems.append(f"the script's optimizer has lr {shown} against craken's plan, lr={lr:g}: build it with "
                            "lr=float(os.environ['CRAKEN_PLAN_LR']) or change the plan with --lr")
    return problems


def client_block_problems(optimizers: Sequence[str], schedulers: Sequence[str], ds_config: dict) -> list[str]:
    """The torch optimizer / scheduler classes a script hands `accelerator.prepare(model, ...)`, beside the
    JSON's optimizer / scheduler block: accelerate refuses the pair in every process ("You cannot specify
    an optimizer in the config file and in the code at the same time"). The JSON keeps the blocks where
    DeepSpeed must step (optimizer offload, a deepspeed.extra optimizer, --ds-optimizer), and says so in
    CRAKEN_PLAN_DS_OPTIMIZER / CRAKEN_PLAN_DS_SCHEDULER."""
    problems = []
    kept_by = "optimizer offload, a deepspeed.extra optimizer, --ds-optimizer"
    for kind, names, placeholder, told, why in (
            ("optimizer", optimizers, "DummyOptim(model.parameters())", "OPTIMIZER", kept_by),
            ("scheduler", schedulers, "DummyScheduler(optimizer)", "SCHEDULER",
             f"{kept_by}, a deepspeed.extra scheduler")):
        block = ds_config.get(kind)
        if not names or not isinstance(block, dict):
            continue
        problems.append(f"the script hands accelerator.prepare its own {kind} ({', '.join(sorted(set(names)))}) and "
                        f"craken's DeepSpeed JSON holds DeepSpeed's ({block.get('type')}: kept for {why} or an "
                        "unconditional placeholder), which accelerate refuses together: build "
                        f"accelerate.utils.{placeholder} when CRAKEN_PLAN_DS_{told} is 1, or drop what keeps the "
                        f"block (--no-ds-optimizer drops both)")
    return problems
