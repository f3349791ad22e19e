"""Read DeepSpeed JSONs and accelerate YAMLs into partial run specs, faithfully.

A user's DeepSpeed JSON becomes a craken run that renders back to a config DeepSpeed reads as the
same run: keys craken models become spec fields (a key the file leaves out takes DeepSpeed's
default, not craken's), every other key is kept in `deepspeed.extra` and written back as given,
and "auto" is left to craken's own settings, filled where and how the HF Trainer fills it. Key
names, aliases and deprecated names come from DeepSpeed's own pydantic models, and the file is
parsed by DeepSpeed itself, so craken refuses only what DeepSpeed refuses, in its words.

The presets in templates/ are DeepSpeed JSONs in craken's own names, read by `preset_values`
without importing DeepSpeed (they stay partial: what they leave out is craken's default).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import CrakenError
from .spec import AUTO_BUCKETS, DEEPSPEED_FIELDS, STAGE3_DEFAULTS, STAGE3_FIELDS, fp32_grad_accum_possible

PRESETS = {1: "ds_zero1_config.json", 2: "ds_zero2_config.json", 3: "ds_zero3_config.json"}
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_FLAG_OF = {"batch.micro_batch": "--micro-batch", "batch.grad_accum": "--grad-accum", "batch.global_batch":
            "--global-batch", "optimizer.clip": "--clip", "optimizer.lr": "--lr", "precision": "--precision",
            "logging.steps_per_print": "--steps-per-print"}


@dataclass
class Imported:
    values: dict = field(default_factory=dict)  # dotted spec path -> value
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def template_path(name: str) -> Path:
    """A shipped template file (inside the wheel, or the checkout's templates/)."""
    packaged = resources.files("craken_cli").joinpath("templates", name)
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[3] / "templates" / name


def preset_path(stage: int) -> Path:
    """The shipped preset file for a ZeRO stage."""
    return template_path(PRESETS[stage])


def preset_values(stage: int) -> dict:
    """Nested partial spec for `--zero N`. A broken shipped preset is a bug, reported as such."""
    from . import yamlio
    from .sources import flatten, unflatten

    values, unknown = {}, []
    for key, value in flatten(yamlio.read_mapping(preset_path(stage))).items():
        if key not in DEEPSPEED_FIELDS:
            unknown.append(f"{key} is not a key craken models")
        elif value != "auto":
            values[DEEPSPEED_FIELDS[key]] = _spec_value(key, value)
    if unknown:
        raise CrakenError(unknown, title=f"shipped preset {PRESETS[stage]} is broken")
    return unflatten(values)


def _spec_value(key: str, value: Any) -> Any:
    """A DeepSpeed value in the spec's terms, for the keys whose meaning changes on the way."""
    if key in ("bf16.enabled", "fp16.enabled"):
        return key.split(".")[0] if value else "fp32"
    if key == "optimizer.params.torch_adam":
        return not value
    if key == "data_types.grad_accum_dtype":
        return value == "fp32"
    return value


def _is_number_string(v: Any) -> bool:
    if not isinstance(v, str):
        return False
    try:
        float(v)
    except ValueError:
        return v.strip().lower() in ("true", "false")
    return True


# ---------------------------------------------------------------------------------------------
# "auto", filled as the HF Trainer fills it


@dataclass
class AutoFill:
    """The values "auto" stands for in a DeepSpeed JSON, from the run (transformers'
    HfTrainerDeepSpeedConfig.trainer_config_process / trainer_config_finalize, accelerate's
    deepspeed_config_process): batch from the data loader, optimizer and schedule from the
    training arguments, precision from the run, buckets from the model's hidden size."""

    micro_batch: int = 4
    grad_accum: int = 1
    world_size: int = 1
    clip: float = 1.0
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_steps: int = 200
    precision: str = "bf16"
    hidden_size: int | None = None
    gather_16bit: bool = STAGE3_DEFAULTS["gather_16bit_weights_on_save"]

    @classmethod
    def of(cls, spec, hidden_size: int | None = None) -> AutoFill:
        """From a resolved spec."""
        opt = spec.optimizer
        warmup = min(spec.schedule.warmup_steps, spec.train.max_steps)
        return cls(spec.batch.micro_batch, spec.grad_accum, spec.world_size, opt.clip, opt.lr, tuple(opt.betas),
                   opt.eps, opt.weight_decay, warmup, spec.train.max_steps, spec.precision, hidden_size,
                   _or_default(spec.zero.gather_16bit_weights_on_save, "gather_16bit_weights_on_save"))

    def values(self) -> dict[str, Any]:
        out = {"train_micro_batch_size_per_gpu": self.micro_batch, "gradient_accumulation_steps": self.grad_accum,
               "train_batch_size": self.micro_batch * self.grad_accum * self.world_size,
               "gradient_clipping": self.clip, "optimizer.params.lr": self.lr,
               "optimizer.params.betas": list(self.betas), "optimizer.params.eps": self.eps,
               "optimizer.params.weight_decay": self.weight_decay, "scheduler.params.warmup_min_lr": 0,
               "scheduler.params.warmup_max_lr": self.lr, "scheduler.params.warmup_num_steps": self.warmup_steps,
               "scheduler.params.total_num_steps": self.max_steps, "bf16.enabled": self.precision == "bf16",
               # accelerate adds a bf16 section from the run's precision, which DeepSpeed reads before its old name
               "bfloat16.enabled": self.precision == "bf16",
               "fp16.enabled": self.precision == "fp16",
               "zero_optimization.stage3_gather_16bit_weights_on_model_save": self.gather_16bit}
        if self.hidden_size:
            out.update(hidden_size_buckets(self.hidden_size))
        return out


# The "auto" keys the HF Trainer / accelerate fill from the run; any other "auto" DeepSpeed reads as its default.
TRAINER_FILLS = frozenset(AutoFill().values()) | {f"zero_optimization.{key}" for key in AUTO_BUCKETS}


def _or_default(value, stage3_key: str):
    return STAGE3_DEFAULTS[stage3_key] if value is None else value


def hidden_size_buckets(hidden: int) -> dict[str, int]:
    """The HF Trainer's "auto" buckets for a model of this hidden size."""
    return {"zero_optimization.reduce_bucket_size": hidden * hidden,
            "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "zero_optimization.stage3_param_persistence_threshold": 10 * hidden}


def fill_auto(cfg: dict, fill: AutoFill) -> dict:
    """A copy of a DeepSpeed dict with each "auto" the HF Trainer fills replaced by its value; any other
    "auto" stays, and DeepSpeed's pydantic sections read it as the field's default."""
    from .sources import flatten, unflatten

    values = fill.values()
    flat = {key: values.get(key, value) if value == "auto" else value for key, value in flatten(cfg).items()}
    deferred = any(cfg.get(section, {}).get("enabled") == "auto" for section in ("bf16", "fp16", "bfloat16")
                   if isinstance(cfg.get(section), dict))
    if deferred and fill.precision in ("bf16", "fp16") and fill.precision not in cfg:
        # accelerate's DeepSpeedPlugin.set_mixed_precision adds the run's section where the file has none
        flat[f"{fill.precision}.enabled"] = True
        if fill.precision == "fp16":
            flat["fp16.auto_cast"] = True
    return unflatten(flat)


# ---------------------------------------------------------------------------------------------
# DeepSpeed's own names


def section_models() -> dict[str, type]:
    """DeepSpeed JSON section -> DeepSpeed's pydantic model of it (imports deepspeed)."""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import (DeepSpeedZeroOffloadOptimizerConfig,
                                                       DeepSpeedZeroOffloadParamConfig)

    return {"zero_optimization": DeepSpeedZeroConfig, "bf16": DeepSpeedBF16Config, "fp16": DeepSpeedFP16Config,
            "zero_optimization.offload_optimizer": DeepSpeedZeroOffloadOptimizerConfig,
            "zero_optimization.offload_param": DeepSpeedZeroOffloadParamConfig}


def canonical_name(model: type, key: str) -> tuple[str, bool] | None:
    """The name DeepSpeed documents for `key` of a section (a field's alias where it has one, the new
    field of a deprecated name) and whether `key` is deprecated; None for a key the model lacks."""
    fields = model.model_fields
    name = next((n for n, f in fields.items() if f.alias == key), key)
    if name not in fields:
        return None
    extra = fields[name].json_schema_extra or {}
    deprecated = bool(extra.get("deprecated"))
    if deprecated and extra.get("new_param") in fields and extra.get("set_new_param", True):
        name = extra["new_param"]
    return fields[name].alias or name, deprecated


def canonical_keys(cfg: dict) -> dict[str, str]:
    """Dotted key as the file states it -> DeepSpeed's documented name of it (old names resolved)."""
    from deepspeed.runtime.constants import BFLOAT16, BFLOAT16_OLD

    from .sources import flatten

    models = section_models()
    out = {}
    for stated in flatten(cfg):
        parts = stated.split(".")
        if parts[0] == BFLOAT16_OLD:
            parts[0] = BFLOAT16
        for depth in range(1, len(parts)):
            model = models.get(".".join(parts[:depth]))
            named = canonical_name(model, parts[depth]) if model else None
            if named:
                parts[depth] = named[0]
        out[stated] = ".".join(parts)
    return out


def deprecated_keys(cfg: dict) -> list[str]:
    """The file's keys that DeepSpeed reads under an old name."""
    from deepspeed.runtime.constants import BFLOAT16_OLD

    from .sources import flatten

    models = section_models()
    found = [BFLOAT16_OLD] if BFLOAT16_OLD in cfg else []
    for stated in flatten(cfg):
        section, _, key = stated.rpartition(".")
        named = canonical_name(models[section], key) if section in models else None
        if named and named[1]:
            found.append(stated)
    return found


# ---------------------------------------------------------------------------------------------
# DeepSpeed JSON -> partial spec


def from_deepspeed(cfg: dict, origin: str = "ds_config.json", world_size: int | None = None) -> Imported:
    """A user's DeepSpeed JSON as a partial spec; DeepSpeed's own parser judges it first."""
    from . import dscheck

    out = Imported()
    quoted = {key: value for key, value in _stated(cfg).items() if key in DEEPSPEED_FIELDS and _is_number_string(value)}
    out.problems += [f"{origin}: {key} is the string {value!r}: DeepSpeed would fail on it; write it without quotes"
                     for key, value in quoted.items()]
    clean = _unquoted(cfg, quoted)  # quoted numbers read as numbers, so that DeepSpeed's verdict on the rest comes too
    world = world_size or implied_world(clean)
    stated_batch = {k: clean.get(k) for k in _BATCH_KEYS if isinstance(clean.get(k), int)}
    fill = AutoFill(world_size=world, micro_batch=stated_batch.get("train_micro_batch_size_per_gpu", 4),
                    grad_accum=stated_batch.get("gradient_accumulation_steps", 1))
    filled = fill_auto(clean, fill)
    try:
        parsed, read = dscheck.parse_recording(filled, world)
    except Exception as exc:  # DeepSpeed raises assorted types; its words are what the user needs
        out.problems += [f"{origin}: {p}" for p in dscheck.deepspeed_problems(exc, filled, world)]
        return out
    if out.problems:
        return out
    canonical = canonical_keys(cfg)
    stated = {canonical[k]: v for k, v in _stated(cfg).items()}
    _modeled(parsed, stated, origin, out)
    _batch(cfg, out)
    _optimizer(cfg, stated, origin, out)
    _extra(cfg, canonical, read, origin, out)
    _notes(cfg, stated, parsed, origin, out)
    return out


def _unquoted(cfg: dict, quoted: dict) -> dict:
    from . import yamlio
    from .sources import flatten, unflatten

    return unflatten({**flatten(cfg), **{k: yamlio.loads(v, origin=k) for k, v in quoted.items()}})


def _stated(cfg: dict) -> dict[str, Any]:
    from .sources import flatten

    return flatten(cfg)


def implied_world(cfg: dict) -> int:
    """The process count a file's complete batch triple implies (1 where it does not say)."""
    gb, mb, ga = (cfg.get(k) for k in _BATCH_KEYS)
    if all(isinstance(v, int) and v > 0 for v in (gb, mb, ga)) and gb % (mb * ga) == 0:
        return gb // (mb * ga)
    return 1


def _modeled(parsed, stated: dict, origin: str, out: Imported) -> None:
    """Every field craken models, read from DeepSpeed's parsed config: the file's value, or DeepSpeed's
    default where the file leaves it out; "auto" stays craken's (filled from the run)."""
    zero = parsed.zero_config
    values = {"optimizer.clip": parsed.gradient_clipping, "logging.wall_clock_breakdown": parsed.wall_clock_breakdown,
              "zero.stage": zero.stage, "zero.overlap_comm": zero.overlap_comm,
              "zero.contiguous_gradients": zero.contiguous_gradients, "zero.reduce_bucket_size": zero.reduce_bucket_size,
              "zero.allgather_bucket_size": zero.allgather_bucket_size,
              "precision": "bf16" if parsed.bfloat16_config.enabled else "fp16" if parsed.float16_config.enabled
              else "fp32"}
    if isinstance(parsed.steps_per_print, int):  # None: DeepSpeed prints nothing; accelerate writes inf for that
        values["logging.steps_per_print"] = parsed.steps_per_print
    if zero.stage == 3:
        # DeepSpeed's parsed config names them without the stage3_ of its JSON keys
        values.update({f"zero.{key}": getattr(zero, key.removeprefix("stage3_")) for key in STAGE3_FIELDS})
        if "zero_optimization.stage3_gather_16bit_weights_on_model_save" in stated:
            values["zero.gather_16bit_weights_on_save"] = zero.gather_16bit_weights_on_model_save
    for target, offload in (("optimizer", zero.offload_optimizer), ("param", zero.offload_param)):
        device = getattr(offload.device, "value", offload.device) if offload is not None else "none"
        if device != "none" and _offload_applies(target, zero.stage):
            values.update({f"offload.{target}.device": device,
                           f"offload.{target}.pin_memory": offload.pin_memory})
            if offload.nvme_path is not None:
                values[f"offload.{target}.nvme_path"] = str(offload.nvme_path)
    values.update(_grad_accum_dtype(parsed, zero.stage, values, origin, out))
    autos = {DEEPSPEED_FIELDS[key] for key, value in stated.items()
             if value == "auto" and key in TRAINER_FILLS and key in DEEPSPEED_FIELDS}
    for path in autos & set(values):
        if path.removeprefix("zero.") in AUTO_BUCKETS:
            values[path] = "auto"  # resolve fills it from the model's hidden size
        else:
            del values[path]
    out.values.update(values)


def _offload_applies(target: str, stage: int) -> bool:
    """Where DeepSpeed uses an offload section (it ignores it elsewhere)."""
    return stage == 3 if target == "param" else stage >= 1


def _grad_accum_dtype(parsed, stage: int, values: dict, origin: str, out: Imported) -> dict:
    from deepspeed.runtime.config import DtypeEnum

    accum = parsed.grad_accum_dtype
    if accum is None:
        return {"zero.fp32_grad_accum": False} if fp32_grad_accum_possible(stage, values["precision"], "none") else {}
    try:
        accum = DtypeEnum(accum).name  # DeepSpeed's own spellings: "float", "torch.float32", ... are fp32
    except ValueError:
        out.problems.append(f"{origin}: data_types.grad_accum_dtype={accum!r}: DeepSpeed's engine cannot read it "
                            "and would stop; write fp32, bf16 or fp16")
        return {}
    if accum == "fp32" and not fp32_grad_accum_possible(stage, values["precision"],
                                                        values.get("offload.optimizer.device", "none")):
        out.notes.append(f"{origin}: data_types.grad_accum_dtype=fp32 is not imported: craken accumulates in fp32 "
                         "only with ZeRO-1, bf16 and no optimizer offload (DeepSpeed's BF16 optimizer); this run's "
                         "gradients accumulate in 16 bits (set --zero 1 to keep fp32 accumulation)")
        return {}
    return {"zero.fp32_grad_accum": accum == "fp32"}


def _batch(cfg: dict, out: Imported) -> None:
    """The batch triple as DeepSpeed derives it (runtime/config.py `_set_batch_related_parameters`):
    stated numbers kept, "auto" left to craken, and a left-out member derived the way DeepSpeed does."""
    gb, mb, ga = (cfg.get(k) for k in _BATCH_KEYS)
    given = {path: v for path, v in (("batch.global_batch", gb), ("batch.micro_batch", mb),
                                     ("batch.grad_accum", ga)) if isinstance(v, int)}
    out.values.update(given)
    if ga is None and (gb is None) != (mb is None):
        out.values["batch.grad_accum"] = 1  # DeepSpeed: one of the two alone means no accumulation
    if mb is None and isinstance(gb, int):
        out.values["batch.micro_batch"] = None  # derived from the global batch and the process count


def _optimizer(cfg: dict, stated: dict, origin: str, out: Imported) -> None:
    """AdamW's settings where the file has an optimizer; left out, DeepSpeed's (and torch's) defaults.
    No optimizer block: the training script's optimizer, which is craken's own."""
    opt = cfg.get("optimizer")
    if not isinstance(opt, dict):
        return
    params = opt.get("params") if isinstance(opt.get("params"), dict) else {}
    torch_adam = params.get("torch_adam") is True
    # torch.optim.AdamW's weight decay defaults to 0.01; DeepSpeed's FusedAdam/CPUAdam and torch's Adam to 0.
    decoupled = params.get("adam_w_mode", True) is not False or str(opt.get("type", "")).lower() == "adamw"
    defaults = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01 if torch_adam and decoupled
                else 0.0}
    for key, default in defaults.items():
        value = params.get(key, default)
        if value != "auto":
            out.values[DEEPSPEED_FIELDS[f"optimizer.params.{key}"]] = value
    if "torch_adam" in params:
        out.values["optimizer.fused"] = not torch_adam
        return
    foreign = sorted(set(params) - _torch_adamw_arguments())
    if foreign:
        # DeepSpeed passes the params to the optimizer it builds: torch's AdamW would stop on these
        out.values["optimizer.fused"] = True
        out.notes.append(f"{origin}: {', '.join(f'optimizer.params.{k}={params[k]!r}' for k in foreign)}: torch's "
                         "AdamW takes no such argument, so craken keeps DeepSpeed's FusedAdam as the file does "
                         "(optimizer.fused: true; remove them to step torch's AdamW)")


def _torch_adamw_arguments() -> set[str]:
    import inspect

    import torch

    # DeepSpeed pops these before building the optimizer
    return set(inspect.signature(torch.optim.AdamW).parameters) | {"torch_adam", "adam_w_mode", "foreach"}


def _extra(cfg: dict, canonical: dict, read: set, origin: str, out: Imported) -> None:
    """Every key craken does not model, kept as the file states it."""
    from .sources import flatten, unflatten

    kept = {}
    for stated, value in flatten(cfg).items():
        key = canonical[stated]
        if key in DEEPSPEED_FIELDS or _covered(key) or stated.split(".")[0] == "scheduler":
            continue
        if key == "optimizer.type" and str(value).lower() == "adamw":
            continue
        kept[stated] = value
    own = _own_choices(cfg, out.values)
    kept = {k: v for k, v in kept.items() if own.get(k, _MISSING) != v}
    if isinstance(cfg.get("scheduler"), dict):
        schedule = craken_schedule(cfg["scheduler"], out.values)
        if schedule:
            out.values.update(schedule)
        else:
            kept["scheduler"] = cfg["scheduler"]  # a schedule is one block: kept whole, never merged into craken's
    if not kept:
        return
    out.values["deepspeed.extra"] = unflatten(kept)
    unread = sorted({k.split(".")[0] for k in kept} - read - {"optimizer", "scheduler"})
    listed = ", ".join(f"{k}={_short(v)}" for k, v in kept.items() if k.split(".")[0] not in unread)
    if listed:
        out.notes.append(f"{origin}: kept as written in ds_config.json (craken does not model them; change them "
                         f"under deepspeed.extra in the run file): {listed}")
    import difflib

    for key in unread:
        close = difflib.get_close_matches(key, sorted(read), n=1, cutoff=0.8)
        hint = f"did you mean {close[0]}? " if close else ""
        out.notes.append(f"{origin}: {key}={_short(cfg[key])}: DeepSpeed does not read this key; kept in "
                         f"ds_config.json as written ({hint}remove it under deepspeed.extra if it was meant as another)")


_MISSING = object()
_SCHEDULE_KINDS = {"WarmupCosineLR": "cosine", "WarmupDecayLR": "linear", "WarmupLR": "constant"}


def _own_choices(cfg: dict, values: dict) -> dict[str, Any]:
    """What craken renders itself for keys it does not model (its own files import without leftovers)."""
    profile = bool(values.get("logging.wall_clock_breakdown"))
    return {"timers.throughput.enabled": profile, "timers.throughput.synchronized": profile,
            "bf16.check_grad_overflow": False}


def craken_schedule(block: dict, values: dict) -> dict | None:
    """The schedule.* values of a scheduler block that is exactly one craken renders, else None."""
    from .spec import RunSpec
    from ..train.schedule import deepspeed_block

    params = block.get("params") or {}
    kind = _SCHEDULE_KINDS.get(block.get("type"))
    if kind is None or not all(isinstance(params.get(k), int) for k in ("warmup_num_steps", "total_num_steps")):
        return None
    schedule = {"schedule.kind": kind, "schedule.warmup_steps": params["warmup_num_steps"],
                "train.max_steps": params["total_num_steps"]}
    if "cos_min_ratio" in params:
        schedule["schedule.min_lr_ratio"] = params["cos_min_ratio"]
    from .sources import unflatten

    try:
        spec = RunSpec.model_validate_json(json.dumps(unflatten(
            {**schedule, "optimizer.lr": values.get("optimizer.lr", 3e-4)})))
    except ValueError:
        return None
    return schedule if deepspeed_block(spec) == block else None


def _covered(key: str) -> bool:
    """A deprecated name standing for a whole section craken models (cpu_offload -> offload_optimizer)."""
    return any(field.startswith(key + ".") for field in DEEPSPEED_FIELDS)


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _notes(cfg: dict, stated: dict, parsed, origin: str, out: Imported) -> None:
    """Where the run differs from what DeepSpeed would do with this file, and what fills "auto"."""
    old_names = canonical_keys(cfg)
    notes = [f"{origin}: {key}={_short(_value_at(cfg, key))} is DeepSpeed's old name for {_new_name(key, old_names)}: "
             "imported as that (rename it in the file to drop the old name)" for key in deprecated_keys(cfg)]
    autos = [f"{key}=auto <- {DEEPSPEED_FIELDS[key]}" + (f" ({_FLAG_OF[DEEPSPEED_FIELDS[key]]})"
                                                        if DEEPSPEED_FIELDS[key] in _FLAG_OF else "")
             for key, value in stated.items() if value == "auto" and key in DEEPSPEED_FIELDS and key in TRAINER_FILLS]
    if autos:
        notes.append(f"{origin}: \"auto\" filled from craken's settings as the HF Trainer fills it: {', '.join(autos)}")
    defaults = [f"{key}=auto" for key, value in stated.items() if value == "auto" and key not in TRAINER_FILLS
                and key in DEEPSPEED_FIELDS]
    if defaults:
        notes.append(f"{origin}: {', '.join(defaults)}: nothing fills it but DeepSpeed, which reads it as its default; "
                     "imported as that default (write a value to choose another)")
    notes += _unused(stated, parsed.zero_config.stage, origin)
    notes += _deliberate(cfg, stated, parsed, origin, fused=out.values.get("optimizer.fused") is True)
    out.notes += notes


def _unused(stated: dict, stage: int, origin: str) -> list[str]:
    """Modelled keys DeepSpeed ignores at this file's ZeRO stage: not imported, and said so."""
    # a no-op value (accelerate writes offload_param.device "none" at every stage) changes nothing: not said
    ignored = [key for key, value in stated.items()
               if key in DEEPSPEED_FIELDS and value not in (None, "none", False) and _ignored_at(key, stage)]
    if not ignored:
        return []
    return [f"{origin}: {', '.join(f'{k}={stated[k]!r}' for k in ignored)}: DeepSpeed ignores "
            f"{'it' if len(ignored) == 1 else 'them'} at ZeRO stage {stage}, so craken does not import "
            f"{'it' if len(ignored) == 1 else 'them'} (--zero 3 uses stage-3 settings and parameter offload)"]


def _ignored_at(key: str, stage: int) -> bool:
    if key.startswith("zero_optimization.offload_optimizer"):
        return stage == 0
    spec_path = DEEPSPEED_FIELDS[key]
    stage3_only = spec_path.startswith("zero.") and spec_path.removeprefix("zero.") in STAGE3_DEFAULTS \
        or key.startswith("zero_optimization.offload_param")
    return stage3_only and stage != 3


def _offloads_optimizer(parsed) -> bool:
    offload = parsed.zero_config.offload_optimizer
    return offload is not None and getattr(offload.device, "value", offload.device) != "none"


def _value_at(cfg: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _new_name(old: str, names: dict[str, str]) -> str:
    """The new name of an old one (a whole old section: its first key's new section)."""
    if old in names:
        return names[old]
    return next(new for stated, new in names.items() if stated.startswith(old + ".")).rsplit(".", 1)[0]


def _deliberate(cfg: dict, stated: dict, parsed, origin: str, fused: bool) -> list[str]:
    """Keys the file leaves out where craken renders something else than DeepSpeed's default, on purpose."""
    stage, notes = parsed.zero_config.stage, []
    if "optimizer" not in cfg:
        notes.append(f"{origin}: optimizer is not in the file (the training script's part): craken's AdamW "
                     "(optimizer.lr, optimizer.betas, ...; --lr)")
    elif stated.get("optimizer.params.torch_adam") is True and _offloads_optimizer(parsed):
        notes.append(f"{origin}: optimizer.params.torch_adam=true with optimizer offload: DeepSpeed would stop "
                     "(ZeRO-Offload refuses torch's Adam unless zero_force_ds_cpu_optimizer is false); craken steps "
                     "DeepSpeed's CPU Adam, the same update (--offload-optimizer none keeps torch's AdamW)")
    elif "optimizer.params.torch_adam" not in stated and not _offloads_optimizer(parsed) and not fused:
        notes.append(f"{origin}: optimizer.params.torch_adam is not set (DeepSpeed: its JIT-built FusedAdam op): "
                     "craken steps torch's AdamW, the same update without an op to build; set optimizer.fused: true "
                     "to keep DeepSpeed's op")
    if "scheduler" not in cfg:
        notes.append(f"{origin}: scheduler is not in the file (the training script's part): craken's schedule "
                     "(schedule.kind, schedule.warmup_steps)")
    if "timers" not in cfg:
        notes.append(f"{origin}: timers is not set (DeepSpeed: its throughput timer on, two GPU syncs a micro-step): "
                     "craken renders it off; --profile turns it on with DeepSpeed's breakdown")
    if parsed.bfloat16_config.enabled and "bf16.check_grad_overflow" not in stated:
        notes.append(f"{origin}: bf16.check_grad_overflow is not set (DeepSpeed: on, a host sync a step): craken "
                     "renders it off, its loop checks loss and gradient norm before every checkpoint; "
                     "--set train.on_nonfinite=skip turns it on")
    if not isinstance(parsed.steps_per_print, int):
        notes.append(f"{origin}: steps_per_print is not set (DeepSpeed: no log lines): craken prints every "
                     "logging.steps_per_print steps (--steps-per-print N)")
    if stage == 3 and "zero_optimization.stage3_gather_16bit_weights_on_model_save" not in stated:
        notes.append(f"{origin}: zero_optimization.stage3_gather_16bit_weights_on_model_save is not set (DeepSpeed: "
                     "false): craken gathers 16-bit weights on save so that final/ holds the model; set "
                     "zero.gather_16bit_weights_on_save: false to skip it")
    if stage == 0:
        notes.append(f"{origin}: zero_optimization.stage=0: on GPUs craken trains stage 0 without DeepSpeed (plain "
                     "Accelerate DDP, measured faster), where deepspeed.extra does not apply but for its scheduler "
                     "block; CPU processes keep DeepSpeed (--zero 1 keeps DeepSpeed on GPUs)")
    if parsed.bfloat16_config.enabled is False and parsed.float16_config.enabled is False and not any(
            stated.get(k) == "auto" for k in ("bf16.enabled", "fp16.enabled")):
        notes.append(f"{origin}: neither bf16 nor fp16 is enabled: DeepSpeed trains in fp32, imported as precision "
                     "fp32 (--precision bf16 to change)")
    return notes


# ---------------------------------------------------------------------------------------------
# accelerate YAML -> partial spec

# accelerate YAML keys that mirror a spec field.
_ACCEL_TOP = {"num_processes": "cluster.num_processes", "num_machines": "cluster.num_machines",
              "machine_rank": "cluster.machine_rank", "main_process_ip": "cluster.main_process_ip",
              "main_process_port": "cluster.main_process_port", "rdzv_backend": "cluster.rdzv_backend"}
# accelerate's inline deepspeed_config keys (DeepSpeedPlugin arguments); accelerate refuses them beside a file.
_ACCEL_DS_INLINE = ("gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device",
                    "offload_param_device", "offload_optimizer_nvme_path", "offload_param_nvme_path",
                    "zero3_save_16bit_model")
_MP = {"bf16": "bf16", "fp16": "fp16", "no": "fp32"}
# distributed types craken runs: DeepSpeed, DDP / one process on GPUs, CPU processes.
_RUNS = {"DEEPSPEED", "MULTI_GPU", "NO", "MULTI_CPU"}


@dataclass
class AccelerateImport:
    imported: Imported
    deepspeed: dict | None = None  # the DeepSpeed config accelerate builds from inline deepspeed_config keys
    deepspeed_file: str | None = None  # the deepspeed_config_file it names
    inline_keys: list[str] = field(default_factory=list)  # the deepspeed_config keys it builds a config from
    fp8: bool = False  # mixed_precision fp8 beside DeepSpeed


def accelerate_problems(cfg: dict) -> list[str]:
    """What accelerate's own config loader (ClusterConfig) refuses: unknown keys, values it cannot take."""
    from accelerate.commands.config.config_args import ClusterConfig

    data = ClusterConfig.process_config(dict(cfg))
    unknown = sorted(set(data) - set(ClusterConfig.__dataclass_fields__))
    if unknown:
        return [f"unknown key(s) {', '.join(unknown)}: accelerate refuses them; remove them"]
    try:
        ClusterConfig(**data)
    except (TypeError, ValueError) as exc:
        return [f"accelerate refuses it: {' '.join(str(exc).split())}"]
    return []


def from_accelerate(cfg: dict, origin: str = "accelerate.yaml") -> AccelerateImport:
    """Partial spec from an accelerate YAML, with the DeepSpeed config it stands for or names."""
    out = Imported()
    result = AccelerateImport(out)
    out.problems += [f"{origin}: {p}" for p in accelerate_problems(cfg)]
    if out.problems:
        return result
    kind = str(cfg.get("distributed_type") or "NO")
    if kind not in _RUNS:
        out.problems.append(f"{origin}: distributed_type is {kind!r}: craken trains with DeepSpeed ZeRO (ZeRO-3 "
                            "shards parameters as FSDP's FULL_SHARD does) or DDP; use distributed_type DEEPSPEED "
                            "with zero_stage 3, or --zero 3")
        return result
    for key, path in _ACCEL_TOP.items():
        value = cfg.get(key)
        if _is_number_string(value) and key != "main_process_ip":
            out.problems.append(f"{origin}: {key} is the string {value!r}: write it without quotes")
        elif value is not None:
            out.values[path] = value
    if cfg.get("use_cpu") is True or kind == "MULTI_CPU":
        out.values["cluster.use_cpu"] = True  # craken's own YAMLs write false even on CPU: false is no statement
    precision = _mixed_precision(cfg, origin, out)
    _dynamo(cfg, origin, out)
    if kind != "DEEPSPEED":
        out.values["zero.stage"] = 0  # DDP / one process: craken's run without ZeRO
        if precision:
            out.values["precision"] = precision
        out.notes += _plain_notes(cfg, origin)
        return result
    _deepspeed_section(cfg, precision, origin, result)
    return result


def _mixed_precision(cfg: dict, origin: str, out: Imported) -> str | None:
    mp = cfg.get("mixed_precision")
    if mp is None:
        return None
    if mp == "fp8":
        from typing import get_args

        from .spec import Precision

        if "fp8" in get_args(Precision):
            return "fp8"
    if mp not in _MP:
        out.problems.append(f"{origin}: mixed_precision {mp!r}: craken trains in bf16, fp16 or fp32; set "
                            "mixed_precision to bf16, fp16 or no")
        return None
    return _MP[mp]


_DYNAMO_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def dynamo_settings(cfg: dict) -> dict:
    """An accelerate YAML's dynamo_config with each key named as `accelerate launch` reads it (it adds
    the dynamo_ prefix a key lacks, and reads an old top-level dynamo_backend as this section)."""
    from accelerate.commands.config.config_args import ClusterConfig

    section = ClusterConfig.process_config(dict(cfg)).get("dynamo_config") or {}
    return {key if key.startswith("dynamo_") else f"dynamo_{key}": value for key, value in section.items()}


def _dynamo(cfg: dict, origin: str, out: Imported) -> None:
    """accelerate's torch.compile of the script's model as craken's model.compile: inductor, each decoder
    layer compiled (train.modeling.compile_regions), the nearest craken has to each other setting noted."""
    from accelerate.utils import DynamoBackend

    dynamo = dynamo_settings(cfg)
    backend = str(dynamo.get("dynamo_backend", "NO")).upper()
    mode = dynamo.get("dynamo_mode", "default") or "default"
    if backend not in DynamoBackend.list():
        out.problems.append(f"{origin}: dynamo_config.dynamo_backend {dynamo['dynamo_backend']!r} is not a backend "
                            "accelerate knows; set it to INDUCTOR, or NO to train eager")
    if mode not in _DYNAMO_MODES:
        out.problems.append(f"{origin}: dynamo_config.dynamo_mode {mode!r} is not a torch.compile mode; set it to "
                            f"one of {', '.join(_DYNAMO_MODES)}")
    if out.problems or backend == "NO":
        return
    out.values["model.compile"] = True
    if backend != "INDUCTOR":
        out.notes.append(f"{origin}: dynamo_config.dynamo_backend={backend} is not used: craken compiles with "
                         "inductor, each decoder layer on its own (model.compile; --no-compile to train eager)")
    if not _truthy(dynamo.get("dynamo_use_regional_compilation")):
        out.notes.append(f"{origin}: dynamo_config.dynamo_use_regional_compilation is not set (accelerate: the "
                         "whole model compiled as one graph): craken compiles each decoder layer (regional "
                         "compilation), one graph reused by every layer")
    if mode.startswith("max-autotune"):
        out.values["model.compile_tuning"] = True
        out.notes.append(f"{origin}: dynamo_config.dynamo_mode={mode}: imported as model.compile_tuning true, "
                         "craken's nearest (inductor's coordinate-descent tuning of each kernel's block sizes; no "
                         "GEMM autotuning, no CUDA graphs); in craken's own loop only, a script launched by "
                         "`craken launch` is compiled in inductor's default mode")
    elif mode == "reduce-overhead":
        out.notes.append(f"{origin}: dynamo_config.dynamo_mode=reduce-overhead is not used: craken compiles in "
                         "inductor's default mode, without CUDA graphs")
    for key, what in (("dynamo_use_fullgraph", "each decoder layer is compiled, graph breaks allowed"),
                      ("dynamo_use_dynamic", "torch.compile's default shapes: static, dynamic once a shape changes")):
        if _truthy(dynamo.get(key)):
            out.notes.append(f"{origin}: dynamo_config.{key}={dynamo[key]!r} is not used: craken compiles with "
                             f"inductor, regionally ({what})")


def _truthy(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


def _plain_notes(cfg: dict, origin: str) -> list[str]:
    notes = _fp8_notes(cfg, origin)
    if cfg.get("mpirun_config"):
        notes.append(f"{origin}: mpirun_config is not used: craken starts its processes with torchrun "
                     "(--launcher accelerate) or DeepSpeed's launcher (--launcher deepspeed)")
    if cfg.get("gpu_ids") not in (None, "all"):
        notes.append(f"{origin}: gpu_ids={cfg['gpu_ids']!r} is not imported: craken uses every GPU it sees; "
                     "set CUDA_VISIBLE_DEVICES to choose them")
    return notes


def _fp8_notes(cfg: dict, origin: str) -> list[str]:
    fp8 = cfg.get("fp8_config")
    if not fp8:
        return []
    settings = ", ".join(f"{k}={v!r}" for k, v in fp8.items())
    return [f"{origin}: fp8_config ({settings}) is not used: craken's fp8 is torchao's float8 (precision fp8), its "
            "scaling set by fp8.recipe (tensorwise or rowwise; --set fp8.recipe=rowwise)"]


def _deepspeed_section(cfg: dict, precision: str | None, origin: str, result: AccelerateImport) -> None:
    out = result.imported
    out.notes += _fp8_notes(cfg, origin)
    if precision == "fp8":
        result.fp8 = True  # accelerate's DeepSpeed config says bf16 (fp8 autocasts over it): the run is fp8
    ds = cfg.get("deepspeed_config") or {}
    result.deepspeed_file = ds.get("deepspeed_config_file")
    launcher = ds.get("deepspeed_multinode_launcher")
    if launcher is not None:
        out.values["cluster.launcher"] = "accelerate" if launcher == "standard" else "deepspeed"
    if result.deepspeed_file:
        beside = [f"deepspeed_config.{k}" for k in _ACCEL_DS_INLINE if k in ds] + (
            ["mixed_precision"] if precision else [])
        out.problems += [f"{origin}: {key} beside deepspeed_config_file: accelerate refuses it there; remove it and "
                         "keep the value in the DeepSpeed JSON" for key in beside]
        return
    result.deepspeed = inline_deepspeed_config(ds, precision)
    result.inline_keys = [f"deepspeed_config.{k}" for k in _ACCEL_DS_INLINE if k in ds]


def inline_deepspeed_config(ds: dict, precision: str | None) -> dict:
    """The DeepSpeed config accelerate builds from a YAML's inline deepspeed_config keys (its own
    DeepSpeedPlugin, given every argument so that no ACCELERATE_* variable of this shell leaks in)."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(
        zero_stage=ds.get("zero_stage", 2), gradient_accumulation_steps=ds.get("gradient_accumulation_steps", "auto"),
        gradient_clipping=ds.get("gradient_clipping", "auto"),
        offload_optimizer_device=ds.get("offload_optimizer_device", "none"),
        offload_param_device=ds.get("offload_param_device", "none"),
        offload_optimizer_nvme_path=ds.get("offload_optimizer_nvme_path", "none"),
        offload_param_nvme_path=ds.get("offload_param_nvme_path", "none"),
        zero3_save_16bit_model=bool(ds.get("zero3_save_16bit_model", False)),
        zero3_init_flag=bool(ds.get("zero3_init_flag", False)), hf_ds_config="none")
    plugin.set_mixed_precision({"fp32": "no", None: "no"}.get(precision, precision))
    config = dict(plugin.deepspeed_config)
    del config["steps_per_print"]  # accelerate's inf only silences DeepSpeed; craken prints its own lines
    return config


# ---------------------------------------------------------------------------------------------
# files -> one partial spec

_ACCEL_MARKERS = {"distributed_type", "compute_environment", "deepspeed_config"}


def is_foreign(path: Path, data: dict) -> bool:
    """Whether a file is a DeepSpeed JSON or an accelerate YAML (else a craken run file)."""
    return Path(path).suffix == ".json" or bool(_ACCEL_MARKERS & set(data))


def import_files(files: list[Path], num_processes: int | None = None) -> Imported:
    """A DeepSpeed JSON and/or an accelerate YAML (which may name its JSON) as one partial spec;
    `num_processes` is the world size to judge a lone JSON's batch triple with."""
    from . import yamlio

    out = Imported()
    ds_path = accel_path = None
    data = {}
    for path in map(Path, files):
        try:
            data[path] = yamlio.read_mapping(path)
        except CrakenError as exc:
            out.problems += exc.problems
            continue
        if path.suffix == ".json":
            ds_path = path
        else:
            accel_path = path
    if out.problems:
        return out
    accel = from_accelerate(data[accel_path], origin=accel_path.name) if accel_path else None
    if accel is not None:
        _take(out, accel.imported)
        if out.problems and ds_path is None:
            return out  # a refused YAML names nothing to read on; a JSON given beside it is still judged
    ds_data, ds_name = _deepspeed_source(ds_path, data.get(ds_path), accel, accel_path, out)
    if ds_data is not None:
        world = num_processes or out.values.get("cluster.num_processes")
        _take(out, from_deepspeed(ds_data, origin=ds_name, world_size=world if isinstance(world, int) else None))
        if accel is not None and accel.fp8 and out.values.get("precision") == "bf16":
            out.values["precision"] = "fp8"
    return out


def _take(out: Imported, part: Imported) -> None:
    out.values.update(part.values)
    out.problems += part.problems
    out.notes += part.notes


def _deepspeed_source(ds_path: Path | None, ds_data: dict | None, accel: AccelerateImport | None,
                      accel_path: Path | None, out: Imported) -> tuple[dict | None, str]:
    """The DeepSpeed config of a run: the JSON given, the one the YAML names, or the YAML's inline keys."""
    if ds_path is not None and accel is not None and accel.inline_keys:
        out.problems.append(f"{accel_path.name}: {', '.join(accel.inline_keys)} build accelerate's own DeepSpeed "
                            f"config and no deepspeed_config_file names {ds_path.name}, so accelerate would not read "
                            f"it: remove it from {accel_path.name} and set deepspeed_config_file: {ds_path.name}")
        return None, ""
    if ds_path is not None:
        named = accel.deepspeed_file if accel else None
        if named and Path(named).name != ds_path.name:
            out.notes.append(f"{accel_path.name}: deepspeed_config_file={named!r}; {ds_path.name}, given with it, "
                             "is read instead")
        return ds_data, ds_path.name
    if accel is None:
        return None, ""
    if accel.deepspeed is not None:
        return accel.deepspeed, f"{accel_path.name} (deepspeed_config)"
    if not accel.deepspeed_file:
        return None, ""
    from . import yamlio

    named = Path(accel.deepspeed_file)
    # accelerate opens it from the working directory; a YAML kept beside its JSON is found there too
    candidates = [named] if named.is_absolute() else [named, accel_path.parent / named]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        out.problems.append(f"{accel_path.name}: deepspeed_config_file={str(named)!r} does not exist (looked in "
                            f"{', '.join(str(c) for c in candidates)}): fix the path, or pass the JSON with it: "
                            f"craken config import DS.json {accel_path.name}")
        return None, ""
    try:
        return yamlio.read_mapping(found), found.name
    except CrakenError as exc:
        out.problems += exc.problems
        return None, ""


def run_file_text(values: dict, sources: list[str]) -> str:
    """The run file `craken config import` writes: the imported values, and where they came from."""
    from . import yamlio
    from .sources import unflatten

    head = [f"# craken run file imported from {' + '.join(sources)} by `craken config import`.",
            "# Keys the files leave out are at DeepSpeed's / accelerate's defaults; deepspeed.extra holds what",
            "# craken does not model, written back into ds_config.json as given. Use: craken train --config FILE"]
    return "\n".join(head) + "\n" + yamlio.dumps(unflatten(values))
