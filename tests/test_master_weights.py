"""fp32 master weights whatever dtype the checkpoint holds (issue 15).

transformers 5 loads a checkpoint in its own dtype (bf16 for almost every hub model). The no-ZeRO GPU
engine trained those bf16 weights directly, with bf16 Adam states: every update below about 1/256 of
a weight rounds away. CPU CI runs DeepSpeed (which keeps fp32 masters), so the plain engine's path
is driven here in one process: GPUs faked behind the hardware interface pick it, and it runs on the
CPU under CPU autocast, which is what Accelerate's bf16 mixed precision is on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from craken_cli.plan.hardware import GPU, FakeProbe, GiB, detect  # noqa: E402
from craken_cli.config.options import SpecArgs, load_run  # noqa: E402

LR = 1e-5
STEPS = 12


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory) -> Path:
    """The built-in tiny Llama saved in bf16 (as hub checkpoints are) with its tokenizer."""
    from transformers import AutoModelForCausalLM

    from craken_cli.train import builtin

    folder = tmp_path_factory.mktemp("bf16-ckpt")
    torch.manual_seed(0)
    tok = builtin.build_tokenizer()
    AutoModelForCausalLM.from_config(builtin.model_config(tok)).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    return folder


def _plain_spec(model_dir: Path):
    """What `craken train --model DIR --zero 0` resolves to on one (faked) H100: the plain engine."""
    hw = detect(FakeProbe(gpus=[GPU(0, "NVIDIA H100 80GB HBM3", 80 * GiB, 79 * GiB, (9, 0))]), environ={})
    resolved, _ = load_run(SpecArgs(flags={"--model": str(model_dir), "--zero": 0}), hardware=hw, environ={})
    spec = resolved.spec
    assert not spec.uses_deepspeed and not spec.cluster.use_cpu and spec.precision == "bf16"
    return spec


def _batch(vocab: int, seed: int):
    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def test_plain_engine_trains_fp32_masters_and_fp32_adam_states_from_a_bf16_checkpoint(bf16_checkpoint):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from craken_cli.train import engine, modeling

    spec = _plain_spec(bf16_checkpoint)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=spec.grad_accum)
    try:
        tok = modeling.load_tokenizer(spec)
        model = modeling.load_model(spec, tok, modeling.init_device(spec, accelerator.device))
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        plain = engine.make_engine(spec, accelerator)
        assert isinstance(plain, engine.PlainEngine)
        loader = torch.utils.data.DataLoader([_batch(model.config.vocab_size, seed) for seed in range(4)],
                                             batch_size=None)
        model, loader, _ = plain.prepare(model, loader)
        before = plain.precision_record()
        seen = []
        accelerator.unwrap_model(model).lm_head.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
        for batch in loader:
            with accelerator.accumulate(model):
                plain.backward_step(model(**batch).loss)
            if accelerator.sync_gradients:
                break
        assert seen and set(seen) == {torch.bfloat16}  # the forward did run under bf16 autocast
        after = plain.precision_record()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    fp32 = {"master_dtype": "float32", "optimizer_state_dtype": "float32", "module_dtype": "float32"}
    assert before == fp32 and after == fp32
    adam = engine.innermost_optimizer(plain.optimizer)
    states = list(adam.state.values())
    assert states and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in states)
    assert all(float(s["step"]) == 1 for s in states)  # the states made at set-up did not count a step
    assert plain.grad_norm() is not None and torch.isfinite(plain.grad_norm())
    # final/ keeps the checkpoint's own dtype
    assert modeling.saved_dtype(spec) == torch.bfloat16


def test_materialized_adam_states_change_no_weight_and_leave_the_first_step_unchanged():
    """The states are created at set-up (the start line shows their dtype); the first real step must
    be the one a fresh optimizer takes."""
    from craken_cli.train import engine

    torch.manual_seed(0)
    weights = torch.randn(8, 8)
    grad = torch.randn(8, 8)
    fresh, early = weights.clone().requires_grad_(), weights.clone().requires_grad_()
    opt_fresh = torch.optim.AdamW([fresh], lr=1e-2, weight_decay=0.1, fused=True)
    opt_early = torch.optim.AdamW([early], lr=1e-2, weight_decay=0.1, fused=True)
    engine.materialize_states(opt_early)
    assert torch.equal(early.detach(), weights) and early.grad is None
    assert opt_early.state[early]["exp_avg"].dtype == torch.float32
    for param, opt in ((fresh, opt_fresh), (early, opt_early)):
        param.grad = grad.clone()
        opt.step()
    assert torch.equal(fresh.detach(), early.detach())
    assert torch.equal(opt_fresh.state[fresh]["exp_avg_sq"], opt_early.state[early]["exp_avg_sq"])


def _changed_share(model, initial: dict) -> float:
    """The share of weight entries whose value is no longer the checkpoint's."""
    changed = total = 0
    for name, param in model.named_parameters():
        changed += int((param.detach().float() != initial[name]).sum())
        total += param.numel()
    return changed / total


def _fine_tune(model, optimizer, autocast: bool) -> None:
    for step in range(STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**_batch(model.config.vocab_size, step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_pure_bf16_loses_most_small_updates_that_fp32_masters_keep(bf16_checkpoint):
    """Fine-tuning at lr 1e-5 from a bf16 checkpoint: Adam moves each weight by about lr per step,
    below half a bf16 step of a weight of typical size (0.02 -> 6e-5), so pure bf16 weights stay
    where they were, while fp32 masters take every update."""
    from transformers import AutoModelForCausalLM

    from craken_cli.train import engine, modeling

    spec = _plain_spec(bf16_checkpoint).model_copy(deep=True)
    spec.optimizer.lr = LR
    tok = modeling.load_tokenizer(spec)

    pure = AutoModelForCausalLM.from_pretrained(bf16_checkpoint)  # what the engine trained before
    assert {p.dtype for p in pure.parameters()} == {torch.bfloat16}
    initial = {name: p.detach().float().clone() for name, p in pure.named_parameters()}
    _fine_tune(pure, torch.optim.AdamW(pure.parameters(), lr=LR, weight_decay=0.0, fused=True), autocast=False)

    masters = modeling.load_model(spec, tok)
    _fine_tune(masters, engine.plain_optimizer(spec, [{"params": list(masters.parameters()), "weight_decay": 0.0}]),
               autocast=True)

    pure_share, master_share = _changed_share(pure, initial), _changed_share(masters, initial)
    assert master_share > 0.95, master_share
    assert pure_share < 0.25, pure_share  # most updates rounded away
    # and what a bf16 save of the masters keeps (final/ in the checkpoint's dtype) still moved
    saved = masters.to(torch.bfloat16)
    assert _changed_share(saved, initial) > 2 * pure_share
