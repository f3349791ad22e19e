"""The planner: model states agree with DeepSpeed's own estimators, the whole peak agrees with the
GPU baseline, and the choice is the fastest strategy that fits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from craken_cli.plan.hardware import GPU, GiB, Hardware
from craken_cli.plan.modelinfo import analytic_info
from craken_cli.plan import memory as planner
from craken_cli.plan.memory import Candidate, Shape, estimate, model_state_bytes, plan
from craken_cli.config.spec import RunSpec

CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "model_configs"

# gpu-baseline.md's model: 1.10 B Llama, hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632.
TINYLLAMA = analytic_info({"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 22,
                           "num_attention_heads": 32, "num_key_value_heads": 4, "intermediate_size": 5632,
                           "vocab_size": 32000}, "1.1B")
LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}
LLAMA_13B = {**LLAMA_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
             "num_attention_heads": 40, "num_key_value_heads": 40}
LLAMA_70B = {**LLAMA_7B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
             "num_attention_heads": 64, "num_key_value_heads": 8}


def hardware(gpus: int, gib: float = 80, ram_gib: float = 1024) -> Hardware:
    mem = int(gib * GiB)
    return Hardware(gpus=tuple(GPU(i, "test", mem, mem, (9, 0)) for i in range(gpus)), ram_total=int(ram_gib * GiB))


def spec(world: int, *, seq=2048, micro=4, global_batch=None, grad_accum=None, precision="bf16", **model) -> RunSpec:
    return RunSpec.model_validate({
        "precision": precision, "data": {"seq_len": seq}, "model": model,
        "batch": {"micro_batch": micro, "global_batch": global_batch, "grad_accum": grad_accum},
        "cluster": {"num_processes": world}, "zero": {"stage": 0}})


# ---------------------------------------------------------------------------------------------
# model states against DeepSpeed's estimators (the same functions `deepspeed` prints)


@pytest.mark.parametrize("params", [125_000_000, 1_100_048_384, 6_738_415_616, 68_976_648_192])
@pytest.mark.parametrize("gpus,nodes", [(1, 1), (2, 1), (8, 1), (8, 4)])
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_model_states_match_deepspeed(params, gpus, nodes, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, ds_gpu = estimate_zero2_model_states_mem_needs(params, gpus, nodes, cpu_offload=offload)
    ours = sum(model_state_bytes(params, 2, gpus * nodes, offload_optimizer=offload))
    assert ours == pytest.approx(ds_gpu, rel=0.01)


@pytest.mark.parametrize("params,largest", [(1_100_048_384, 65_536_000), (6_738_415_616, 131_072_000),
                                            (68_976_648_192, 262_144_000)])
@pytest.mark.parametrize("gpus,nodes", [(1, 1), (2, 1), (8, 1), (8, 4)])
@pytest.mark.parametrize("offload_opt,offload_param", [(False, False), (True, False), (True, True)])
def test_zero3_model_states_match_deepspeed(params, largest, gpus, nodes, offload_opt, offload_param):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(params, largest, gpus, nodes, cpu_offload=offload_opt,
                                                         cpu_offload_params=offload_param)
    ours = sum(model_state_bytes(params, 3, gpus * nodes, offload_optimizer=offload_opt,
                                 offload_param=offload_param, largest_layer=largest))
    assert ours == pytest.approx(ds_gpu, rel=0.01)


def test_all_cold_printers_agree_with_what_we_compare(capsys):
    # The *_all_cold functions print the same numbers the tests above compare against.
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    estimate_zero2_model_states_mem_needs_all_cold(TINYLLAMA.num_params, num_gpus_per_node=2)
    estimate_zero3_model_states_mem_needs_all_cold(TINYLLAMA.num_params, TINYLLAMA.largest_layer_params,
                                                   num_gpus_per_node=2)
    printed = capsys.readouterr().out
    z2 = sum(model_state_bytes(TINYLLAMA.num_params, 2, 2)) / GiB
    z3 = sum(model_state_bytes(TINYLLAMA.num_params, 3, 2, largest_layer=TINYLLAMA.largest_layer_params)) / GiB
    assert f"{z2:.2f}GB" in printed and f"{z3:.2f}GB" in printed


def test_stage1_keeps_full_16bit_grads_only_when_accumulating():
    P = 1_000_000_000
    one = model_state_bytes(P, 1, 8, grad_accum=1)
    many = model_state_bytes(P, 1, 8, grad_accum=4)
    assert one == model_state_bytes(P, 2, 8)
    assert many[1] - one[1] == pytest.approx(2 * P - 2 * P / 8)


def test_fp32_accumulation_keeps_fp32_gradients_of_the_whole_model():
    """ZeRO-1 through DeepSpeed's BF16 optimizer (zero.fp32_grad_accum): on by default with one process."""
    P = TINYLLAMA.num_params

    def zero1(world, **zero):
        s = spec(world, micro=4, grad_accum=1).model_copy(deep=True)
        s.zero = s.zero.model_copy(update=zero)
        return next(x for x in plan(TINYLLAMA, s, hardware(world, 141), search_micro_batch=False).strategies
                    if x.name == "zero1")

    one, two = zero1(1), zero1(2)
    # fp32 gradients beside the 16-bit ones, and the engine's flat fp32 copy for the all-reduce
    assert one.grads_gib == pytest.approx(6 * P / GiB) and one.optimizer_gib == pytest.approx(12 * P / GiB)
    assert "step_flat_grad_copy" not in one.detail and one.detail["allreduce_flat_copy"] == pytest.approx(4 * P / GiB)
    assert two.grads_gib == pytest.approx((2 + 4) * P / 2 / GiB)  # the ZeRO optimizer's 16-bit partition
    assert zero1(2, fp32_grad_accum=True).grads_gib == pytest.approx(6 * P / GiB)
    assert zero1(1, fp32_grad_accum=False).grads_gib == pytest.approx((2 + 4) * P / GiB)
    # the two optimizers' model states differ by the fp32 gradients less the partitioned 16-bit + fp32 ones
    assert sum(model_state_bytes(P, 1, 8, fp32_grads=True)) - sum(model_state_bytes(P, 1, 8)) == pytest.approx(
        6 * P - (2 * P / 8 + 4 * P / 8))


