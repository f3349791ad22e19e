"""`precision: fp8`: refusals before launch, rendering, torchao's float8 Linear swap by shape, the
export back to a plain model, and (e2e) a real 2-process DeepSpeed training on CPU through it.

torch's float8 matmul (`_scaled_mm`) also runs on CPU, so the module swap, its numerics and the
loop's checkpoints and final/ run here; craken itself refuses fp8 on CPU processes (float8 tensor
cores are what makes it faster) and the e2e test lifts only that gate, in the CLI process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from craken_cli.errors import CrakenError
from craken_cli.plan.hardware import GPU, GiB, FakeProbe, detect
from craken_cli.config.options import SpecArgs, load_run
from craken_cli.train import fp8

H100 = FakeProbe(gpus=[GPU(0, "NVIDIA H100 80GB HBM3", 80 * GiB, 79 * GiB, (9, 0))])
A100 = FakeProbe(gpus=[GPU(0, "NVIDIA A100-SXM4-80GB", 80 * GiB, 79 * GiB, (8, 0))])


def args(**flags) -> SpecArgs:
    return SpecArgs(flags={f"--{k.replace('_', '-')}": v for k, v in flags.items()})


@pytest.fixture(autouse=True)
def _no_project_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def torchao_float8():
    try:
        return fp8._quiet_import()
    except Exception as exc:  # a torchao built for another torch may fail with any error
        pytest.skip(f"torchao not importable here: {exc}")


# ---------------------------------------------------------------------------------------------
# before launch


def test_fp8_on_cpu_is_refused_with_exit_2_and_nothing_written(craken, workdir):
    result = craken("train", "--precision", "fp8")
    assert result.code == 2, result.output
    assert "precision fp8 needs NVIDIA GPUs of compute capability 8.9" in result.output
    assert "--precision bf16" in result.output and "Traceback" not in result.output
    assert not any(workdir.iterdir()), list(workdir.iterdir())  # no run folder, no file


def test_fp8_on_a_gpu_without_float8_is_refused():
    with pytest.raises(CrakenError) as exc:
        load_run(args(precision="fp8", zero=0), hardware=detect(A100, environ={}), environ={})
    assert any("A100" in p and "8.0" in p and "--precision bf16" in p for p in exc.value.problems)


def test_fp8_without_torchao_is_refused_before_launch_with_the_install_command(monkeypatch, workdir):
    from craken_cli.launch.prepare import TrainRequest, prepare

    monkeypatch.setattr(fp8, "torchao_installed", lambda: False)
    request = TrainRequest(args(precision="fp8", zero=0))
    with pytest.raises(CrakenError) as exc:
        prepare(request, environ={}, hardware=detect(H100, environ={}))
    assert exc.value.problems == ["precision fp8 trains through torchao, which is not installed: "
                                  "pip install 'craken[fp8]'"]
    assert not any(workdir.iterdir())
    # planning for such GPUs needs no torchao here
    resolved, _ = load_run(args(precision="fp8", zero=0), hardware=detect(H100, environ={}), environ={})
    assert resolved.spec.precision == "fp8"


@pytest.mark.parametrize("flags, needle", [
    ({"zero": 3, "offload_optimizer": "none"}, "ZeRO-3"),
    ({"zero": 2, "offload_optimizer": "cpu"}, "--offload-optimizer none"),
])
def test_fp8_at_zero3_or_with_offload_is_refused_naming_the_flag(flags, needle):
    with pytest.raises(CrakenError) as exc:
        load_run(args(precision="fp8", **flags), hardware=detect(H100, environ={}), environ={})
    assert any(needle in p and "precision fp8" in p for p in exc.value.problems), exc.value.problems


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_fp8_renders_bf16_for_deepspeed_and_accelerate(zero, monkeypatch):
    from craken_cli.launch.render import accelerate_config, deepspeed_config

    monkeypatch.setattr(fp8, "torchao_installed", lambda: True)
    resolved, _ = load_run(args(precision="fp8", zero=zero, offload_optimizer="none"),
                           hardware=detect(H100, environ={}), environ={})
    spec = resolved.spec
    assert spec.precision == "fp8" and spec.base_precision == "bf16"
    if zero == 0:
        assert accelerate_config(spec, "ds.json")["mixed_precision"] == "bf16"
    else:
        ds = deepspeed_config(spec)
        assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    # ZeRO-1 on one GPU keeps DeepSpeed's fp32 gradient accumulation, as bf16 does
    assert spec.fp32_grad_accum == (zero == 1)


# ---------------------------------------------------------------------------------------------
# which Linears convert


def test_shape_rule_is_torchaos_filter():
    float8 = torchao_float8()
    import torch

    sizes = [16, 24, 256, 1000, 1024, 1040, 2048, 2064, 4096, 4112, 5632, 8192]
    for recipe in fp8.RECIPES:
        theirs = float8._auto_filter_for_recipe(recipe, filter_fqns=[])
        for n in sizes:
            for k in sizes:
                linear = torch.nn.Linear(k, n, device="meta")
                assert fp8.converts(n, k, recipe) == theirs(linear, "layer"), (recipe, n, k)


def _llama(hidden, layers, heads, kv, mlp, vocab, tied=False, device="meta"):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=mlp, vocab_size=vocab, tie_word_embeddings=tied)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg)


def test_conversion_of_the_1b_shape_keeps_small_gemms_and_the_output_layer_in_bf16():
    model = _llama(2048, 2, 32, 4, 5632, 32000)  # benchmarks/ llama-1.1b, two layers
    converted, kept = fp8.plan_conversion(model, "tensorwise")
    suffixes = {name.rsplit(".", 1)[-1] for name in converted}
    assert suffixes == {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "lm_head" in kept
    assert {name.rsplit(".", 1)[-1] for name in kept} == {"k_proj", "v_proj", "lm_head"}  # 2048 -> 256
    rowwise, _ = fp8.plan_conversion(model, "rowwise")
    assert {name.rsplit(".", 1)[-1] for name in rowwise} == {"gate_proj", "up_proj"}  # down: 5632 -> 2048


def _spec(precision="fp8", recipe="tensorwise"):
    from craken_cli.config.spec import RunSpec

    return RunSpec.model_validate({"precision": precision, "fp8": {"recipe": recipe}})


def test_convert_train_step_unconvert_and_save_a_plain_model(tmp_path):
    float8 = torchao_float8()
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = _llama(64, 2, 4, 2, 1040, 256, tied=True, device="cpu")  # gate/up (1040 x 64) convert
    names = list(model.state_dict())
    weights = {n: p for n, p in model.named_parameters()}
    assert fp8.convert_model(model, _spec("bf16")) is model and not fp8.is_converted(model)
    fp8.convert_model(model, _spec())
    swapped = [n for n, m in model.named_modules() if isinstance(m, float8.float8_linear.Float8Linear)]
    assert sorted(swapped) == sorted(f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj"))
    assert list(model.state_dict()) == names  # checkpoints keep their keys
    assert all(p is weights[n] and p.dtype == torch.float32 for n, p in model.named_parameters())

    ids = torch.randint(0, 256, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())

    fp8.unconvert(model)
    assert not fp8.is_converted(model)
    assert all(p is weights[n] for n, p in model.named_parameters())  # the same tensors, now in plain Linears
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    model.save_pretrained(tmp_path / "final")
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert "quantization_config" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert type(reloaded.model.layers[0].mlp.gate_proj) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_float8_matmuls_stay_close_to_bf16():
    torchao_float8()
    import copy

    import torch

    torch.manual_seed(0)
    model = _llama(64, 2, 4, 2, 1040, 256, device="cpu")
    reference = copy.deepcopy(model)
    fp8.convert_model(model, _spec())
    ids = torch.randint(0, 256, (4, 64))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = model(input_ids=ids, labels=ids).loss, reference(input_ids=ids, labels=ids).loss
    assert abs(a.item() - b.item()) / b.item() < 0.02


def test_probe_reports_why_it_cannot_run(monkeypatch):
    why = fp8.probe("cuda:0")  # no GPU here: the probe answers instead of raising
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert why and "Error" in why


# ---------------------------------------------------------------------------------------------
# a real training


@pytest.fixture(scope="module")
def fp8_model_dir(tmp_path_factory) -> Path:
    """A tiny bf16 Llama checkpoint whose MLP input projections are float8-sized (1040 x 64), with the
    built-in tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from craken_cli.train import builtin

    folder = tmp_path_factory.mktemp("fp8-llama")
    tok = builtin.build_tokenizer()
    cfg = builtin.model_config(tok)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads = 64, 1040, 4, 2
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.e2e
def test_fp8_training_checkpoints_resumes_and_exports_a_plain_model(craken, workdir, fp8_model_dir, free_port,
                                                                     monkeypatch):
    torchao_float8()
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(fp8, "problems", lambda *a: [])  # the CPU refusal, in this (the CLI) process only
    common = ["--precision", "fp8", "--model", fp8_model_dir, "--seq-len", "32", "--micro-batch", "4",
              "--grad-accum", "1", "--lr", "3e-3", "--save-every", "4", "--eval-every", "0", "--steps-per-print", "2",
              "--name", "f8", "--set", f"cluster.main_process_port={free_port}"]
    first = craken("train", *common, "--max-steps", "4")
    assert first.code == 0, first.output[-4000:]
    run_dir = workdir / "runs" / "f8"
    resumed = craken("train", *common, "--max-steps", "8", "--resume", "auto")
    assert resumed.code == 0, resumed.output[-4000:]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "start" and records[0]["precision"] == "fp8"
    assert (records[0]["float8_linears"], records[0]["loss_kind"]) == (4, "model")  # what ran: 2 layers x gate, up
    assert any(r.get("event") == "resume" and r["step"] == 4 for r in records)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert json.loads((run_dir / "final" / "config.json").read_text())["dtype"] == "bfloat16"  # the checkpoint's
    from safetensors import safe_open

    with safe_open(run_dir / "final" / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"BF16"}

    check = torch.load(run_dir / "final_check.pt", weights_only=True)
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.bfloat16)
    assert all(type(m) is torch.nn.Linear for n, m in final.named_modules() if n.endswith("_proj"))
    with torch.no_grad():
        logits = final(input_ids=check["input_ids"]).logits.float()
    assert (logits - check["logits"]).abs().max() <= 0.05  # the saved model is the trained one, in bf16


