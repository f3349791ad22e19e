"""Layered sources of a run, lowest to highest:

    default < preset (templates/, --preset NAME) < project file (craken.yaml / --config)
            < environment (CRAKEN_SECTION__FIELD) < command-line flags

Each layer is a nested partial dict. `build_spec` merges them, validates once with Pydantic, and
returns the spec together with where each value came from; every problem found is reported in
one `CrakenError`, each naming the setting (and the flag) to change.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from pydantic import BaseModel, ValidationError

from ..errors import CrakenError
from . import yamlio
from .spec import CrossFieldProblems, RunSpec

ENV_PREFIX = "CRAKEN_"
PROJECT_FILE = "craken.yaml"

# The command-line flags that set spec fields: flag -> dotted path. `--help` text comes from the
# field's description; `spec_path_flag()` lets error messages name the flag to change.
FLAGS: dict[str, str] = {
    "--zero": "zero.stage",
    "--offload-optimizer": "offload.optimizer.device",
    "--offload-param": "offload.param.device",
    "--precision": "precision",
    "--micro-batch": "batch.micro_batch",
    "--grad-accum": "batch.grad_accum",
    "--global-batch": "batch.global_batch",
    "--clip": "optimizer.clip",
    "--lr": "optimizer.lr",
    "--num-processes": "cluster.num_processes",
    "--num-machines": "cluster.num_machines",
    "--machine-rank": "cluster.machine_rank",
    "--main-process-ip": "cluster.main_process_ip",
    "--main-process-port": "cluster.main_process_port",
    "--rdzv-backend": "cluster.rdzv_backend",
    "--launcher": "cluster.launcher",
    "--max-restarts": "cluster.max_restarts",
    "--cpu": "cluster.use_cpu",
    "--model": "model.name_or_path",
    "--tokenizer": "model.tokenizer",
    "--trust-remote-code": "model.trust_remote_code",
    "--activation-checkpointing": "model.activation_checkpointing",
    "--compile": "model.compile",
    "--dataset": "data.dataset",
    "--text-column": "data.text_column",
    "--seq-len": "data.seq_len",
    "--data-format": "data.format",
    "--chat-template": "data.chat_template",
    "--streaming": "data.streaming",
    "--max-steps": "train.max_steps",
    "--seed": "train.seed",
    "--eval-every": "train.eval_every",
    "--save-every": "train.save_every",
    "--keep-checkpoints": "train.keep_checkpoints",
    "--steps-per-print": "logging.steps_per_print",
    "--report-to": "logging.report_to",
    "--profile": "logging.wall_clock_breakdown",
    "--name": "output.name",
    "--output-dir": "output.dir",
}
# --nvme-path fills the path of whichever offload target uses nvme (see build_spec).
NVME_PATH_FLAG = "--nvme-path"
_PATH_TO_FLAG = {path: flag for flag, path in FLAGS.items()}


@dataclass
class Layer:
    """One source of values. `label` is what `config show --sources` prints for its values."""

    kind: str  # default | preset | file | env | flag | detected | auto
    label: str
    values: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what importing a DeepSpeed JSON / accelerate YAML noted


# ---------------------------------------------------------------------------------------------
# nested <-> dotted


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):  # a scalar given where a section belongs
                nxt = node[p] = {"__scalar__": nxt}
            node = nxt
        node[leaf] = value
    return out


def field_paths(model: type[BaseModel] = RunSpec, prefix: str = "") -> dict[str, Any]:
    """Every leaf field of the model: dotted path -> FieldInfo."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(field_paths(ann, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = info
    return out


def describe(path: str) -> str:
    """The help text of a field: its Pydantic description, after its section's where the section's class
    serves several fields (offload.optimizer.device and offload.param.device: one leaf description)."""
    text = field_paths()[path].description or ""
    parent, _, _ = path.rpartition(".")
    if parent.count(".") == 1:
        section, name = parent.split(".")
        owner = RunSpec.model_fields[section].annotation
        above = owner.model_fields[name].description if hasattr(owner, "model_fields") else None
        if above and text:
            return f"{above.rstrip('.')}: {text[0].lower()}{text[1:]}"
    return text