# ---------------------------------------------------------------------------------------------
# the whole peak against gpu-baseline.md (peak reserved GiB, H200, seq 2048, micro-batch 4)

# The hand-written ZeRO-1/2 rows of gpu-baseline.md (44.74 GiB on 1 GPU, 34.43 on 2) are left out:
# they hand DeepSpeed torch's foreach AdamW, whose step temporaries craken's runs do not have;
# craken's own ZeRO-1/2 runs are checked against the recorded benchmark rows below.
BASELINE = [  # (gpus, stage, optimizer offload, measured peak reserved GiB)
    (1, 3, "none", 43.51), (1, 2, "cpu", 22.77), (2, 3, "none", 38.55),
]


@pytest.mark.parametrize("gpus,stage,offload,measured", BASELINE)
def test_prediction_within_10_percent_of_gpu_baseline(gpus, stage, offload, measured):
    shape = Shape(gpus, gpus, 2048, 2, False, 500_000_000, True, 500_000_000, 141 * GiB, None, None)
    predicted = estimate(TINYLLAMA, Candidate(stage, offload), 4, 1, shape).reserved_gib
    assert predicted == pytest.approx(measured, rel=0.10)


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def load_bench():
    import importlib.util

    loader = importlib.util.spec_from_file_location("planner_bench", RESULTS.parent / "planner_bench.py")
    bench = importlib.util.module_from_spec(loader)
    sys.modules["planner_bench"] = bench  # its dataclasses look their module up
    loader.loader.exec_module(bench)
    return bench


