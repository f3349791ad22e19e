"""Under --auto, a run whose processes run out of GPU memory is relaunched with the next strategy in
speed order. The GPU is faked behind the NVML probe and the out-of-memory is faked by the launch
step (this machine has neither); planning, rendering and the relaunch decision are the real ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from craken_cli.plan import datasize, hardware
from craken_cli.launch import command as launch
from craken_cli.errors import CrakenError
from craken_cli.config.options import SpecArgs
from craken_cli.launch.process import execute
from craken_cli.launch.prepare import TrainRequest, prepare

GiB = 2**30


@pytest.fixture
def one_h100(monkeypatch):
    gpu = hardware.GPU(0, "NVIDIA H100 80GB HBM3", 80 * GiB, 79 * GiB, (9, 0))
    monkeypatch.setattr(hardware, "NvmlProbe", lambda: hardware.FakeProbe(gpus=[gpu]))
    # an H100 machine's RAM, not this one's: --auto refuses offload the RAM cannot hold
    monkeypatch.setattr(hardware, "_meminfo", lambda: (512 * GiB, 500 * GiB))


@pytest.fixture
def llama_1b(tmp_path) -> Path:
    folder = tmp_path / "llama-1.1b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "intermediate_size": 5632, "vocab_size": 32000,
        "max_position_embeddings": 4096, "tie_word_embeddings": False}))
    return folder


def rendered(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "run.yaml").read_text())


def strategy(run_dir: Path) -> tuple:
    spec = rendered(run_dir)
    return (spec["zero"]["stage"], spec["offload"]["optimizer"]["device"], spec["offload"]["param"]["device"],
            spec["model"]["activation_checkpointing"], spec["batch"]["micro_batch"])


def request(model: Path, **kw) -> TrainRequest:
    args = SpecArgs(flags={"--model": str(model), "--tokenizer": "builtin:tiny", "--seq-len": 2048,
                           "--global-batch": 16, "--name": "oom"})
    return TrainRequest(spec_args=args, auto=True, **kw)


def test_out_of_memory_relaunches_with_the_next_fastest_setting(tmp_path, monkeypatch, one_h100, llama_1b, capsys):
    monkeypatch.chdir(tmp_path)
    launched = []

    def fake_run(argv, env, keep_fds=()):
        run_dir = tmp_path / "runs" / "oom"
        launched.append(strategy(run_dir))
        if len(launched) == 1:  # the first strategy runs out of memory at step 1 on rank 0
            (run_dir / "oom-rank0.json").write_text(json.dumps({"step": 1, "rank": 0}))
            return 4
        return 0

    monkeypatch.setattr(launch, "run", fake_run)
    first = prepare(request(llama_1b), environ={})
    assert first.auto_choice is not None
    assert execute(first) == 0
    assert len(launched) == 2 and launched[0] != launched[1]
    err = capsys.readouterr().err
    assert f"out of GPU memory with {first.auto_choice} at micro-batch 16, step 1" in err
    # The fastest setting left is the same strategy at a smaller micro-batch, not a slower strategy.
    assert launched == [(0, "none", "none", False, 16), (0, "none", "none", False, 8)]
    assert not list((tmp_path / "runs" / "oom").glob("oom-rank*.json"))  # the relaunch starts clean


def test_no_oom_fallback_reports_the_failure(tmp_path, monkeypatch, one_h100, llama_1b):
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_run(argv, env, keep_fds=()):
        calls.append(argv)
        (tmp_path / "runs" / "oom" / "oom-rank0.json").write_text(json.dumps({"step": 3, "rank": 0}))
        return 4

    monkeypatch.setattr(launch, "run", fake_run)
    assert execute(prepare(request(llama_1b, oom_fallback=False), environ={})) == 4
    assert len(calls) == 1


def test_every_strategy_out_of_memory_ends_with_one_message(tmp_path, monkeypatch, one_h100, llama_1b):
    """Every (strategy, micro-batch) the planner predicts to fit is launched and runs out of memory."""
    monkeypatch.chdir(tmp_path)
    # Each relaunch counts the built-in data set's blocks twice (--auto's micro-batch cap, preflight),
    # tokenizing it each time (36 s of this test): counted once per data section here, as it is the same.
    counted, count = {}, datasize.rows_and_report

    def count_once(spec):
        key = (spec.data.model_dump_json(), spec.model.tokenizer)
        if key not in counted:
            counted[key] = count(spec)
        return counted[key]

    monkeypatch.setattr(datasize, "rows_and_report", count_once)
    launched = []

    def fake_run(argv, env, keep_fds=()):
        launched.append(strategy(tmp_path / "runs" / "oom"))
        (tmp_path / "runs" / "oom" / "oom-rank0.json").write_text(json.dumps({"step": 1, "rank": 0}))
        return 4

    monkeypatch.setattr(launch, "run", fake_run)
    with pytest.raises(CrakenError) as exc:
        execute(prepare(request(llama_1b), environ={}))
    assert "no slower strategy" in str(exc.value) and "craken plan" in str(exc.value)
    assert len(set(launched)) == len(launched) > 1  # never the same setting twice
    assert launched[0][0] == 0 and launched[-1][:3] == (3, "cpu", "cpu")  # the fastest first, the last resort last


def compiled_and_micro_batch(run_dir: Path) -> tuple:
    spec = rendered(run_dir)
    return spec["model"]["compile"], spec["batch"]["micro_batch"], spec["zero"]["stage"]


def test_auto_turns_on_regional_compilation_unless_the_user_set_it(tmp_path, monkeypatch, one_h100, llama_1b):
    """Compiled, the 1.1B model's activations are about half: --auto picks micro-batch 16 on 80 GiB
    (eager: 8), the measured fastest setting (docs/performance.md)."""
    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(launch, "run", lambda argv, env, keep_fds=(): seen.append(compiled_and_micro_batch(
        tmp_path / "runs" / "oom")) or 0)
    auto = prepare(request(llama_1b), environ={})
    assert any("--auto chose zero0 + compile, micro-batch 16" in w for w in auto.warnings)
    assert execute(auto) == 0
    args = SpecArgs(flags={"--model": str(llama_1b), "--tokenizer": "builtin:tiny", "--seq-len": 2048,
                           "--global-batch": 16, "--name": "oom", "--compile": False})
    assert execute(prepare(TrainRequest(spec_args=args, auto=True, force=True), environ={})) == 0
    assert seen == [(True, 16, 0), (False, 8, 0)]


def test_auto_leaves_the_built_in_tiny_model_eager(tmp_path, monkeypatch, one_h100):
    """Compiling a model that trains in seconds costs more than it saves (planner.COMPILE_MIN_PARAMS)."""
    monkeypatch.chdir(tmp_path)
    args = SpecArgs(flags={"--name": "tiny"})
    prepared = prepare(TrainRequest(spec_args=args, auto=True), environ={})
    assert prepared.resolved.spec.model.compile is False
    assert any("--auto chose zero0, micro-batch" in w for w in prepared.warnings)


def test_auto_compiles_only_with_strategies_measured_compiled(tmp_path, monkeypatch, one_h100, llama_1b):
    """ZeRO-3 and offload have not been run compiled: --auto keeps them eager."""
    monkeypatch.chdir(tmp_path)
    for flags, compiled in (({"--zero": 3}, False), ({"--zero": 2, "--offload-optimizer": "cpu"}, False),
                            ({"--zero": 1}, True)):
        args = SpecArgs(flags={"--model": str(llama_1b), "--tokenizer": "builtin:tiny", "--seq-len": 2048,
                               "--global-batch": 16, "--name": f"z{len(flags)}{compiled}", **flags})
        spec = prepare(TrainRequest(spec_args=args, auto=True), environ={}).resolved.spec
        assert spec.model.compile is compiled, flags
        assert spec.zero.stage == flags["--zero"]
