"""The spec flags shared by `config render/show`, `train` and `plan`, built from the run model.

`spec_flags` appends one Typer option per entry of `sources.FLAGS` to a command; the option's help
is the field's description, its type the field's. The wrapped command receives them gathered in
one `SpecArgs` value, and `load_run()` turns that into a resolved run.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer

from . import sources, yamlio
from .sources import FLAGS, NVME_PATH_FLAG, Layer, SourcedSpec
from .spec import BUILTIN_MODEL

_PANEL = "Run settings (override craken.yaml, CRAKEN_* and the --preset)"
# --preset NAME -> ZeRO stage of the shipped template (templates/NAME_config.json)
PRESET_NAMES = {"ds_zero1": 1, "ds_zero2": 2, "ds_zero3": 3}  # the Literal of --preset lists the same
PRESET_FLAG = "--preset"


@dataclass
class SpecArgs:
    flags: dict[str, Any] = field(default_factory=dict)  # flag -> value or None
    config: Path | None = None
    sets: list[str] = field(default_factory=list)
    nvme_path: str | None = None
    preset: str | None = None  # a PRESET_NAMES key


def _python_type(annotation) -> type:
    """The scalar type Typer should parse for a field annotation (Literals stay strings/ints)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _python_type(args[0])
    if origin is typing.Literal:
        return type(args[0])
    if origin is Annotated:
        return _python_type(args[0])
    return annotation if annotation in (int, float, str, bool) else str