def test_every_recorded_benchmark_row_is_predicted_within_10_percent(tmp_path):
    """craken's own runs measured on GPUs (benchmarks/results/*.jsonl: planner_bench.py rows, `craken train`
    runs of gpu_bench.py and fp8_bench.py, lower bounds of out-of-memory runs), training and held-out alike,
    each with the loss it trained (`ran.loss_kind`: the chunked one or the model's), re-predicted by the
    current planner through the spec path `craken train` takes (planner_bench.spec_for). An out-of-memory
    row must be predicted at least at its lower bound."""
    bench = load_bench()
    rows = bench.recorded_rows()
    measured = [r for r in rows if "measured_gib" in r]
    assert len(measured) >= 20 and {r["base_strategy"] for r in measured} == {"zero0", "zero1", "zero2", "zero3"}
    assert any(r["compiled"] for r in measured) and any(r.get("split") == "held-out" for r in measured)
    kinds = {(r["model"], r.get("ran", {}).get("loss_kind")) for r in measured}
    assert {("qwen2.5-0.5b", "chunked"), ("qwen2.5-0.5b", "model"), ("llama-3.2-1b", "chunked")} <= kinds
    pairs = bench.prepared(rows, tmp_path, bench.hypothetical_hardware(rows))
    errors = [((r["model"], r["seq"], r["strategy"], r["micro_batch"], r["device"]), round(e, 3))
              for r, e in bench.errors(pairs)]
    assert len(errors) == len([r for r in rows if "measured_gib" in r or "measured_at_least_gib" in r])
    off = {(r["model"], r["seq"], r["strategy"], r["micro_batch"]): (round(e, 3), r.get("split", "train"))
           for r, e in bench.errors(pairs) if abs(e) > 0.10}
    assert off.keys() == HELD_OUT_MISSES.keys() and {split for _, split in off.values()} <= {"held-out"}, off


# Held-out rows outside +-10% of the current planner (never fitted on), each with what is known about it:
# a row that comes within +-10%, or another that leaves it, fails the test above until this list and
# docs/planner.md say so.
HELD_OUT_MISSES: dict = {
    # Mistral-7B at micro-batch 4 (+11.8% until the plain engine's gradients got their own peak,
    # docs/planner.md "Gradients at the backward's end") is within +-10% now; none is outside.
}


def test_superseded_rows_are_kept_with_their_reason_and_not_repredicted(tmp_path):
    """Rows of a program craken no longer runs are kept in the results, marked with the reason, and not
    re-predicted (`planner_bench.py --supersede`): the two pure-bf16 no-ZeRO runs among them."""
    bench = load_bench()
    every = [json.loads(x) for f in sorted(RESULTS.glob("*.jsonl")) for x in f.read_text().splitlines() if x.strip()]
    old = [r for r in every if r.get("superseded")]
    pure = [(r["strategy"], r["micro_batch"]) for r in old if "pure bf16" in r["superseded"]]
    assert ("zero0+compile", 8) in pure and ("zero0+compile", 16) in pure
    assert all(isinstance(r["superseded"], str) and len(r["superseded"].split()) >= 6 for r in old)
    assert len(bench.recorded_rows()) == len(every) - len(old)
    copy = tmp_path / "rows.jsonl"
    live = bench.recorded_rows()[:3]
    copy.write_text("".join(json.dumps(r) + "\n" for r in live))
    key = f"{live[1]['model']}:{live[1]['seq']}:{live[1]['micro_batch']}:{live[1].get('measured_on', '')}"
    before = len(bench.recorded_rows([copy]))
    marked = bench.supersede([key], "measured through a program craken no longer runs", [copy])
    assert before == 3 and marked >= 1 and len(bench.recorded_rows([copy])) == before - marked


def test_peak_is_far_above_the_16_bytes_per_parameter_count():
    s = plan(TINYLLAMA, spec(1), hardware(1, 141), search_micro_batch=False)
    z2 = next(x for x in s.strategies if x.name == "zero2")
    assert 16 * TINYLLAMA.num_params / GiB == pytest.approx(16.4, abs=0.05)
    assert z2.total_gib > 2.2 * 16.4  # activations and logits dominate at this size (measured 38.89 GiB)
    assert z2.activations_gib > 16.4  # more than all model states of the ZeRO paper's count


