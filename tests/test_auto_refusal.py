"""`craken train --auto` never launches what the planner predicts cannot fit: it stops before launch
(exit 2) and names the smallest changes that would fit; and it never picks a micro-batch the data set
cannot fill on every process. The GPUs are hypothetical (behind the hardware interface); the data,
the tokenizer, the planning and the launch preparation are the real ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from craken_cli.plan import datasize, memory as planner
from craken_cli.launch import command as launch
from craken_cli.errors import CrakenError
from craken_cli.plan.hardware import GPU, GiB, Hardware
from craken_cli.plan.modelinfo import analytic_info
from craken_cli.config.options import SpecArgs, load_run
from craken_cli.launch.prepare import TrainRequest, prepare

H200 = 139.8  # GiB, as NVML reports one H200
LLAMA_13B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 5120,
             "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
             "num_key_value_heads": 40, "vocab_size": 32000, "max_position_embeddings": 4096}


def machine(gpus: int = 1, gib: float = H200, ram_gib: float = 128) -> Hardware:
    mem = int(gib * GiB)
    return Hardware(gpus=tuple(GPU(i, "NVIDIA H200", mem, mem, (9, 0)) for i in range(gpus)),
                    ram_total=int(ram_gib * GiB), ram_available=int(ram_gib * GiB), cpu_count=16)


@pytest.fixture(autouse=True)
def _here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no craken.yaml of the repository leaks in; run folders land here
    monkeypatch.setattr(launch, "run", lambda argv, env: pytest.fail("launched"))


def model_folder(root: Path, cfg: dict, name: str) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def auto(flags: dict, hw: Hardware):
    args = SpecArgs(flags={"--tokenizer": "builtin:tiny", "--name": "auto", **flags})
    return prepare(TrainRequest(spec_args=args, auto=True), environ={}, hardware=hw)


# ---------------------------------------------------------------------------------------------
# refusal before launch


def test_13b_on_one_h200_with_128gb_is_refused_with_the_changes_that_would_fit(tmp_path):
    folder = model_folder(tmp_path, LLAMA_13B, "llama-13b")
    with pytest.raises(CrakenError) as exc:
        auto({"--model": str(folder), "--seq-len": 2048, "--global-batch": 16}, machine())
    err = exc.value
    assert err.exit_code == 2 and err.title == "predicted not to fit" and len(err.problems) == 1
    text = err.problems[0]
    assert "Nothing was launched" in text and "13.02 B parameters" in text
    # the smallest change of each kind, each as the flags to give
    assert "2 GPUs of 140 GiB: --num-processes 2" in text
    changes = text.splitlines()[1:]
    ram = next(line for line in changes if "CPU RAM" in line)
    assert "this one has 128.0 GiB" in ram and "--offload-optimizer cpu" in ram
    assert float(ram.split()[0]) > 128 * 1.5  # the fp32 states of 13 B parameters: ~240 GiB
    assert any(line.strip().startswith("NVMe offload: --offload-optimizer nvme") and "--nvme-path DIR" in line
               for line in changes)
    assert "--seq-len" not in text  # no sequence length fits the model states in one GPU
    assert not (tmp_path / "runs" / "auto").exists()  # nothing written


def test_each_named_change_really_fits():
    """The changes are plans of a changed spec or machine: applying one gives a choice that fits."""
    info = analytic_info(LLAMA_13B, "13b")
    resolved, _ = load_run(SpecArgs(flags={"--seq-len": 2048, "--global-batch": 16}), hardware=machine(),
                           environ={})
    spec = resolved.spec
    assert planner.compatible(planner.plan(info, spec, machine()), {}) == []
    two = planner._replaced(spec, "cluster", num_processes=2)
    assert planner.compatible(planner.plan(info, two, machine(2)), {})
    changes = planner.smallest_changes(info, spec, machine(), {})
    ram = float(next(c for c in changes if "CPU RAM" in c).split()[0])
    assert planner.compatible(planner.plan(info, spec, machine(ram_gib=ram)), {})
    assert not planner.compatible(planner.plan(info, spec, machine(ram_gib=ram * 0.8)), {})


def test_a_fixed_setting_that_cannot_fit_names_the_flag_to_change(tmp_path):
    """The user fixed --micro-batch and --no-activation-checkpointing: --auto keeps them, refuses, and
    names --activation-checkpointing and a smaller --micro-batch as alternatives."""
    cfg = {**LLAMA_13B, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32}  # a 7B Llama
    folder = model_folder(tmp_path, cfg, "llama-7b")
    flags = {"--model": str(folder), "--seq-len": 4096, "--micro-batch": 4, "--grad-accum": 1,
             "--activation-checkpointing": False, "--zero": 3, "--offload-optimizer": "none",
             "--offload-param": "none"}
    with pytest.raises(CrakenError) as exc:
        auto(flags, machine(8, 80, 1024))
    text = exc.value.problems[0]
    assert "batch.micro_batch=4" in text and "model.activation_checkpointing=False" in text
    assert "activation checkpointing: --activation-checkpointing (zero3+ac)" in text
    assert "a smaller micro-batch: --micro-batch" in text


def test_what_fits_still_launches_as_before(tmp_path):
    folder = model_folder(tmp_path, LLAMA_13B, "llama-13b")
    prepared = auto({"--model": str(folder), "--seq-len": 2048, "--global-batch": 16, "--num-processes": 4},
                    machine(4))
    assert any(w.startswith("--auto chose") for w in prepared.warnings)


# ---------------------------------------------------------------------------------------------
# the data caps the micro-batch


def spec_of(flags: dict, hw: Hardware | None = None):
    resolved, _ = load_run(SpecArgs(flags={"--tokenizer": "builtin:tiny", **flags}), hardware=hw or machine(),
                           environ={})
    return resolved.spec


def worker_blocks(spec) -> int:
    """What the workers get: train/data.py's own loading and packing."""
    from craken_cli.train import data, modeling

    return len(data.pack(data.load_raw(spec), modeling.load_tokenizer(spec), spec.data.seq_len))


