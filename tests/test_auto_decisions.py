"""`--auto` decisions and doctor verdicts on four machines given through FakeProbe:
no GPU; 1 V100 (no bf16); 4 A100 without NVLink; 8 H100 with NVLink."""

from __future__ import annotations

import pytest

from craken_cli import doctor as d
from craken_cli.errors import CrakenError
from craken_cli.plan.hardware import GPU, GiB, FakeProbe, detect
from craken_cli.config.options import SpecArgs, load_run, load_spec
from test_doctor import healthy_facts


def pairs(n):
    return {(i, j) for i in range(n) for j in range(i + 1, n)}


MACHINES = {
    "cpu": FakeProbe(gpus=[]),
    "1xV100": FakeProbe(gpus=[GPU(0, "Tesla V100-SXM2-32GB", 32 * GiB, 31 * GiB, (7, 0))]),
    "4xA100-pcie": FakeProbe(gpus=[GPU(i, "NVIDIA A100-PCIE-40GB", 40 * GiB, 39 * GiB, (8, 0)) for i in range(4)],
                             p2p=pairs(4)),
    "8xH100-nvlink": FakeProbe(gpus=[GPU(i, "NVIDIA H100 80GB HBM3", 80 * GiB, 79 * GiB, (9, 0)) for i in range(8)],
                               nvlink=pairs(8)),
}


@pytest.fixture(autouse=True)
def _no_project_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no craken.yaml of the repository leaks in


def machine(name: str):
    return detect(MACHINES[name], environ={})


def args(**flags) -> SpecArgs:
    return SpecArgs(flags={f"--{k.replace('_', '-')}": v for k, v in flags.items()})


def doctor_for(name: str, environ=None, **flags):
    hw = machine(name)
    view = d.run_view(load_spec(args(**flags), environ={}), hw)
    checks = d.run_checks(healthy_facts(hw, environ=environ or {}), view)
    return view, checks


@pytest.mark.parametrize("name, processes, use_cpu, precision, fused", [
    ("cpu", 2, True, "bf16", False),
    ("1xV100", 1, False, "fp16", True),
    ("4xA100-pcie", 4, False, "bf16", True),
    ("8xH100-nvlink", 8, False, "bf16", True),
])
def test_auto_decisions(name, processes, use_cpu, precision, fused):
    resolved, decisions = load_run(args(), hardware=machine(name), environ={})
    spec = resolved.spec
    assert spec.cluster.num_processes == processes and spec.world_size == processes
    assert spec.cluster.use_cpu is use_cpu
    assert spec.precision == precision
    # No DeepSpeed op to JIT-build by default: torch's AdamW, with its fused kernel on GPU.
    assert spec.optimizer.fused is False
    from craken_cli.launch.render import deepspeed_config

    params = deepspeed_config(spec)["optimizer"]["params"]
    assert params["torch_adam"] is True and params.get("fused", False) is fused
    assert resolved.sources["cluster.num_processes"] == "detected"
    assert resolved.sources["precision"] == "detected"
    # a warning is printed exactly when auto falls back to fp16
    assert any("fp16" in w for w in decisions.warnings) == (precision == "fp16")


def test_v100_refuses_bf16_and_names_the_fix():
    with pytest.raises(CrakenError) as exc:
        load_run(args(precision="bf16"), hardware=machine("1xV100"), environ={})
    assert "V100" in str(exc.value) and "--precision fp16" in str(exc.value)


def test_h100_two_machines_doubles_processes():
    resolved, _ = load_run(args(num_machines=2, main_process_ip="10.0.0.1"), hardware=machine("8xH100-nvlink"),
                           environ={})
    assert resolved.spec.cluster.num_processes == 16


@pytest.mark.parametrize("name, verdict, not_ok", [
    ("cpu", "ok", set()),
    ("1xV100", "warn", {("run", "precision")}),  # auto -> fp16 is reported, not silently taken
    ("4xA100-pcie", "ok", set()),
    ("8xH100-nvlink", "ok", set()),
])
def test_doctor_verdicts(name, verdict, not_ok):
    view, checks = doctor_for(name)
    assert d.verdict(checks) == verdict and d.exit_code(checks) == d.VERDICT_EXIT[verdict]
    assert {(c.area, c.name) for c in checks if c.status != "ok"} == not_ok
    gpu_rows = [c for c in checks if c.area == "gpu" and c.name.startswith("GPU ")]
    assert len(gpu_rows) == machine(name).gpu_count


def test_doctor_reports_gpus_and_links():
    _, checks = doctor_for("8xH100-nvlink")
    rows = {c.name: c for c in checks}
    assert rows["GPU 7"].detail == ("NVIDIA H100 80GB HBM3, 80.0 GiB (79.0 GiB free), compute capability 9.0, "
                                    "bf16, fp8")
    assert rows["links"].detail == "NVLink between all 28 pairs"
    _, checks = doctor_for("1xV100")
    assert "no bf16" in {c.name: c for c in checks}["GPU 0"].detail
    assert "links" not in {c.name for c in checks}


def test_doctor_a100_without_any_peer_to_peer_warns():
    hw = detect(FakeProbe(gpus=MACHINES["4xA100-pcie"].gpus), environ={})
    view = d.run_view(load_spec(args(), environ={}), hw)
    links = {c.name: c for c in d.run_checks(healthy_facts(hw), view)}["links"]
    assert links.status == "warn" and "nvidia-smi topo" in links.fix


def test_doctor_nccl_p2p_disable_on_nvlink_machine():
    _, checks = doctor_for("8xH100-nvlink", environ={"NCCL_P2P_DISABLE": "1"})
    bad = [c for c in checks if c.status != "ok"]
    assert [(c.name, c.status) for c in bad] == [("NCCL_P2P_DISABLE", "warn")]
    assert "NVLink" in bad[0].detail and bad[0].fix == "unset NCCL_P2P_DISABLE"
    # the same variable is a harmless workaround on a machine without peer-to-peer
    hw = detect(FakeProbe(gpus=MACHINES["4xA100-pcie"].gpus), environ={})
    view = d.run_view(load_spec(args(), environ={}), hw)
    assert "NCCL_P2P_DISABLE" not in {c.name for c in d.run_checks(healthy_facts(hw, {"NCCL_P2P_DISABLE": "1"}),
                                                                    view)}


def test_doctor_v100_bf16_is_a_failure():
    view, checks = doctor_for("1xV100", precision="bf16")
    fails = [c for c in checks if c.status == "fail"]
    assert d.verdict(checks) == "fail"
    assert [c.name for c in fails] == ["settings vs machine"] and "fp16" in fails[0].fix


def test_doctor_too_many_processes_is_a_failure():
    _, checks = doctor_for("4xA100-pcie", num_processes=8)
    fails = [c for c in checks if c.status == "fail"]
    assert len(fails) == 1 and "--num-processes 4" in fails[0].fix