def test_plain_engine_gradients_replace_the_freed_activations_only_with_grown_segments_and_no_accumulation():
    """At 7B on one GPU the no-ZeRO peak is the backward's end (every fp32 gradient), not gradients plus
    activations: measured 131.7 GiB at micro-batch 8 where the sum says 145.8 (docs/planner.md, "The
    gradient grid of 2026-12-04"). Accumulation and fixed allocator segments keep the sum."""
    from dataclasses import replace

    info = analytic_info(json.loads((CONFIGS / "mistral-7b.json").read_text()), "mistral-7b")
    shape = Shape(world=1, gpus_per_machine=1, seq_len=1024, lp=2, compiled=True, reduce_bucket=500_000_000,
                  overlap_comm=True, prefetch_bucket=50_000_000, gpu_memory=139.8 * GiB, cpu_memory=None,
                  nvme_free=None)
    zero0 = Candidate(0, "none", "none", False)
    grown, fixed = estimate(info, zero0, 8, 1, shape), estimate(info, zero0, 8, 1, replace(shape, grown_segments=False))
    held = estimate(info, zero0, 8, 2, shape)
    replaced = -grown.detail["gradients_replace_freed_activations"]
    assert replaced == pytest.approx(grown.grads_gib)  # the start (activations + copies) is the larger here
    assert grown.reserved_gib == pytest.approx(131.72, rel=0.03)  # measured, one H200
    assert fixed.reserved_gib == pytest.approx(grown.reserved_gib + replaced)
    assert "gradients_replace_freed_activations" not in held.detail and held.reserved_gib == pytest.approx(fixed.reserved_gib)
    small = estimate(info, zero0, 1, 1, shape)  # the end is the larger: gradients, no activations left
    assert small.reserved_gib == pytest.approx(small.params_gib + small.grads_gib + small.optimizer_gib, rel=0.01)