def _choices(annotation) -> list[str]:
    """The values of a Literal field (its `| None` and `"auto"` included), for completion and the help."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    if origin in (typing.Union, types.UnionType, Annotated):
        return [c for a in typing.get_args(annotation) if a is not type(None) for c in _choices(a)]
    return []


# How the help names a value: never a Python type (`<int>`, `<list[str]>`).
_METAVAR = {int: "N", float: "NUMBER", str: "TEXT", bool: ""}


def _metavar(annotation, typ: type) -> str:
    choices = _choices(annotation)
    return "|".join(choices) if choices else _METAVAR[typ]


def _completer(choices: list[str]):
    def complete(incomplete: str) -> list[str]:
        return [c for c in choices if c.startswith(incomplete)]
    return complete


def _shown_default(path: str, info) -> str | None:
    """`[default: ...]` of a flag: the field's default, and the built-in model's preset value where it
    differs (that preset applies to builtin:tiny only); nothing for a default left to craken (None)."""
    default = info.get_default(call_default_factory=True)
    if default is None or isinstance(default, bool):
        return None
    text = str(default)
    builtin = _builtin_preset_values().get(path)
    if builtin is not None and builtin != default:
        text += f"; {BUILTIN_MODEL}: {builtin}"
    return text


@functools.cache
def _builtin_preset_values() -> dict[str, Any]:
    return sources.flatten(yamlio.read_mapping(builtin_preset_path()))


def _param_name(flag: str) -> str:
    return "flag_" + flag.lstrip("-").replace("-", "_")


def _spec_parameters() -> list[inspect.Parameter]:
    paths = sources.field_paths()
    params = []
    for flag, path in FLAGS.items():
        info = paths[path]
        typ = _python_type(info.annotation)
        decl = f"{flag}/--no-{flag[2:]}" if typ is bool else flag
        choices = _choices(info.annotation)
        default = _shown_default(path, info)
        opt = typer.Option(decl, help=sources.describe(path) + (f"  [default: {default}]" if default else ""),
                           rich_help_panel=_PANEL, show_default=False, metavar=_metavar(info.annotation, typ) or None,
                           autocompletion=_completer(choices) if choices else None)
        params.append(inspect.Parameter(_param_name(flag), inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[Optional[typ], opt]))
    params += [
        inspect.Parameter("spec_config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Optional[Path], typer.Option("--config", "-c",
                help="Project file (default: ./craken.yaml if present).", metavar="FILE",
                                         rich_help_panel=_PANEL)]),
        inspect.Parameter("spec_set", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Optional[list[str]], typer.Option("--set", help="Any field: --set zero.reduce_bucket_size=2e8 "
                                              "(repeatable).", metavar="FIELD=VALUE", rich_help_panel=_PANEL)]),
        inspect.Parameter("spec_preset", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Optional[Literal["ds_zero1", "ds_zero2", "ds_zero3"]], typer.Option(
                PRESET_FLAG, metavar="|".join(PRESET_NAMES), rich_help_panel=_PANEL,
                help="Start from a shipped DeepSpeed template, the seed's templates/NAME_config.json (ds_zero2: "
                     "ZeRO-2 with CPU optimizer offload and accumulation 8); every other source overrides it.")]),
        inspect.Parameter("spec_nvme_path", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Optional[str], typer.Option(NVME_PATH_FLAG, help=sources.describe("offload.optimizer.nvme_path"),
                                        metavar="FOLDER", rich_help_panel=_PANEL)]),
    ]
    return params


def spec_args_of(params: dict) -> SpecArgs:
    """The run flags' values, taken out of a command's parsed parameters (the ones `spec_flags` adds)."""
    return SpecArgs(
        flags={flag: params.pop(_param_name(flag), None) for flag in FLAGS},
        config=params.pop("spec_config", None),
        sets=list(params.pop("spec_set", None) or []),
        nvme_path=params.pop("spec_nvme_path", None),
        preset=params.pop("spec_preset", None),
    )


def spec_flags(func):
    """Decorator: `func(..., spec_args: SpecArgs)` gains every run flag as a Typer option."""
    # eval_str: the command's string annotations must be resolved in its own module, not here.
    sig = inspect.signature(func, eval_str=True)
    own = [p for p in sig.parameters.values() if p.name != "spec_args"]
    extra = _spec_parameters()
    names = {p.name for p in extra}

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, spec_args=spec_args_of(kwargs), **kwargs)

    wrapper.__signature__ = sig.replace(parameters=own + extra)
    wrapper.__annotations__ = {p.name: p.annotation for p in own + extra}
    del wrapper.__wrapped__  # Typer must read the new signature, not the original one
    assert not names & set(sig.parameters)
    return wrapper


def layers(args: SpecArgs, environ=None) -> list[Layer]:
    """defaults < preset < project file < env < flags."""
    from .importers import PRESETS, preset_values

    out = [Layer("default", "default", {})]
    if args.preset is not None:  # --zero N sets only the stage, as --set zero.stage=N and craken.yaml do
        stage = PRESET_NAMES[args.preset]
        out.append(Layer("preset", PRESETS[stage], preset_values(stage)))
    config = args.config
    if config is None and Path(sources.PROJECT_FILE).exists():
        config = Path(sources.PROJECT_FILE)  # a folder of that name is refused by read_mapping, not skipped
    if config is not None:
        out.append(sources.file_layer(config))
    out.append(sources.env_layer(environ))
    out.append(sources.flag_layer(args.flags, args.sets))
    # The built-in model brings its own sizes, below the ZeRO template the user picked with --preset (so
    # `--preset ds_zero2` gives exactly that template: accumulation 8) and below the user's own sources.
    merged, _ = sources.merge(out)
    if merged.get("model.name_or_path", BUILTIN_MODEL) == BUILTIN_MODEL:
        path = builtin_preset_path()
        out.insert(1, Layer("preset", path.name, yamlio.read_mapping(path)))
    _print_notes(out)
    return out


def _print_notes(found: list[Layer]) -> None:
    """What importing a DeepSpeed JSON / accelerate YAML given as --config noted, on stderr, for every
    command that reads the run's sources."""
    notes = [note for layer in found for note in layer.notes]
    if notes:
        from ..console import err

        for note in notes:
            err.print(f"note: {note}", markup=False, highlight=False)


def builtin_preset_path() -> Path:
    from .importers import template_path

    return template_path("builtin_tiny.yaml")


def load_spec(args: SpecArgs, environ=None) -> SourcedSpec:
    """The spec from every source, validated, before hardware is looked at."""
    return sources.build_spec(layers(args, environ), nvme_path=args.nvme_path)


def load_run(args: SpecArgs, hardware=None, environ=None):
    """Spec from every source, resolved against `hardware` (detected when None). -> (SourcedSpec, Decisions)."""
    from ..plan import hardware as hw_mod
    from ..plan.resolve import resolve

    sourced = load_spec(args, environ)
    if hardware is None:
        hardware = hw_mod.detect()
    return resolve(sourced, hardware)