def flag_for(path: str) -> str | None:
    return _PATH_TO_FLAG.get(path)


# ---------------------------------------------------------------------------------------------
# layers


def file_layer(path: str | Path, kind: str = "file") -> Layer:
    """A craken run file as it is; a DeepSpeed JSON or accelerate YAML imported on the fly."""
    data = yamlio.read_mapping(path)
    from .importers import import_files, is_foreign

    if not is_foreign(Path(path), data):
        return Layer(kind, str(path), data)
    imported = import_files([Path(path)])
    if imported.problems:
        raise CrakenError(imported.problems, title=f"cannot import {path}")
    return Layer(kind, str(path), unflatten(imported.values), notes=imported.notes)


def env_layer(environ: Mapping[str, str] | None = None) -> Layer:
    """CRAKEN_ZERO__STAGE=3 -> zero.stage = 3. Values are read as YAML scalars ("3" -> 3)."""
    environ = os.environ if environ is None else environ
    flat: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in _ENV_NOT_SPEC or name.startswith(_ENV_PLAN_PREFIX):
            continue
        path = name[len(ENV_PREFIX):].lower().replace("__", ".")
        flat[path] = yamlio.loads(raw, origin=f"${name}") if raw.strip() else None
    return Layer("env", "env", unflatten(flat))


# Environment variables that belong to craken but are not spec fields.
_ENV_NOT_SPEC = {"CRAKEN_NO_PROGRESS", "CRAKEN_HOME"}
_ENV_PLAN_PREFIX = "CRAKEN_PLAN_"  # the plan `craken launch` hands a user script (userscript.plan_env)


def flag_layer(flags: Mapping[str, Any], sets: Iterable[str] = ()) -> Layer:
    """Typed flag values (None = not given) plus `--set path=value` overrides."""
    flat = {FLAGS[f]: v for f, v in flags.items() if v is not None and f in FLAGS}
    problems = []
    for item in sets:
        path, sep, raw = item.partition("=")
        if not sep or not path.strip():
            problems.append(f"--set {item!r}: write it as --set section.field=value, e.g. --set zero.stage=3")
            continue
        flat[path.strip()] = yamlio.loads(raw, origin=f"--set {path}") if raw.strip() else None
    if problems:
        raise CrakenError(problems)
    return Layer("flag", "flag", unflatten(flat))


# ---------------------------------------------------------------------------------------------
# merge + validate


@dataclass
class SourcedSpec:
    """A validated spec and where each of its values came from: what `build_spec` makes of the layers
    (nothing resolved yet), and what `plan.resolve.resolve` returns once the hardware has filled the rest."""

    spec: RunSpec
    sources: dict[str, str]  # dotted path -> label of the layer that set it

    def flat(self) -> dict[str, Any]:
        return flatten(self.spec.model_dump(mode="json"))

    def user_set(self, path: str) -> bool:
        """Whether the user chose this value (a file, CRAKEN_* variable or flag), not a default, a
        preset or a detection: what --auto and the planner's defaults must keep."""
        label = self.sources.get(path, "default")
        return not (label == "default" or label.startswith("preset") or label == "detected")


def merge(layers: Iterable[Layer]) -> tuple[dict, dict[str, str]]:
    flat: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for layer in layers:
        for path, value in flatten(layer.values).items():
            flat[path] = value
            origin[path] = layer.label if layer.kind in ("default", "flag", "env") else f"{layer.kind} {layer.label}"
    return flat, origin