def test_detect_reads_whether_the_workers_allocator_grows_segments():
    from craken_cli.launch.command import grows_segments
    from craken_cli.plan.hardware import FakeProbe, detect

    assert grows_segments({}) and grows_segments({"PYTORCH_ALLOC_CONF": "expandable_segments:True"})
    assert not grows_segments({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"})
    assert not grows_segments({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"})
    # torch reads PYTORCH_ALLOC_CONF first (before: either variable's True counted), and the last mention wins
    assert not grows_segments({"PYTORCH_ALLOC_CONF": "expandable_segments:False",
                               "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    assert not grows_segments({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True,expandable_segments:False"})
    assert grows_segments({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128, expandable_segments:True"})
    assert detect(FakeProbe(), environ={}).grown_segments
    assert not detect(FakeProbe(), environ={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}).grown_segments


# ---------------------------------------------------------------------------------------------
# activations


def test_checkpointing_and_compile_reduce_activations_and_scale_with_tokens():
    from craken_cli.plan.memory import activation_bytes

    full, logits = activation_bytes(TINYLLAMA, 4, 2048, 2, checkpointing=False)
    ckpt, logits2 = activation_bytes(TINYLLAMA, 4, 2048, 2, checkpointing=True)
    compiled, compiled_logits = activation_bytes(TINYLLAMA, 4, 2048, 2, checkpointing=False, compiled=True)
    double, _ = activation_bytes(TINYLLAMA, 8, 2048, 2, checkpointing=False)
    assert ckpt < full / 5 and logits == logits2  # the loss is not checkpointed
    assert 0.4 * full < compiled < 0.65 * full  # inductor recomputes the pointwise ops (see planner)
    assert compiled_logits == (2 + planner.COMPILED_LOSS_FP32_BYTES) * 4 * 2048 * 32000
    assert double == pytest.approx(2 * full)
    assert logits == (2 + planner.UPCAST_LOSS_FP32_BYTES) * 4 * 2048 * 32000  # 16-bit logits + the fp32 upcast's buffers


def test_large_vocabularies_tied_embeddings_and_softcap_in_the_loss_term():
    """The loss term scales with the vocabulary (Qwen's 151,936 against Llama 2's 32,000), Gemma-2's
    soft-capped logits hold one more 16-bit tensor (tanh's output), and the chunked loss (train/loss.py) holds one chunk."""
    from craken_cli.plan.memory import chunked_loss_bytes, loss_bytes

    qwen = analytic_info(json.loads((CONFIGS / "qwen2.5-0.5b.json").read_text()))
    gemma = analytic_info(json.loads((CONFIGS / "gemma-2-2b.json").read_text()))
    tokens = 32 * 2048
    eager = 2 + planner.UPCAST_LOSS_FP32_BYTES
    assert qwen.tied_embeddings and loss_bytes(qwen, tokens, 2) == eager * tokens * 151_936
    assert loss_bytes(qwen, tokens, 2) / GiB > 37.09  # more than one fp32 copy of the logits
    assert gemma.logit_softcap and loss_bytes(gemma, tokens, 2) == (eager + 2) * tokens * 256_000  # + tanh's output
    chunked = loss_bytes(qwen, tokens, 2, loss="chunked")
    assert chunked == chunked_loss_bytes(qwen, tokens, 2, False) and chunked < loss_bytes(qwen, tokens, 2) / 10


def test_gqa_saves_less_than_full_attention():
    from craken_cli.plan.memory import layer_activation_bytes_per_token

    mha = analytic_info({**LLAMA_7B})
    gqa = analytic_info({**LLAMA_7B, "num_key_value_heads": 8})
    assert layer_activation_bytes_per_token(mha, 2) - layer_activation_bytes_per_token(gqa, 2) == 2 * 2 * (4096 - 1024)


# ---------------------------------------------------------------------------------------------
# the choice


def test_one_gpu_that_fits_picks_no_zero():
    p = plan(TINYLLAMA, spec(1, micro=4, grad_accum=1), hardware(1, 141), search_micro_batch=False)
    assert p.choice.name == "zero0" and p.choice.stage == 0 and p.rejected == []


def test_choice_is_never_slower_than_a_strategy_that_fits():
    for world, gib in [(1, 80), (1, 24), (2, 80), (8, 80), (8, 40)]:
        for cfg in (LLAMA_7B, LLAMA_13B):
            p = plan(analytic_info(cfg), spec(world, seq=4096, micro=1, global_batch=64 if world < 8 else 128),
                     hardware(world, gib))
            fitting = [s for s in p.strategies if s.fits]
            if p.choice is None:
                assert not fitting
                continue
            assert all(s.speed <= p.choice.speed for s in fitting)
            assert len(p.rejected) == p.strategies.index(p.choice)
            assert all("needs" in r for r in p.rejected)


@pytest.mark.parametrize("gpus", [1, 2])
def test_order_is_no_zero_then_zero1_zero2_then_zero3_then_offload(gpus):
    # the one- and several-GPU speed tables are separate constants: each must keep the order
    p = plan(TINYLLAMA, spec(gpus), hardware(gpus))
    names = [s.name for s in p.strategies]
    assert names.index("zero0") < names.index("zero1") < names.index("zero2") < names.index("zero3")
    offloaded = [i for i, n in enumerate(names) if "offload" in n]
    assert offloaded and names.index("zero3") < min(offloaded)
    assert names.index("zero3+offload_optimizer_cpu") < names.index("zero3+offload_optimizer_cpu+offload_param_cpu")


def test_largest_micro_batch_that_fits_and_accumulation_reaching_the_global_batch():
    p = plan(analytic_info(LLAMA_7B), spec(8, seq=4096, micro=1, global_batch=256), hardware(8, 80))
    c = p.choice
    assert c.micro_batch * c.grad_accum * 8 == 256
    # one micro-batch more (the next divisor of 32) would not fit under the same strategy
    bigger = [m for m in range(c.micro_batch + 1, 33) if 32 % m == 0]
    if bigger:
        shape_plan = plan(analytic_info(LLAMA_7B), spec(8, seq=4096, micro=bigger[0], global_batch=256),
                          hardware(8, 80), search_micro_batch=False)
        same = next(s for s in shape_plan.strategies if s.name == c.name)
        assert not same.fits


def test_70b_on_8x80_needs_zero3_and_offload():
    p = plan(analytic_info(LLAMA_70B), spec(8, seq=4096, micro=1, global_batch=64), hardware(8, 80, 2048))
    assert p.choice is not None and p.choice.stage == 3 and p.choice.offload_optimizer == "cpu"
    assert p.choice.cpu_memory_gib > 8 * 16 * 69e9 / 8 / GiB  # fp32 states of 69 B params on the host


def test_nvme_strategies_hold_the_swap_buffers_deepspeed_extra_sets_in_ram():
    info = analytic_info(LLAMA_7B)
    nvme = {"device": "nvme", "nvme_path": "/nvme"}

    def cpu_gib(extra: dict) -> float:
        s = RunSpec.model_validate({"data": {"seq_len": 2048}, "batch": {"micro_batch": 1, "global_batch": 64},
                                    "cluster": {"num_processes": 8}, "zero": {"stage": 3},
                                    "offload": {"optimizer": nvme, "param": nvme}, "deepspeed": {"extra": extra}})
        return next(r for r in plan(info, s, hardware(8)).strategies
                    if r.name == "zero3+offload_optimizer_nvme+offload_param_nvme").cpu_memory_gib

    more = cpu_gib({"zero_optimization": {"offload_param": {"buffer_count": 15}}})
    # ten buffers more than DeepSpeed's 5 on each of the 8 processes, of buffer_size 1e8 bf16 elements
    # padded to the aio alignment (1024 bytes: 512 elements)
    assert (more - cpu_gib({})) * GiB == pytest.approx(8 * 10 * (-(-100_000_000 // 512) * 512) * 2)


def test_cpu_ram_limits_offload():
    p = plan(analytic_info(LLAMA_70B), spec(8, seq=4096, micro=1, global_batch=64), hardware(8, 80, 256))
    offloaded = [s for s in p.strategies if s.offload_optimizer == "cpu"]
    assert offloaded and all(not s.fits and "CPU RAM" in s.why_not for s in offloaded if s.total_gib < 72)


def test_nothing_fits_gives_no_choice():
    p = plan(analytic_info(LLAMA_70B), spec(1, seq=4096, micro=1, global_batch=1), hardware(1, 24, 64))
    assert p.choice is None and p.settings() is None and all(not s.fits for s in p.strategies)


# ---------------------------------------------------------------------------------------------
# the command


def write_configs(root):
    paths = {}
    for name, cfg in (("7b", LLAMA_7B), ("13b", LLAMA_13B), ("70b", LLAMA_70B)):
        folder = root / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(cfg))
        paths[name] = folder
    return paths


def craken(*args, env=None):
    return subprocess.run([sys.executable, "-m", "craken_cli", *args], capture_output=True, text=True, env=env)


def test_plan_json_fields(tmp_path):
    paths = write_configs(tmp_path)
    r = craken("plan", "--gpus", "8", "--gpu-memory", "80GiB", "--model", str(paths["7b"]), "--seq-len", "4096",
               "--global-batch", "64", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"strategies", "choice"}
    fields = {"name", "stage", "offload_optimizer", "offload_param", "activation_checkpointing", "micro_batch",
              "params_gib", "grads_gib", "optimizer_gib", "activations_gib", "other_gib", "total_gib",
              "cpu_memory_gib", "fits"}
    assert all(fields <= set(s) for s in out["strategies"])
    assert len(out["strategies"]) == 16 and out["world_size"] == 8
    c = out["choice"]
    assert c["fits"] and c["micro_batch"] * c["grad_accum"] * 8 == 64
    assert c["rejected"][0].startswith("zero0: needs")  # no ZeRO does not fit a 7B on 80 GiB
    fitting = [s for s in out["strategies"] if s["fits"]]
    fastest = max(s["speed"] for s in fitting)  # ZeRO-1 and ZeRO-2 tie on 8 GPUs: the larger micro-batch wins
    assert c["speed"] == fastest and c["micro_batch"] == max(s["micro_batch"] for s in fitting if s["speed"] == fastest)
    assert c["name"] in ("zero1", "zero2")
    for s in out["strategies"]:
        parts = s["params_gib"] + s["grads_gib"] + s["optimizer_gib"] + s["activations_gib"] + s["other_gib"]
        assert parts == pytest.approx(s["total_gib"], abs=0.01)


def test_plan_table_and_no_gpu_error(tmp_path):
    paths = write_configs(tmp_path)
    r = craken("plan", "--gpus", "1", "--gpu-memory", "24GiB", "--model", str(paths["7b"]))
    assert r.returncode == 0, r.stderr
    assert "choice:" in r.stdout and "zero0" in r.stdout and "not zero0: needs" in r.stdout
    r = craken("plan", "--gpus", "1", "--gpu-memory", "lots")
    assert r.returncode == 2 and "is not a size" in r.stderr


def test_plan_7b_13b_70b_on_8x80_is_torch_free(tmp_path):
    paths = write_configs(tmp_path)
    code = ("import sys, runpy; sys.argv = ['craken'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('craken_cli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n")
    for name in ("7b", "13b", "70b"):
        args = ["plan", "--gpus", "8", "--gpu-memory", "80GiB", "--model", str(paths[name]), "--seq-len", "4096",
                "--global-batch", "64", "--json"]
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["model"]["counted_by"] == "analytic"
        # Its speed is measured by benchmarks (docs/planner.md), not asserted here.


def test_plan_assumes_compilation_as_auto_does_unless_told_otherwise(tmp_path):
    """`craken plan` shows the choice `craken train --auto` makes, which compiles Llama-family models."""
    folder = tmp_path / "llama-1.1b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32,
        "num_key_value_heads": 4, "intermediate_size": 5632, "vocab_size": 32000, "tie_word_embeddings": False}))
    args = ["plan", "--gpus", "1", "--gpu-memory", "80GiB", "--model", str(folder), "--seq-len", "2048",
            "--global-batch", "16", "--json"]
    compiled, eager = (json.loads(craken(*args, *extra).stdout) for extra in ((), ("--no-compile",)))
    assert compiled["compiled"] and not eager["compiled"]
    assert (compiled["choice"]["name"], compiled["choice"]["micro_batch"]) == ("zero0", 16)
    assert (eager["choice"]["name"], eager["choice"]["micro_batch"]) == ("zero0", 8)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
                                                  "vocab_size": 50257, "n_positions": 1024}))
    out = json.loads(craken("plan", "--gpus", "1", "--gpu-memory", "80GiB", "--model", str(gpt2), "--seq-len",
                            "1024", "--json").stdout)
    assert out["compiled"] is False  # compile_regions finds no `model.layers` in GPT-2: it would run eagerly


def test_plan_shows_eager_when_the_choice_was_never_run_compiled(tmp_path):
    paths = write_configs(tmp_path)
    seven_b = ["plan", "--model", str(paths["7b"]), "--seq-len", "4096", "--json"]
    on_eight = json.loads(craken(*seven_b, "--gpus", "8", "--gpu-memory", "80GiB", "--global-batch", "64").stdout)
    assert on_eight["compiled"] and on_eight["choice"]["stage"] in (0, 1, 2)
    on_one = json.loads(craken(*seven_b, "--gpus", "1", "--gpu-memory", "24GiB").stdout)
    assert on_one["choice"]["offload_optimizer"] != "none" and on_one["compiled"] is False


def test_what_ran_out_of_memory_is_planned_again_only_smaller():
    """The OOM fallback: a strategy that ran out of memory keeps its place in the speed order, at a
    smaller micro-batch; at micro-batch 1 it is out."""
    s = spec(1, micro=4, global_batch=16)
    first = plan(TINYLLAMA, s, hardware(1, 80)).choice
    again = plan(TINYLLAMA, s, hardware(1, 80), out_of_memory_at={first.name: first.micro_batch}).choice
    assert again.name == first.name and again.micro_batch < first.micro_batch
    assert again.micro_batch * again.grad_accum == 16
    out = plan(TINYLLAMA, s, hardware(1, 80), out_of_memory_at={first.name: 1})
    assert out.choice.name != first.name
    assert f"{first.name}: ran out of GPU memory at micro-batch 1" in out.rejected


def test_plan_names_the_smallest_changes_when_nothing_fits(tmp_path):
    paths = write_configs(tmp_path)
    args = ["plan", "--gpus", "1", "--gpu-memory", "139.8GiB", "--cpu-memory", "128GiB", "--model", str(paths["13b"]),
            "--seq-len", "2048", "--global-batch", "16"]
    r = craken(*args)
    assert r.returncode == 0, r.stderr
    assert "nothing fits; any one of these would:" in r.stdout and "2 GPUs of 140 GiB: --num-processes 2" in r.stdout
    out = json.loads(craken(*args, "--json").stdout)
    assert out["choice"] is None and any("CPU RAM" in c for c in out["smallest_changes"])


def test_the_fit_never_sees_held_out_rows(tmp_path, monkeypatch):
    """planner_bench --fit: a held-out row, however far off, moves no constant; the same row declared
    for training does. The grid declares its split before anything runs, the issue's row held out first."""
    bench = load_bench()
    assert {row.split for row in bench.GRID} == {"train", "held-out"}
    first = bench.GRID[0]
    assert (first.model, first.seq, first.strategy, first.split) == ("qwen2.5-0.5b", 2048, "auto", "held-out")
    for name in bench.FITTED:  # the fit sets the planner's module constants: restore them after
        monkeypatch.setattr(planner, name, getattr(planner, name))
    rows = [r for r in bench.recorded_rows() if r["model"] == "llama-1.1b"]
    far_off = {**rows[0], "measured_gib": rows[0]["measured_gib"] * 3, "split": "held-out"}
    hw, start = bench.hypothetical_hardware(rows), {name: bench.current(name) for name in bench.FITTED}

    def fitted(extra):
        return bench.fit(bench.training(bench.prepared([*rows, *extra], tmp_path, hw)), rounds=1, start=start)

    alone = fitted([])
    assert fitted([far_off]) == alone
    assert fitted([{**far_off, "split": "train"}]) != alone


@pytest.mark.e2e
def test_planner_bench_measures_rows_through_craken_trains_own_code(tmp_path, free_port):
    """planner_bench's rows train through the code `craken train` runs (modeling.ready_for_training,
    the engine's prepare, Trainer.micro_step, the Accelerator the rendered accelerate.yaml gives), so each
    row records the loss that ran: the smoke grid's (CPU, DeepSpeed on gloo) forced chunked row ran the
    chunked loss, the other the model's own. Nothing is measured on CPU."""
    import os

    out = tmp_path / "out"
    env = {**os.environ, "PLANNER_BENCH_SMOKE": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": str(RESULTS.parents[1] / "src")}
    proc = subprocess.run([sys.executable, str(RESULTS.parent / "planner_bench.py"), "--out", str(out), "--models",
                           str(tmp_path / "models"), "--budget", "240", "--port", str(free_port)],
                          capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(x) for x in (out / "planner_bench.jsonl").read_text().splitlines()]
    assert [(r["strategy"], r["extra"], r["ran"]["loss_kind"]) for r in rows] == [
        ("zero0", [], "model"), ("zero2", ["model.loss=chunked"], "chunked")], (out / "worker.log").read_text()[-3000:]
    assert all(r["tokens_per_s"] > 0 and "measured_gib" not in r for r in rows)


def test_fit_apply_writes_the_fitted_constants_into_a_planner_file(tmp_path):
    """planner_bench --fit --apply: the fitted values replace plan/memory.py's `NAME = value` lines, comments kept."""
    bench = load_bench()
    target = tmp_path / "planner.py"
    target.write_text((RESULTS.parents[1] / "src" / "craken_cli" / "plan" / "memory.py").read_text())
    same = {name: bench.current(name) for name in bench.FITTED}
    assert bench.apply_constants(same, target) == []
    changed = bench.apply_constants({**same, "COMPILED_LOSS_FP32_BYTES": 6, "FRAGMENTATION": 0.04}, target)
    assert [c.split(":")[0] for c in changed] == ["FRAGMENTATION", "COMPILED_LOSS_FP32_BYTES"]
    text = target.read_text()
    assert "\nCOMPILED_LOSS_FP32_BYTES = 6\n" in text and "\nFRAGMENTATION = {0: 0.04, 1: 0.04, 2: 0.04, 3: 0.04}\n" in text


def test_craken_plan_says_why_other_is_negative_only_where_gradients_take_the_freed_blocks(craken, workdir, monkeypatch):
    """The note under the table follows the planner's term: grown segments and accumulation 1 only."""
    note = "zero0 rows: the gradients are made in the blocks the backward frees"
    result = craken("plan", "--gpus", "1", "--gpu-memory", "80GiB", "--grad-accum", "1")
    assert result.code == 0 and note in result.out, result.output
    assert note not in craken("plan", "--gpus", "1", "--gpu-memory", "80GiB", "--grad-accum", "2").out
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    assert note not in craken("plan", "--gpus", "1", "--gpu-memory", "80GiB", "--grad-accum", "1").out


def test_gradients_in_freed_blocks_only_where_measured_on_one_gpu():
    """The term was measured on one GPU; with DDP on several the planner keeps the sum (the safe side)."""
    info = analytic_info(json.loads((CONFIGS / "mistral-7b.json").read_text()), "mistral-7b")
    shape = Shape(world=2, gpus_per_machine=2, seq_len=1024, lp=2, compiled=True, reduce_bucket=500_000_000,
                  overlap_comm=True, prefetch_bucket=50_000_000, gpu_memory=139.8 * GiB, cpu_memory=None,
                  nvme_free=None)
    assert planner.GRADIENTS_IN_FREED_BLOCKS not in estimate(info, Candidate(0, "none", "none", False), 4, 1,
                                                             shape).detail