@pytest.mark.parametrize("seq", [256, 1024])
def test_blocks_of_the_built_in_data_are_counted_exactly_before_launch(seq):
    spec = spec_of({"--seq-len": seq})
    assert datasize.blocks_available(spec) == worker_blocks(spec) > 0


def test_blocks_of_a_small_local_file_are_counted_exactly(tmp_path):
    from craken_cli.train import builtin

    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in builtin.pattern_lines(3000, seed=3)))
    spec = spec_of({"--seq-len": 128, "--dataset": str(data)})
    assert datasize.blocks_available(spec) == worker_blocks(spec) > 0
    assert datasize.blocks_available(spec_of({"--dataset": "org/some-hub-set"})) is None  # unknown: no cap


def test_auto_caps_the_micro_batch_at_what_the_data_fills_on_every_process():
    """The built-in data at seq 512 gives about a hundred training blocks; a global batch of 256 on one
    80 GiB GPU would take micro-batch 256 for the tiny model, so the cap decides."""
    spec = spec_of({"--seq-len": 512})
    train = planner.train_blocks(worker_blocks(spec), spec.data.eval_fraction)
    assert 8 < train < 256
    prepared = auto({"--seq-len": 512, "--global-batch": 256}, machine(1, 80))
    chosen = prepared.resolved.spec.batch.micro_batch
    assert chosen <= train and 256 % chosen == 0
    assert chosen * 2 > train or 256 % (chosen * 2)  # the largest divisor of 256 the data fills
    two = auto({"--seq-len": 512, "--global-batch": 256, "--num-processes": 2, "--name": "two"}, machine(2, 80))
    assert two.resolved.spec.batch.micro_batch <= train // 2


def test_data_too_small_is_one_message_before_launch(tmp_path):
    from craken_cli.train import builtin

    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": t}) + "\n" for t in builtin.pattern_lines(120, seed=5)))
    flags = {"--seq-len": 512, "--dataset": str(small), "--num-processes": 4}
    train = planner.train_blocks(worker_blocks(spec_of(flags, machine(4, 80))), 0.05)
    assert 0 < train < 4
    with pytest.raises(CrakenError) as exc:
        auto({**flags, "--global-batch": 32}, machine(4, 80))
    err = exc.value
    assert err.exit_code == 2 and err.title == "data set too small" and len(err.problems) == 1
    assert f"{train} training blocks of 512 tokens are fewer than one micro-batch per process (4 processes)" \
        in err.problems[0]
    assert "lower --seq-len" in err.problems[0]
    with pytest.raises(CrakenError) as exc:
        auto({"--seq-len": 512, "--micro-batch": 256, "--grad-accum": 1}, machine(1, 80))
    assert "--micro-batch 256 needs 256 training blocks of 512 tokens" in exc.value.problems[0]
    assert not (tmp_path / "runs" / "auto").exists()


def test_data_cap_arithmetic_matches_the_workers_loader():
    # train/data.train_eval_split holds out max(1, int(n * fraction)); the loader drops the last partial batch
    assert planner.train_blocks(61, 0.05) == 58 and planner.train_blocks(1, 0.05) == 1
    assert planner.train_blocks(64, 0.0) == 64
    assert planner.data_cap(61, 1) == 61 and planner.data_cap(61, 8) == 7 and planner.data_cap(3, 4) == 0
    assert planner.data_problem(61, 1, 1024) is None and planner.data_problem(61, 1, 1024, 64)