# ---------------------------------------------------------------------------------------------
# craken doctor


def _doctor(hw, torchao, **flags):
    from craken_cli import doctor as d
    from craken_cli.config.options import load_spec
    from test_doctor import healthy_facts

    view = d.run_view(load_spec(args(**flags), environ={}), hw)
    facts = healthy_facts(hw)
    facts.versions["torchao"] = torchao
    checks = d.run_checks(facts, view)
    return [c for c in checks if c.name == "fp8"], checks, d.exit_code(checks)


def test_doctor_reports_fp8_readiness():
    h100, a100 = detect(H100, environ={}), detect(A100, environ={})
    ready, _, _ = _doctor(h100, "0.18.0")
    assert ready[0].status == "ok" and "ready" in ready[0].detail and "torchao 0.18.0" in ready[0].detail
    missing, _, code = _doctor(h100, None)
    assert missing[0].status == "ok" and "pip install 'craken[fp8]'" in missing[0].detail and code == 0
    asked, _, code = _doctor(h100, None, precision="fp8", zero=0)
    assert asked[0].status == "fail" and asked[0].fix == "pip install 'craken[fp8]'" and code == 2
    older, _, _ = _doctor(a100, "0.18.0")
    assert older[0].status == "ok" and "not available" in older[0].detail and "8.0" in older[0].detail


def test_doctor_refuses_fp8_on_cpu_and_older_gpus_once():
    for hw in (detect(FakeProbe(gpus=[]), environ={}), detect(A100, environ={})):
        fp8_checks, checks, code = _doctor(hw, "0.18.0", precision="fp8", zero=0)
        failed = [c for c in checks if c.status == "fail"]
        assert code == 2 and len(failed) == 1 and not fp8_checks, failed
        assert "precision fp8 needs" in failed[0].detail and "--precision bf16" in failed[0].fix