def build_spec(layers: Iterable[Layer], nvme_path: str | None = None) -> SourcedSpec:
    layers = list(layers)
    flat, origin = merge(layers)
    # A global batch given above the layer that set grad_accum (a preset's 8, say) means "derive the
    # accumulation from it", not "check it against the preset's".
    rank = {p: i for i, layer in enumerate(layers) for p in flatten(layer.values)}
    if (flat.get("batch.global_batch") is not None and flat.get("batch.grad_accum") is not None
            and rank["batch.global_batch"] > rank["batch.grad_accum"]):
        del flat["batch.grad_accum"], origin["batch.grad_accum"]
    if nvme_path is not None:
        targets = [t for t in ("optimizer", "param") if flat.get(f"offload.{t}.device") == "nvme"]
        if not targets:
            raise CrakenError(f"{NVME_PATH_FLAG} was given but nothing is offloaded to nvme: "
                              "add --offload-optimizer nvme and/or --offload-param nvme")
        for t in targets:
            flat[f"offload.{t}.nvme_path"] = nvme_path
            origin[f"offload.{t}.nvme_path"] = "flag"
    nested = unflatten(flat)
    try:
        # JSON mode: strict about types ("8" is not 8) yet lists are fine for tuples.
        spec = RunSpec.model_validate_json(json.dumps(nested))
    except ValidationError as exc:
        raise CrakenError(format_validation_errors(exc, flat, origin)) from None
    except (TypeError, ValueError) as exc:  # not JSON-serialisable input (e.g. a YAML date)
        raise CrakenError(f"a value could not be read: {exc}") from None
    sources = {path: origin.get(path, "default") for path in flatten(spec.model_dump(mode="json"))}
    return SourcedSpec(spec, sources)


def format_validation_errors(exc: ValidationError, flat: Mapping[str, Any], origin: Mapping[str, str]) -> list[str]:
    known = field_paths()
    problems = []
    seen_paths = set()
    for err in exc.errors():
        cross_field = err.get("ctx", {}).get("error")
        if isinstance(cross_field, CrossFieldProblems):
            problems.extend(cross_field.problems)  # each already says what to change
            continue
        loc = [str(p) for p in err["loc"] if _is_field_name(p)]
        path = ".".join(loc)
        if path in seen_paths:
            continue  # a union (a number or "auto") fails once per member: one problem per setting
        seen_paths.add(path)
        if err["type"] == "extra_forbidden":
            problems.append(_unknown_key(path, known, origin.get(path)))
            continue
        where = origin.get(path, "default")
        flag = flag_for(path)
        hint = f"; set {flag}" if flag else ""
        given = flat.get(path, err.get("input"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"].endswith("_type") and isinstance(given, str) and _reads_as_scalar(given):
            msg += " (numbers and booleans must not be quoted)"  # '3' in a file: a quoted number
        msg, hint = _sequence_problem(err, path) or (msg, hint)
        problems.append(f"{path} = {given!r} (from {where}): {msg}{hint}")
    return problems


def _sequence_problem(err: Mapping[str, Any], path: str) -> tuple[str, str] | None:
    """A fixed-length setting (optimizer.betas) given too few, too many or not a list: pydantic says
    "Field required" for a missing item; say how many values it takes, like its default."""
    from .spec import RunSpec

    if not (err["type"] in ("tuple_type", "too_long") or (err["type"] == "missing" and isinstance(err["loc"][-1], int))):
        return None
    default = flatten(RunSpec().model_dump(mode="json")).get(path)
    if not isinstance(default, list):
        return None
    return f"takes a list of {len(default)} values", f"; write it like its default, {path}={json.dumps(default)}"


def _reads_as_scalar(text: str) -> bool:
    """Would `text` unquoted be a number or a boolean (so quoting was the mistake)?"""
    try:
        float(text)
        return True
    except ValueError:
        return text.strip().lower() in ("true", "false", "yes", "no", "on", "off")


def _is_field_name(part) -> bool:
    """A location part that names a field, not a list index or a union member ("constrained-int")."""
    return isinstance(part, str) and part.isidentifier()


def _sections() -> tuple[str, ...]:
    return tuple(RunSpec.model_fields)


def _unknown_key(path: str, known: Mapping[str, Any], where: str | None) -> str:
    candidates = list(known) + list(_sections())
    close = difflib.get_close_matches(path, candidates, n=1, cutoff=0.6)
    if not close:
        leaf = path.rsplit(".", 1)[-1]
        close = [c for c in known if c.rsplit(".", 1)[-1] == leaf][:1]
    advice = f"did you mean '{close[0]}'?" if close else "see `craken config schema` for the keys"
    src = f" (from {where})" if where else ""
    return f"unknown key '{path}'{src}: {advice}"
