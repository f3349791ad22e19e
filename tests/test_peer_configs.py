"""Every real DeepSpeed JSON and accelerate YAML in ../shared/peer-configs/ (INDEX.md names each source),
read where it lies: what DeepSpeed or accelerate accepts, `craken config import` takes with exit 0, and
the ds_config.json craken renders from it reads in DeepSpeed's own `DeepSpeedConfig` as the same run as
the original (both with "auto" filled the same way) on every field DeepSpeed exposes, except where a
printed note names the key craken renders differently on purpose. What craken refuses, DeepSpeed or
accelerate refuses too (or it is a distributed type craken does not run, said as such). Parsing only."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from craken_cli.config import importers, yamlio
from craken_cli.launch import render
from craken_cli.plan.resolve import resolve
from craken_cli.config.sources import Layer, build_spec, flatten, unflatten

REPO = Path(__file__).resolve().parents[1]


def _peer_dir() -> Path:
    """../shared/peer-configs beside the clone (a git worktree: beside its main checkout)."""
    bases = [REPO]
    git = REPO / ".git"
    if git.is_file():  # "gitdir: <main>/.git/worktrees/<name>"
        bases.append(Path(git.read_text().split(":", 1)[1].strip()).parents[2])
    for base in bases:
        if (base.parent / "shared" / "peer-configs").is_dir():
            return base.parent / "shared" / "peer-configs"
    return REPO.parent / "shared" / "peer-configs"


PEER = _peer_dir()
FILES = sorted(p.name for p in PEER.glob("*") if p.suffix in (".json", ".yaml", ".yml")) if PEER.is_dir() else []
pytestmark = pytest.mark.skipif(not FILES, reason=f"{PEER} is absent: the real configs lie beside the clone in CI "
                                                  "and are never copied into the project")
# What DeepSpeedConfig exposes that a noted, deliberate difference explains: attribute prefix -> key in the note.
NOTED = {"timers_config": "timers is not set", "bfloat16_config.check_grad_overflow": "bf16.check_grad_overflow",
         "optimizer_params.torch_adam": "torch_adam", "optimizer_params.fused": "torch_adam",
         "zero_config.gather_16bit_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save is not set",
         "steps_per_print": "steps_per_print is not set", "optimizer_name": "optimizer is not in the file",
         "optimizer_params": "optimizer is not in the file", "scheduler_name": "scheduler is not in the file",
         "scheduler_params": "scheduler is not in the file", "grad_accum_dtype": "grad_accum_dtype"}
# Distributed types accelerate runs and craken does not: refused by craken's own words, not a parser's.
CRAKEN_DOES_NOT_RUN = ("distributed_type is 'FSDP'",)


def _sources() -> dict[str, str]:
    """Peer file -> its path in its repository (INDEX.md)."""
    rows = re.findall(r"^\| (\S+) \| \S+ \| (\S+) \|", (PEER / "INDEX.md").read_text(), flags=re.M)
    return dict(rows)


def _named_json(yaml_name: str, data: dict) -> Path | None:
    """The peer copy of the deepspeed_config_file a YAML names, found through both files' source paths."""
    named = (data.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if not named or data.get("distributed_type") != "DEEPSPEED":
        return None
    source = Path(os.path.normpath(Path(_sources()[yaml_name]).parent / named))
    candidate = PEER / f"{yaml_name.split('__')[0]}__{'__'.join(source.parts)}"
    return candidate if candidate.is_file() else None


def _inputs(name: str) -> list[Path]:
    path = PEER / name
    if path.suffix == ".json":
        return [path]
    paired = _named_json(name, yamlio.read_mapping(path))
    return [paired, path] if paired else [path]


def _original_deepspeed(files: list[Path]) -> dict | None:
    """The DeepSpeed config the files stand for, as accelerate would hand it to DeepSpeed."""
    json_file = next((f for f in files if f.suffix == ".json"), None)
    if json_file is not None:
        return yamlio.read_mapping(json_file)
    data = yamlio.read_mapping(files[-1])
    if data.get("distributed_type") != "DEEPSPEED":
        return None
    mp = data.get("mixed_precision")
    return importers.inline_deepspeed_config(data.get("deepspeed_config") or {}, {"no": "fp32"}.get(mp, mp))


def _parsed(cfg: dict, world: int):
    from craken_cli.config.dscheck import parse_deepspeed_config

    return parse_deepspeed_config(cfg, world)


def _exposed(parsed) -> dict:
    """Every field DeepSpeedConfig exposes, as a flat dict of plain values."""
    out = {}
    for name, value in vars(parsed).items():
        if name in ("_param_dict", "global_rank"):
            continue
        if hasattr(value, "model_dump"):
            value = value.model_dump()
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            value = {k: v for k, v in vars(value).items() if not k.startswith("_")}
        out.update(flatten({name: value}) if isinstance(value, dict) else {name: value})
    for target in ("offload_optimizer", "offload_param"):  # a section with device none is no section
        if out.get(f"zero_config.{target}.device") in ("none", "OffloadDeviceEnum.none"):
            out = {k: v for k, v in out.items() if not k.startswith(f"zero_config.{target}.")}
    return {k: (str(v) if not isinstance(v, (int, float, str, bool, list, type(None))) else v) for k, v in out.items()
            if k not in _deprecated_fields()}


def _deprecated_fields() -> set[str]:
    """DeepSpeed's old names, which it folds into their new fields (compared there)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return {f"zero_config.{name}" for name, info in DeepSpeedZeroConfig.model_fields.items()
            if (info.json_schema_extra or {}).get("deprecated")}


def _accepted_by_consumers(files: list[Path]) -> str | None:
    """None when DeepSpeed and accelerate take the files; else what they say."""
    from accelerate.commands.config.config_args import load_config_from_file

    accel = next((f for f in files if f.suffix != ".json"), None)
    if accel is not None:
        try:
            load_config_from_file(str(accel))
        except Exception as exc:  # accelerate's own loader: its message is the verdict
            return f"accelerate: {exc}"
        named = (yamlio.read_mapping(accel).get("deepspeed_config") or {}).get("deepspeed_config_file")
        if named and len(files) == 1 and yamlio.read_mapping(accel).get("distributed_type") == "DEEPSPEED":
            return "accelerate: its deepspeed_config_file is not there"
    ds = _original_deepspeed(files)
    if ds is None:
        return None
    world = importers.implied_world(ds)
    try:
        _parsed(importers.fill_auto(ds, importers.AutoFill(world_size=world)), world)
    except Exception as exc:  # DeepSpeed's parser: its message is the verdict
        return f"DeepSpeed: {exc}"
    return None


def _imported_spec(files: list[Path], imported):
    from craken_cli.plan.hardware import Hardware

    values = dict(imported.values)
    ds = _original_deepspeed(files)
    world = values.get("cluster.num_processes") or (importers.implied_world(ds) if ds else 1)
    values.update({"cluster.num_processes": world, "cluster.num_machines": 1, "cluster.machine_rank": 0,
                   "cluster.main_process_ip": None})
    spec = build_spec([Layer("file", "peer", unflatten(values))])
    return resolve(spec, Hardware(cpu_count=2))[0].spec  # CPU processes: DeepSpeed at every stage


# The verdict table of docs/guide.md's migration section, row by row.
KEPT, CHANGED, REAL, NOT_RUN, WRONG = (
    "accepted, stated keys kept", "accepted, a stated key not imported or changed (each noted)",
    "refused for a real problem (DeepSpeed / accelerate refuse it too)",
    "refused: a distributed type craken does not run (FSDP)",
    "refused although DeepSpeed / accelerate accept it")
# Notes that say a stated key is not imported or is rendered otherwise.
CHANGED_MARKERS = ("not import", "is not used", "DeepSpeed would stop")


@dataclass
class Verdict:
    files: list[Path]
    refusal: str | None  # what DeepSpeed / accelerate say; None: they accept the files
    imported: importers.Imported
    unexplained: list[str] = field(default_factory=list)  # fields DeepSpeed reads otherwise, no note saying why

    @property
    def row(self) -> str:
        if self.imported.problems:
            if self.refusal is not None:
                return REAL
            return NOT_RUN if any(r in p for p in self.imported.problems for r in CRAKEN_DOES_NOT_RUN) else WRONG
        if any(m in note for note in self.imported.notes for m in CHANGED_MARKERS):
            return CHANGED
        return KEPT


def _verdict(name: str) -> Verdict:
    files = _inputs(name)
    verdict = Verdict(files, _accepted_by_consumers(files), importers.import_files(files))
    original = _original_deepspeed(files)
    if verdict.refusal is None and not verdict.imported.problems and original is not None:
        spec = _imported_spec(files, verdict.imported)
        verdict.unexplained = [d for d in _differences(original, spec) if not _noted(d, verdict.imported.notes)]
    return verdict


@pytest.fixture(scope="module")
def verdicts() -> dict[str, Verdict]:
    return {name: _verdict(name) for name in FILES}


@pytest.mark.parametrize("name", FILES)
def test_peer_config(name, verdicts, craken, workdir):
    verdict = verdicts[name]
    result = craken("config", "import", *verdict.files, "--out", workdir / "craken.yaml")
    assert verdict.row != WRONG, f"{name}: DeepSpeed/accelerate accept it, craken refused:\n{result.output}"
    if verdict.row in (REAL, NOT_RUN):
        assert result.code == 2 and "Traceback" not in result.output, result.output
        assert not (workdir / "craken.yaml").exists()
        return
    assert verdict.refusal is None, f"{name}: {verdict.refusal}, but craken imported it"
    assert result.code == 0, result.output
    assert (workdir / "craken.yaml").is_file()
    assert verdict.unexplained == [], f"{name}: DeepSpeed reads these differently, no note says why"
    if _original_deepspeed(verdict.files) is not None:  # and the launch's check of deepspeed.extra lets it run
        from craken_cli.launch import preflight

        assert preflight.deepspeed_extra_problems(_imported_spec(verdict.files, verdict.imported)) == []


def test_the_guides_verdict_table_is_the_count(verdicts):
    """docs/guide.md's migration section counts these files' verdicts; it must say what this test finds."""
    guide = (REPO / "docs" / "guide.md").read_text()
    section = guide[guide.index("## Migrating an existing"):]
    table = dict(re.findall(r"^\| (accepted[^|]*|refused[^|]*) \| (\d+) \|$", section, flags=re.M))
    counted = {row: 0 for row in (KEPT, CHANGED, REAL, NOT_RUN, WRONG)}
    for verdict in verdicts.values():
        counted[verdict.row] += 1
    assert {row.strip(): int(n) for row, n in table.items()} == counted, counted


def _differences(original: dict, spec) -> list[str]:
    from craken_cli.plan.modelinfo import model_info

    hidden = model_info(spec.model.name_or_path).hidden_size
    fill = importers.AutoFill.of(spec, hidden)
    before = _exposed(_parsed(importers.fill_auto(original, fill), spec.world_size))
    after = _exposed(_parsed(render.deepspeed_config(spec), spec.world_size))
    # a parameter left out is the one the optimizer DeepSpeed builds takes by default (torch_adam: DeepSpeed's
    # params.pop("torch_adam", False)), on either side
    defaults = {**_optimizer_defaults(original), "torch_adam": False}
    for side in (before, after):
        if "optimizer_params.lr" in side:
            side.update({f"optimizer_params.{k}": v for k, v in defaults.items()
                         if side.get(f"optimizer_params.{k}") is None})
    return [f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)]


def _optimizer_defaults(original: dict) -> dict:
    """What the optimizer DeepSpeed builds from the file takes for a parameter the file leaves out."""
    import inspect

    import torch
    from deepspeed.ops.adam import FusedAdam

    params = (original.get("optimizer") or {}).get("params") or {}
    decoupled = params.get("adam_w_mode", True) is not False
    cls = (torch.optim.AdamW if decoupled else torch.optim.Adam) if params.get("torch_adam") is True else FusedAdam
    signature = inspect.signature(cls).parameters
    return {k: list(signature[k].default) if k == "betas" else signature[k].default
            for k in ("lr", "betas", "eps", "weight_decay")}


def _noted(difference: str, notes: list[str]) -> bool:
    key = difference.split(":")[0]
    return any(key.startswith(prefix) and any(needle in note for note in notes) for prefix, needle in NOTED.items())


def test_a_lone_train_batch_size_gets_deepspeeds_micro_batch(workdir, cpu_only):
    """DeepSpeed: train_batch_size alone means no accumulation and micro-batch = global / processes
    (craken kept its own micro-batch 4 and render then failed on `global batch 2 != micro_batch 4 x ...`)."""
    (workdir / "ds.json").write_text(json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 2}}))
    imported = importers.import_files([workdir / "ds.json"])
    values = {**imported.values, "cluster.num_processes": 2}
    spec = resolve(build_spec([Layer("file", "ds.json", unflatten(values))]), cpu_only)[0].spec
    assert (spec.batch.micro_batch, spec.grad_accum, spec.train_batch_size) == (4, 1, 8)
    parsed = _parsed(render.deepspeed_config(spec), 2)
    assert parsed.train_micro_batch_size_per_gpu == 4 and parsed.gradient_accumulation_steps == 1


def test_deepspeeds_old_names_are_read_as_deepspeed_reads_them(workdir):
    (workdir / "ds.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 2, "bfloat16": {"enabled": True},
        "zero_optimization": {"stage": 3, "cpu_offload": True, "max_live_parameters": 7, "max_reuse_distance": 9,
                              "stage3_gather_fp16_weights_on_model_save": True}}))
    imported = importers.import_files([workdir / "ds.json"])
    assert imported.problems == []
    values = imported.values
    assert values["precision"] == "bf16" and values["offload.optimizer.device"] == "cpu"
    assert values["zero.stage3_max_live_parameters"] == 7 and values["zero.stage3_max_reuse_distance"] == 9
    assert values["zero.gather_16bit_weights_on_save"] is True
    assert "deepspeed.extra" not in values  # nothing left over: every old name was a modelled key
    assert any("cpu_offload=True is DeepSpeed's old name" in note for note in imported.notes)


def test_keys_deepspeed_reads_pass_through_with_a_note(workdir, cpu_only):
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2, "sub_group_size": 123},
           "activation_checkpointing": {"partition_activations": True}, "tensor_parallel": {"autotp_size": 2},
           "fp16": {"enabled": True, "initial_scale_power": 32},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}}
    (workdir / "ds.json").write_text(json.dumps(cfg))
    imported = importers.import_files([workdir / "ds.json"])
    assert imported.problems == []
    note = next(n for n in imported.notes if "kept as written" in n)
    for key in ("zero_optimization.sub_group_size=123", "activation_checkpointing", "tensor_parallel",
                "fp16.initial_scale_power=32", "scheduler="):
        assert key in note
    spec = resolve(build_spec([Layer("file", "ds.json", unflatten(imported.values))]), cpu_only)[0].spec
    rendered = render.deepspeed_config(spec)
    assert rendered["fp16"]["initial_scale_power"] == 32 and rendered["zero_optimization"]["sub_group_size"] == 123
    assert rendered["scheduler"] == {"type": "WarmupLR", "params": {"warmup_num_steps": spec.schedule.warmup_steps}}
    assert rendered["activation_checkpointing"] == {"partition_activations": True}


def test_a_deepspeed_json_works_as_config(craken, workdir):
    (workdir / "ds.json").write_text(json.dumps({"train_batch_size": 8, "gradient_accumulation_steps": 2,
                                                 "zero_optimization": {"stage": 2, "reduce_scatter": False}}))
    result = craken("config", "render", "--config", "ds.json", "--cpu", "--num-processes", "2", "--out", "out")
    assert result.code == 0, result.output
    ds = json.loads((workdir / "out" / render.DS_FILE).read_text())
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (2, 2)
    assert ds["zero_optimization"]["reduce_scatter"] is False and ds["gradient_clipping"] == 1.0
    assert "note: ds.json: kept as written" in result.err


def test_craken_reads_its_own_plain_accelerate_yaml(craken, workdir):
    """The accelerate.yaml craken renders for a run without ZeRO (MULTI_GPU / NO) was refused."""
    from craken_cli.launch.render import plain_accelerate_config
    from craken_cli.config.spec import RunSpec

    spec = RunSpec.model_validate({"zero": {"stage": 0}, "precision": "bf16",
                                   "cluster": {"num_processes": 2, "use_cpu": False, "rdzv_backend": "static"}})
    (workdir / "accelerate.yaml").write_text(yamlio.dumps(plain_accelerate_config(spec)))
    result = craken("config", "import", "accelerate.yaml", "--out", "craken.yaml")
    assert result.code == 0, result.output
    values = flatten(yamlio.read_mapping(workdir / "craken.yaml"))
    assert values["zero.stage"] == 0 and values["precision"] == "bf16" and values["cluster.num_processes"] == 2


def test_a_missing_deepspeed_config_file_is_one_clear_error(craken, workdir):
    (workdir / "accelerate.yaml").write_text(yamlio.dumps({"distributed_type": "DEEPSPEED", "num_processes": 2,
                                                           "deepspeed_config": {"deepspeed_config_file": "gone.json"}}))
    result = craken("config", "import", "accelerate.yaml", "--out", "craken.yaml")
    assert result.code == 2 and "gone.json" in result.err and "does not exist" in result.err
    assert "Traceback" not in result.output and not (workdir / "craken.yaml").exists()


def test_import_never_overwrites_and_writes_nothing_on_bad_input(craken, workdir):
    (workdir / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 2}))
    (workdir / "craken.yaml").write_text("zero:\n  stage: 3\n")
    result = craken("config", "import", "ds.json")
    assert result.code == 2 and "--force" in result.err
    assert (workdir / "craken.yaml").read_text() == "zero:\n  stage: 3\n"
    (workdir / "bad.json").write_text(json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 2, "x": 1}}))
    result = craken("config", "import", "bad.json", "--out", "new.yaml")
    assert result.code == 2 and "zero_optimization.x = 1" in result.err and not (workdir / "new.yaml").exists()


def test_an_accelerate_yaml_works_as_config(craken, workdir):
    """accelerate's inline keys become the DeepSpeed config accelerate would build (its DeepSpeedPlugin)."""
    (workdir / "accel.yaml").write_text(yamlio.dumps({
        "distributed_type": "DEEPSPEED", "num_processes": 2, "mixed_precision": "bf16",
        "deepspeed_config": {"zero_stage": 3, "offload_param_device": "cpu", "zero3_save_16bit_model": True}}))
    result = craken("config", "render", "--config", "accel.yaml", "--cpu", "--out", "out")
    assert result.code == 0, result.output
    ds = json.loads((workdir / "out" / render.DS_FILE).read_text())
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu" and ds["bf16"]["enabled"] is True
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
