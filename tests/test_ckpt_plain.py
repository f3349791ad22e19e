"""`craken ckpt list|export|convert` on a checkpoint of a run without DeepSpeed (ZeRO stage 0: the
plain engine, Accelerate DDP). The checkpoint is a real one: the built-in tiny Llama (tied embeddings)
trained one step under `accelerate.Accelerator(cpu=True)` in this process and saved by craken's own
`checkpoint.save` (accelerate `save_state`: model.safetensors, optimizer.bin, random_states_0.pkl, plus
hf/ and craken_state.json), in a run folder with model_meta/ as `craken train` writes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from craken_cli.ckpt import manage
from craken_cli.train import checkpoint

STEP = 4


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForCausalLM

    from craken_cli.train import builtin

    run = tmp_path_factory.mktemp("plain") / "run"
    torch.manual_seed(0)
    tok = builtin.build_tokenizer()
    model = AutoModelForCausalLM.from_config(builtin.model_config(tok))
    assert model.config.tie_word_embeddings
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    accelerator = Accelerator(cpu=True)
    try:
        assert accelerator.state.deepspeed_plugin is None
        model, optimizer = accelerator.prepare(model, optimizer)
        ids = torch.randint(0, len(tok), (2, 16))
        accelerator.backward(model(input_ids=ids, labels=ids).loss)
        optimizer.step()  # weights no longer those of the initialisation, optimizer state not empty
        checkpoint.write_model_meta(accelerator, run, accelerator.unwrap_model(model), tok, "bf16")
        path = checkpoint.save(accelerator, run, checkpoint.TrainState(step=STEP), keep=2)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert path.name == f"step_{STEP:08d}" and checkpoint.is_complete(path)
    assert (path / "model.safetensors").is_file() and (path / "optimizer.bin").is_file()
    assert not (path / checkpoint.SHARDS).exists()
    return run


def _ckpt(run: Path) -> Path:
    return checkpoint.checkpoint_dir(run) / f"step_{STEP:08d}"


def _reload(out: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


@pytest.mark.parametrize("dtype", ["auto", "fp32"])
def test_export_of_a_plain_checkpoint_reloads_with_the_saved_weights(craken, workdir, plain_run, dtype):
    import torch
    from safetensors.torch import load_file

    saved = load_file(_ckpt(plain_run) / "model.safetensors")
    assert "lm_head.weight" not in saved  # accelerate keeps one name of the tied pair
    result = craken("ckpt", "export", plain_run, "--out", workdir / "out", "--dtype", dtype)
    assert result.code == 0, result.output
    out = workdir / "out"
    assert {"model.safetensors", "config.json", "tokenizer.json", "craken_export.json"} <= {p.name for p in out.iterdir()}
    want = torch.bfloat16 if dtype == "auto" else torch.float32  # auto: the training precision (bf16)
    meta = json.loads((out / "craken_export.json").read_text())
    assert meta["step"] == STEP and meta["dtype"] == str(want).split(".")[-1]

    model = _reload(out)
    weights = model.state_dict()
    assert set(saved) <= set(weights)
    for name, tensor in saved.items():
        assert weights[name].dtype == want, name
        assert torch.equal(weights[name], tensor.to(want)), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


def test_export_of_a_plain_checkpoint_saved_through_ddp(craken, workdir, plain_run, tmp_path):
    """Under DistributedDataParallel `save_state` writes the wrapped model's keys ("module.")."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    run = tmp_path / "ddp"
    shutil.copytree(plain_run, run)
    ckpt = _ckpt(run)
    saved = load_file(ckpt / "model.safetensors")
    save_file({f"module.{k}": v for k, v in saved.items()}, ckpt / "model.safetensors", metadata={"format": "pt"})
    checkpoint.write_state(ckpt, checkpoint.read_state(ckpt))  # re-seal: the file's size changed
    result = craken("ckpt", "export", run, "--out", workdir / "out", "--dtype", "fp32")
    assert result.code == 0, result.output
    weights = _reload(workdir / "out").state_dict()
    assert all(torch.equal(weights[k], v) for k, v in saved.items())


def test_convert_of_a_plain_checkpoint_says_it_needs_none(craken, plain_run, monkeypatch):
    def no_deepspeed(argv, **kwargs):
        raise AssertionError(f"ran {argv}")

    monkeypatch.setattr(manage.subprocess, "run", no_deepspeed)
    result = craken("ckpt", "convert", _ckpt(plain_run))
    assert result.code == 2, result.output
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("craken: cannot convert: "), result.err
    assert "without DeepSpeed" in lines[0] and "needs no conversion" in lines[0]
    assert "Traceback" not in result.output
    assert not (checkpoint.checkpoint_dir(plain_run) / manage.UNIVERSAL_DIR).exists()


def test_list_shows_a_plain_checkpoint(craken, plain_run):
    result = craken("ckpt", "list", plain_run)
    assert result.code == 0, result.output
    [line] = [line for line in result.out.splitlines() if "step_" in line]
    assert "complete" in line and "(no DeepSpeed)" in line and "(latest)" in line
    [row] = json.loads(craken("ckpt", "list", plain_run, "--json").out)
    assert row["step"] == STEP and row["complete"] and row["plain"] and row["processes"] == 1
    assert not row["universal"]


def test_resume_of_a_plain_checkpoint_needs_a_run_without_deepspeed(plain_run):
    """Accelerate's plain files hold no DeepSpeed shards; any process count loads them as they are."""
    from craken_cli.config.spec import RunSpec
    from craken_cli.ckpt.resume import convert_if_world_changed, engine_mismatch

    ckpt = _ckpt(plain_run)
    state = checkpoint.read_state(ckpt)
    gpu_plain = RunSpec.model_validate({"zero": {"stage": 0}, "cluster": {"use_cpu": False, "num_processes": 4}})
    assert engine_mismatch(ckpt, state, gpu_plain) is None
    assert convert_if_world_changed(ckpt, gpu_plain, [], plain_run) == ckpt  # no universal conversion
    zero2 = RunSpec.model_validate({"zero": {"stage": 2}, "cluster": {"use_cpu": False}})
    why = engine_mismatch(ckpt, state, zero2)
    assert why.startswith("it was saved without DeepSpeed") and "--zero 0" in why
