"""craken doctor: the pure checks on facts written here, the probes on this machine, the command."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from craken_cli import doctor as d
from craken_cli.doctor import dsops
from craken_cli.doctor import collect as doctor_gather
from craken_cli.doctor import Check, Facts, PathState
from craken_cli.plan.hardware import GPU, GiB, FakeProbe, Hardware, detect

LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}


def healthy_facts(hw: Hardware, environ=None, **over) -> Facts:
    """A machine with everything in order, apart from what a test changes."""
    gpu = bool(hw.gpus)
    base = dict(
        hardware=hw,
        versions={"torch": "2.5.1+cu124" if gpu else "2.5.1+cpu", "deepspeed": "0.16.4", "accelerate": "1.2.1",
                  "transformers": "4.47.0", "datasets": "3.2.0", "nvidia-ml-py": "12.560.30", "craken": "0.1.0",
                  "numpy": "2.1.0"},
        requires={"accelerate": ["torch>=2.0.0", "numpy<3.0.0,>=1.17"], "deepspeed": ["torch"],
                  "craken": ["torch>=2.4", "deepspeed>=0.16", "pytest>=8; extra == \"test\""]},
        python=(3, 11, 7), python_requires=">=3.10", torch_build="12.4" if gpu else "cpu",
        environ=environ or {}, tools={"ninja": "/usr/bin/ninja", "c++": "/usr/bin/c++", "nvcc": "/usr/local/cuda/bin/nvcc",
                                      "pdsh": "/usr/bin/pdsh", "ssh": "/usr/bin/ssh"},
        cuda_home="/usr/local/cuda", cuda_toolkit=(12, 4), interfaces=("eth0", "lo"),
        paths={"output": PathState("runs/default", False, True, 500 * GiB, "ext4")}, params=124_000_000,
        aio_library="libaio.so.1t64", aio_header="/usr/include/libaio.h",
        aio_link="/usr/lib/x86_64-linux-gnu/libaio.so",
    )
    base.update(over)
    return Facts(**base)


def hw_with(n=0, cap=(9, 0), shm=16 * GiB, ram=64 * GiB, cuda=(12, 4), nvlink=True, **kw) -> Hardware:
    gpus = [GPU(i, "NVIDIA H100 80GB HBM3" if cap >= (9, 0) else "Tesla V100-SXM2-32GB", 80 * GiB, 79 * GiB, cap)
            for i in range(n)]
    links = {(i, j) for i in range(n) for j in range(i + 1, n)} if nvlink else set()
    hw = detect(FakeProbe(gpus=gpus, nvlink=links, cuda=cuda), environ={})
    from dataclasses import replace

    return replace(hw, shm_total=shm, ram_total=ram, ram_available=ram, **kw)


def view(hw: Hardware, **flags):
    from craken_cli.config.options import SpecArgs, load_spec

    sourced = load_spec(SpecArgs(flags={f"--{k.replace('_', '-')}": v for k, v in flags.items()},
                                 nvme_path=flags.pop("nvme_path", None) if "nvme_path" in flags else None),
                        environ={})
    return d.run_view(sourced, hw)


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


# --- versions -------------------------------------------------------------------------------


@pytest.mark.parametrize("version, requires, build", [
    ("2.5.1+cu124", [], "12.4"),
    ("2.7.0+cu128", [], "12.8"),
    ("2.9.0+cu130", [], "13.0"),
    ("2.13.0+cpu", [], "cpu"),
    ("2.4.0+rocm6.1", [], "rocm6.1"),
    ("2.5.1", ['nvidia-cuda-runtime-cu12==12.4.127; platform_system == "Linux"'], "12.4"),
    ("2.5.1", [], None),
    (None, [], None),
])
def test_torch_build_from_metadata(version, requires, build):
    assert d.torch_build_of(version, requires) == build


def test_healthy_cpu_machine_is_all_ok():
    hw = hw_with(0)
    checks = d.run_checks(healthy_facts(hw), view(hw))
    assert [c for c in checks if c.status != "ok"] == []
    assert d.exit_code(checks) == 0
    assert [c.area for c in checks] == sorted((c.area for c in checks), key=d.AREAS.index)


def test_missing_and_incompatible_packages():
    hw = hw_with(0)
    f = healthy_facts(hw)
    f.versions.update({"deepspeed": None, "torch": "1.13.1+cpu"})
    rows = by_name(d.check_packages(f))
    assert rows["deepspeed"].status == "fail" and rows["deepspeed"].fix == "pip install deepspeed"
    assert rows["torch"].status == "fail"
    assert "accelerate 1.2.1 needs torch>=2.0.0" in rows["torch"].detail
    assert "craken 0.1.0 needs torch>=2.4" in rows["torch"].detail
    assert rows["torch"].fix.startswith("pip install 'torch")
    f.versions["numpy"] = "3.0.1"  # outside what accelerate declares
    assert by_name(d.check_packages(f))["numpy"].fix == "pip install 'numpy<3.0.0,>=1.17'"


def test_tracker_package_is_checked_only_when_the_run_reports_to_it():
    hw = hw_with(0)
    f = healthy_facts(hw)
    assert d.check_tracker(f, view(hw)) == []  # --report-to none: nothing to install
    f.versions.update({"tensorboard": None, "tensorboardX": None})
    [row] = d.check_tracker(f, view(hw, report_to="tensorboard"))
    assert (row.status, row.name, row.fix) == ("fail", "tensorboard", "pip install tensorboard, or --report-to none")
    f.versions["tensorboardX"] = "2.6.2"  # accelerate writes through either package
    [row] = d.check_tracker(f, view(hw, report_to="tensorboard"))
    assert (row.status, row.name) == ("ok", "tensorboardX") and "2.6.2" in row.detail


def test_known_bad_combination_torch_numpy2():
    f = healthy_facts(hw_with(0))
    f.versions.update({"torch": "2.2.2+cpu", "numpy": "2.0.1"})
    f.requires = {}
    row = by_name(d.check_packages(f))["torch + numpy"]
    assert row.status == "fail" and "numpy<2" in row.fix


def test_python_too_old():
    f = healthy_facts(hw_with(0), python=(3, 9, 18))
    row = by_name(d.check_system(f))["python"]
    assert row.status == "fail" and ">=3.10" in row.fix


# --- torch CUDA build vs driver ---------------------------------------------------------------


@pytest.mark.parametrize("build, driver, status", [
    ("12.4", (12, 8), "ok"),
    ("12.4", (12, 4), "ok"),
    ("12.8", (12, 4), "warn"),  # minor-version compatibility, no PTX JIT
    ("13.0", (12, 4), "fail"),  # torch sees no GPU
    ("cpu", (12, 4), "fail"),
])
def test_torch_build_vs_driver(build, driver, status):
    hw = hw_with(2, cuda=driver)
    row = by_name(d.check_gpus(healthy_facts(hw, torch_build=build), None))["torch build"]
    assert row.status == status
    if status != "ok":
        assert "torch" in row.fix and row.fix


def test_busy_gpu_warns():
    hw = hw_with(1)
    busy = Hardware(gpus=(GPU(0, "NVIDIA H100 80GB HBM3", 80 * GiB, 40 * GiB, (9, 0)),), driver_version="550",
                    cuda_driver_version=(12, 4))
    assert by_name(d.check_gpus(healthy_facts(hw), None))["GPU 0"].status == "ok"
    row = by_name(d.check_gpus(healthy_facts(busy), None))["GPU 0"]
    assert row.status == "warn" and "nvidia-smi" in row.fix


# --- DeepSpeed ops ----------------------------------------------------------------------------


def test_no_ninja_fails_only_when_an_op_is_built():
    hw = hw_with(0)
    f = healthy_facts(hw)
    f.tools["ninja"] = None
    rows = by_name(d.check_ops(f, view(hw, zero=2, offload_optimizer="cpu")))
    assert rows["ninja"].status == "fail" and rows["ninja"].fix == "pip install ninja"
    assert rows["cpu_adam"].status == "fail"
    rows = by_name(d.check_ops(f, view(hw, zero=2, offload_optimizer="none")))  # the preset offloads
    assert rows["ninja"].status == "warn" and rows["cpu_adam"].status == "warn"
    f.prebuilt_ops = {"cpu_adam": True}  # DS_BUILD_CPU_ADAM=1 install: nothing to build
    rows = by_name(d.check_ops(f, view(hw, zero=2, offload_optimizer="cpu")))
    assert rows["cpu_adam"].status == "ok" and rows["ninja"].status == "warn"


def test_left_over_build_lock_is_found_and_named_with_its_fix(tmp_path):
    """A killed JIT build leaves `lock` behind; every later process that loads the op then waits on
    it forever, silently (seen here: a CPU-offload run hung until the file was deleted)."""
    import time

    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir()
    lock.touch()
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path)}
    assert dsops.stale_build_locks(["cpu_adam"], env, baton=True) == {}  # a build may be running right now
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert dsops.stale_build_locks(["cpu_adam", "fused_adam"], env, baton=True) == \
        {"cpu_adam": (str(lock), pytest.approx(3600, abs=60))}
    hw = hw_with(0)
    f = healthy_facts(hw, environ=env, jit_locks=dsops.stale_build_locks(["cpu_adam"], env, baton=True))
    row = by_name(d.check_ops(f, view(hw, zero=2, offload_optimizer="cpu")))["cpu_adam"]
    assert row.status == "fail" and row.fix == f"delete {lock} (when no build is running)" and "60 min" in row.detail
    row = by_name(d.check_ops(f, view(hw, zero=2, offload_optimizer="none")))["cpu_adam"]
    assert row.status == "warn"  # not used by this run, but the next offload run would hang


def test_an_os_lock_file_left_on_disk_is_never_stale(tmp_path):
    """torch >= 2.14 builds under filelock: its `lock` file stays on disk after every build, and an
    hour-old one is the normal state (the README's torch refused every offload run ten minutes after
    the first with the age rule)."""
    import time

    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir()
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path)}
    assert dsops.stale_build_locks(["cpu_adam"], env, baton=False) == {}


def test_the_installed_torch_lock_kind_is_read_from_its_source():
    import inspect

    import torch.utils.cpp_extension as cpp

    assert dsops.torch_uses_build_baton() == ("FileBaton(" in inspect.getsource(cpp))


def test_no_compiler():
    hw = hw_with(0)
    f = healthy_facts(hw, environ={"CXX": "clang++-99"})
    f.tools["c++"] = None
    row = by_name(d.check_ops(f, view(hw, zero=3, offload_optimizer="cpu")))["C++ compiler"]
    assert row.status == "fail" and "clang++-99 not found" in row.detail


@pytest.mark.parametrize("toolkit, torch_build, status", [
    ((12, 4), "12.4", "ok"),
    ((12, 1), "12.4", "ok"),  # DeepSpeed accepts minor mismatches within 12.x
    ((11, 8), "12.4", "fail"),
    ((13, 1), "13.0", "fail"),  # not in DeepSpeed's list: it refuses
    (None, "12.4", "fail"),  # no nvcc at all
])
def test_cuda_toolkit_for_fused_adam(toolkit, torch_build, status):
    hw = hw_with(1)
    f = healthy_facts(hw, cuda_toolkit=toolkit, torch_build=torch_build)
    if toolkit is None:
        f.tools["nvcc"], f.cuda_home = None, None
    import dataclasses

    spec_view = dataclasses.replace(view(hw), fused=True)  # DeepSpeed's FusedAdam asked for (optimizer.fused: true)
    rows = by_name(d.check_ops(f, spec_view))
    assert rows["CUDA toolkit"].status == status
    assert rows["fused_adam"].status == ("ok" if status == "ok" else "fail")
    if status == "fail":
        assert "CUDA" in rows["CUDA toolkit"].fix


def test_ds_skip_cuda_check_accepts_mismatch():
    hw = hw_with(1)
    f = healthy_facts(hw, cuda_toolkit=(11, 8), environ={"DS_SKIP_CUDA_CHECK": "1"})
    assert by_name(d.check_ops(f, view(hw)))["CUDA toolkit"].status == "ok"


def test_nvme_offload_needs_async_io_and_libaio(tmp_path):
    """NVMe offload loads DeepSpeed's async_io op, built against libaio: without libaio-dev every check
    passed and the run died after launch with 'Unable to JIT load the async_io op'."""
    assert dsops.ops_for("nvme", True, False) == ["cpu_adam", "async_io"]  # preflight's positional call
    assert dsops.ops_for("none", True, False, "nvme") == ["async_io"]
    assert dsops.ops_for("cpu", True, False, "cpu") == ["cpu_adam"]
    hw = hw_with(0)
    nv = view(hw, zero=3, offload_optimizer="nvme", offload_param="none", nvme_path=str(tmp_path))
    f = healthy_facts(hw, aio_library=None, aio_header=None, aio_link=None)
    row = by_name(d.check_ops(f, nv))["async_io"]
    assert row.status == "fail" and "libaio.h and libaio.so not found" in row.detail
    assert "apt install libaio-dev" in row.fix and "--offload-optimizer cpu" in row.fix
    assert d.exit_code(d.run_checks(f, nv)) == 2
    f.aio_header = "/usr/include/libaio.h"  # the header alone: still no libaio.so to link
    assert by_name(d.check_ops(f, nv))["async_io"].status == "fail"
    param = view(hw, zero=3, offload_optimizer="none", offload_param="nvme", nvme_path=str(tmp_path))
    row = by_name(d.check_ops(healthy_facts(hw, aio_header=None), param))["async_io"]
    assert row.status == "fail" and "--offload-param cpu" in row.fix and "--offload-optimizer" not in row.fix
    ok = healthy_facts(hw)
    row = by_name(d.check_ops(ok, nv))["async_io"]
    assert row.status == "ok" and "/usr/include/libaio.h" in row.detail
    assert [c for c in d.check_ops(ok, nv) if c.status != "ok"] == []
    for settings in (dict(zero=2, offload_optimizer="cpu"), dict(zero=3, offload_optimizer="cpu", offload_param="cpu"),
                     {}):
        assert "async_io" not in by_name(d.check_ops(f, view(hw, **settings)))  # no NVMe: no row, no failure
    ok.jit_locks = {"async_io": ("/x/async_io/lock", 3600.0)}
    row = by_name(d.check_ops(ok, nv))["async_io"]
    assert row.status == "fail" and row.fix == "delete /x/async_io/lock (when no build is running)"
    gpu = hw_with(1)
    row = by_name(d.check_ops(healthy_facts(gpu, cuda_home=None), nv))["async_io"]
    assert row.status == "fail" and "CUDA_HOME" in row.detail  # built against the CUDA headers on GPUs


def test_prebuilt_async_io_needs_only_libaios_shared_library(tmp_path):
    hw = hw_with(0)
    nv = view(hw, zero=3, offload_optimizer="nvme", nvme_path=str(tmp_path))
    f = healthy_facts(hw, prebuilt_ops={"cpu_adam": True, "async_io": True, "pin_memory": True},
                      aio_header=None, aio_link=None)  # DS_BUILD_AIO=1: no headers needed
    f.tools["ninja"] = None
    rows = by_name(d.check_ops(f, nv))
    assert rows["async_io"].status == "ok" and rows["ninja"].status == "warn"  # nothing to build
    f.prebuilt_ops["pin_memory"] = False  # async_io loads pin_memory first: that one is built
    assert by_name(d.check_ops(f, nv))["ninja"].status == "fail"
    f.aio_library = None
    row = by_name(d.check_ops(f, nv))["async_io"]
    assert row.status == "fail" and "shared library" in row.detail and "libaio-dev" in row.fix


def test_find_libaio_in_cflags_and_ldflags_folders(tmp_path, monkeypatch):
    inc, lib = tmp_path / "inc", tmp_path / "lib"
    inc.mkdir()
    lib.mkdir()
    (inc / "libaio.h").write_text("")
    (lib / "libaio.so").write_text("")
    import ctypes.util

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    library, header, link = dsops.find_libaio({"CFLAGS": f"-O2 -I{inc}", "LDFLAGS": f"-L {tmp_path} -L{lib}"})
    assert (header, link, library) == (str(inc / "libaio.h"), str(lib / "libaio.so"), str(lib / "libaio.so"))
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libaio.so.1" if name == "aio" else None)
    assert dsops.find_libaio({})[0] == "libaio.so.1"


def test_gather_looks_for_libaio_for_nvme_runs_only(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor_gather, "find_libaio", lambda environ: (None, None, None) if environ.get("NO_AIO") else
                        ("libaio.so.1", "/i/libaio.h", "/l/libaio.so"))
    hw = hw_with(0)
    nv = view(hw, zero=3, offload_optimizer="nvme", nvme_path=str(tmp_path))
    f = d.gather(hw, nv, environ={})
    assert (f.aio_library, f.aio_header, f.aio_link) == ("libaio.so.1", "/i/libaio.h", "/l/libaio.so")
    f = d.gather(hw, view(hw, zero=2, offload_optimizer="cpu"), environ={})
    assert (f.aio_library, f.aio_header, f.aio_link) == (None, None, None)
    f = d.gather(hw, nv, environ={"NO_AIO": "1"})
    if f.versions.get("deepspeed"):
        assert by_name(d.check_ops(f, nv))["async_io"].status == "fail"


def _fake_stack(monkeypatch, accelerator="cpu", fail=()):
    """torch and DeepSpeed stand-ins for deep_checks: record which op builders are loaded."""
    import types

    built = []

    class Builder:
        def __init__(self, name):
            self.NAME = {v: k for k, v in dsops.OP_BUILDERS.items()}[name]

        def load(self, verbose=False):
            built.append(self.NAME)
            if self.NAME in fail:
                raise RuntimeError(f"Unable to JIT load the {self.NAME} op")

    torch = types.ModuleType("torch")
    torch.__version__ = "2.5.1+cpu"
    torch.version = types.SimpleNamespace(cuda=None)
    torch.cuda = types.SimpleNamespace(is_available=lambda: False, device_count=lambda: 0)
    acc = types.SimpleNamespace(_name=accelerator, create_op_builder=Builder)
    ds_acc = types.ModuleType("deepspeed.accelerator")
    ds_acc.get_accelerator = lambda: acc
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))
    monkeypatch.setitem(sys.modules, "deepspeed.accelerator", ds_acc)
    return built


def test_deep_checks_build_the_ops_the_run_needs(tmp_path, monkeypatch):
    hw = hw_with(0)
    built = _fake_stack(monkeypatch, fail=("async_io",))
    rows = by_name(d.deep_checks(view(hw, zero=3, offload_optimizer="nvme", nvme_path=str(tmp_path))))
    assert built == ["cpu_adam", "async_io"]
    assert rows["cpu_adam"].status == "ok"
    assert rows["async_io"].status == "fail" and "libaio-dev" in rows["async_io"].fix
    built.clear()
    rows = by_name(d.deep_checks(view(hw)))  # no offload, no fused optimizer: no op to build
    assert built == [] and rows["ops"].status == "ok"
    built.clear()
    d.deep_checks(None)  # invalid settings: the common ops
    assert built == ["cpu_adam"]


# --- memory and disk --------------------------------------------------------------------------


def test_small_dev_shm():
    hw = hw_with(0, shm=64 * 2**20)  # docker's default
    row = by_name(d.check_memory(healthy_facts(hw), view(hw)))["/dev/shm"]
    assert row.status == "fail" and "--shm-size" in row.fix and row.detail.startswith("64 MiB")
    one = by_name(d.check_memory(healthy_facts(hw), view(hw, num_processes=1)))["/dev/shm"]
    assert one.status == "warn"


def test_params_from_config():
    assert abs(d.params_from_config(LLAMA2_7B) - 6.738e9) / 6.738e9 < 0.01
    gpt2 = {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257}
    assert abs(d.params_from_config(gpt2) - 124.4e6) / 124.4e6 < 0.02
    assert d.params_from_config({"hidden_size": 8}) is None


def test_model_params_from_local_folder_and_builtin(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA2_7B))
    n, source = d.model_params(str(folder), {})
    assert n == d.params_from_config(LLAMA2_7B) and str(folder) in source
    n, _ = d.model_params("builtin:tiny", {})
    assert 0 < n <= d.BUILTIN_PARAMS_BOUND
    from craken_cli.plan.modelinfo import model_info

    assert n == model_info("builtin:tiny").num_params  # the planner's count, from the same config
    assert d.model_params("org/not-downloaded", {"HF_HUB_CACHE": str(tmp_path)})[0] is None


def test_ram_for_cpu_offload():
    hw = hw_with(0, ram=64 * GiB)
    f = healthy_facts(hw, params=7_000_000_000)
    row = by_name(d.check_memory(f, view(hw, zero=2, offload_optimizer="cpu")))["RAM for offload"]
    assert row.status == "fail" and "nvme" in row.fix  # ~126 GiB of states on a 64 GiB machine
    two = view(hw, zero=2, offload_optimizer="cpu", num_machines=2, main_process_ip="10.0.0.1")
    assert by_name(d.check_memory(f, two))["RAM for offload"].status == "warn"  # ~63 GiB: no headroom
    f.params = 1_000_000_000
    assert by_name(d.check_memory(f, view(hw, zero=2, offload_optimizer="cpu")))["RAM for offload"].status == "ok"
    # the planner's count: fp32 master, moments, fp32 grads and a 16-bit copy (18 B), 16-bit weights (2 B)
    assert d.offload_ram(view(hw, zero=3, offload_optimizer="cpu", offload_param="cpu"), 10**9) == 20 * 10**9
    f.params = None
    assert by_name(d.check_memory(f, view(hw, zero=2, offload_optimizer="cpu")))["RAM for offload"].status == "warn"


def test_ram_for_nvme_offload_counts_deepspeeds_swap_buffers(tmp_path):
    """The host buffers DeepSpeed 0.19.8 pins for NVMe offload, recomputed here from its own code and constants:
    swap_tensor/optimizer_utils.py (OptimizerSwapper: SwapBufferManager of buffer_count fp32 buffers of the
    largest sub-group's partition, aligned), swap_tensor/partitioned_param_swapper.py (_configure_aio:
    buffer_count x aligned buffer_size 16-bit elements), zero/stage3.py (grad_partitions_flat_buffer on the CPU,
    the first max_in_cpu partition elements in RAM, past them reserve_partitioned_swap_space of the largest
    sub-group's full numel)."""
    from deepspeed.runtime.swap_tensor.constants import AIO_INTRA_OP_PARALLELISM_DEFAULT
    from deepspeed.runtime.swap_tensor.utils import AIO_ALIGNED_BYTES
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import (DeepSpeedZeroOffloadOptimizerConfig,
                                                       DeepSpeedZeroOffloadParamConfig)

    from craken_cli.plan import memory

    # craken's defaults are DeepSpeed's
    ds_param, ds_opt = DeepSpeedZeroOffloadParamConfig(), DeepSpeedZeroOffloadOptimizerConfig()
    ds_sub_group = DeepSpeedZeroConfig().sub_group_size
    assert memory.SwapSettings() == memory.SwapSettings(
        optimizer_buffer_count=ds_opt.buffer_count, param_buffer_count=ds_param.buffer_count,
        param_buffer_size=ds_param.buffer_size, max_in_cpu=ds_param.max_in_cpu,
        sub_group_size=ds_sub_group, intra_op_parallelism=AIO_INTRA_OP_PARALLELISM_DEFAULT)
    assert memory.AIO_ALIGNED_BYTES == AIO_ALIGNED_BYTES

    def aligned(numel, element_size):  # OptimizerSwapper / AsyncPartitionedParameterSwapper._io_aligned_numel
        step = AIO_ALIGNED_BYTES * AIO_INTRA_OP_PARALLELISM_DEFAULT // element_size
        return numel if numel % step == 0 else numel + step - numel % step

    world, partition, buffer_size = 8, 812_345_679, 123_456_789  # neither a multiple of the alignment
    params = world * partition
    (tmp_path / "craken.yaml").write_text(
        "deepspeed:\n  extra:\n    zero_optimization:\n      offload_param:\n"
        f"        buffer_count: 8\n        buffer_size: {buffer_size}\n")
    hw = hw_with(world, ram=64 * GiB)
    v = view(hw, zero=3, offload_optimizer="nvme", offload_param="nvme", nvme_path=str(tmp_path / "swap"))
    per_process = (ds_opt.buffer_count * aligned(min(partition, ds_sub_group), 4) * 4  # optimizer swap pool, fp32
                   + 8 * aligned(buffer_size, 2) * 2  # parameter swap buffers, bf16
                   + min(partition, ds_param.max_in_cpu) * 2  # parameters kept in RAM
                   + partition * 2)  # the bf16 gradient partition on the CPU
    assert d.offload_ram(v, params) == world * per_process

    # past max_in_cpu, the buffer for swapping the partitions out (full numel of the largest sub-group)
    (tmp_path / "craken.yaml").write_text(
        "deepspeed:\n  extra:\n    zero_optimization:\n      sub_group_size: 300000000\n"
        "      offload_param:\n        max_in_cpu: 500000000\n")
    v = view(hw, zero=3, offload_optimizer="nvme", offload_param="nvme", nvme_path=str(tmp_path / "swap"))
    per_process = (ds_opt.buffer_count * aligned(300_000_000, 4) * 4
                   + ds_param.buffer_count * aligned(ds_param.buffer_size, 2) * 2
                   + 500_000_000 * 2 + aligned(world * 300_000_000, 2) * 2
                   + partition * 2)
    assert d.offload_ram(v, params) == world * per_process

    # the doctor checks that RAM, where it used to see "no CPU offload"
    row = by_name(d.check_memory(healthy_facts(hw, params=params), v))["RAM for offload"]
    assert row.status == "fail" and "swap buffers" in row.detail and "max_in_cpu" in row.fix


def test_nvme_path_real_folders(tmp_path):
    ok = d.path_state(str(tmp_path / "new" / "swap"))  # created later by DeepSpeed: parent is writable
    assert ok.writable and not ok.exists and ok.free and ok.free > 0
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    bad = d.path_state(str(blocker / "swap"))
    assert not bad.writable and "not a folder" in bad.error
    hw = hw_with(1)
    v = view(hw, zero=3, offload_optimizer="nvme", offload_param="nvme", nvme_path=str(blocker / "swap"))
    row = by_name(d.check_disk(healthy_facts(hw, paths={"nvme": bad}), v))["NVMe path"]
    assert row.status == "fail" and "--nvme-path" in row.fix
    small = PathState(str(tmp_path), True, True, 10 * GiB, "ext4")
    f = healthy_facts(hw, paths={"nvme": small}, params=7_000_000_000)
    assert by_name(d.check_disk(f, v))["NVMe path"].status == "fail"  # ~98 GB of states, 10 GiB free
    nfs = PathState("/mnt/share", True, True, 900 * GiB, "nfs4")
    assert by_name(d.check_disk(healthy_facts(hw, paths={"nvme": nfs}), v))["NVMe path"].status == "warn"


def test_output_folder_too_small_for_checkpoints():
    hw = hw_with(1)
    f = healthy_facts(hw, params=7_000_000_000, paths={"output": PathState("runs/x", False, True, 100 * GiB)})
    row = by_name(d.check_disk(f, view(hw)))["output folder"]
    assert row.status == "fail" and "--keep-checkpoints" in row.fix


# --- network and environment ------------------------------------------------------------------


def test_port_in_use_is_seen():
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert d.port_error(port) == "already in use"
    assert d.port_error(port) is None


def test_address_resolution():
    assert d.resolve_address("127.0.0.1") == ("127.0.0.1", None)
    addr, err = d.resolve_address("no-such-host.invalid")
    assert addr is None and "does not resolve" in err


def test_multi_machine_checks():
    hw = hw_with(8)
    v = view(hw, num_machines=2, main_process_ip="node-0.invalid", launcher="deepspeed")
    f = healthy_facts(hw, address_error="does not resolve", port_checked=True, port_error="already in use")
    f.tools["pdsh"] = None
    rows = by_name(d.check_network(f, v))
    assert rows["main address"].status == "fail" and "--main-process-ip" in rows["main address"].fix
    assert rows["pdsh"].status == "fail" and "--launcher accelerate" in rows["pdsh"].fix
    assert rows["ssh"].status == "ok"
    assert rows["port"].status == "fail" and "--main-process-port" in rows["port"].fix
    # accelerate's launcher needs neither pdsh nor ssh
    rows = by_name(d.check_network(f, view(hw, num_machines=2, main_process_ip="10.0.0.1")))
    assert "pdsh" not in rows and "ssh" not in rows


@pytest.mark.parametrize("env, name, status", [
    ({"NCCL_SOCKET_IFNAME": "ib7"}, "NCCL_SOCKET_IFNAME", "fail"),
    ({"NCCL_SOCKET_IFNAME": "eth"}, None, None),  # a prefix of eth0
    ({"NCCL_SOCKET_IFNAME": "=eth"}, "NCCL_SOCKET_IFNAME", "fail"),  # exact match asked
    ({"NCCL_SOCKET_IFNAME": "^docker,lo"}, None, None),  # exclusions
    ({"GLOO_SOCKET_IFNAME": "wlan0"}, "GLOO_SOCKET_IFNAME", "fail"),
    ({"NCCL_ALGO": "Tree"}, "NCCL_ALGO", "warn"),
    ({"NCCL_DEBUG": "TRACE"}, "NCCL_DEBUG", "warn"),
    ({"NCCL_DEBUG": "INFO"}, None, None),
    ({"CUDA_LAUNCH_BLOCKING": "1"}, "CUDA_LAUNCH_BLOCKING", "warn"),
    ({"NCCL_P2P_LEVEL": "LOC"}, "NCCL_P2P_LEVEL", "warn"),
])
def test_environment_variables(env, name, status):
    hw = hw_with(8)
    found = [(c.name, c.status) for c in d.check_env(healthy_facts(hw, environ=env), view(hw))]
    assert found == ([] if name is None else [(name, status)])


def test_invalid_settings_are_one_failure_among_the_rest():
    hw = hw_with(0)
    checks = d.run_checks(healthy_facts(hw), None, ["zero.stage = 7 (from flag): Input should be 0, 1, 2 or 3"])
    rows = by_name(checks)
    assert rows["settings"].status == "fail" and "zero.stage" in rows["settings"].detail
    assert rows["torch"].status == "ok"  # the environment is still checked


def test_each_invalid_setting_is_one_failure_even_with_a_semicolon_in_its_text():
    hw = hw_with(0)
    problems = ["a.b = 1 (from flag): too big; set --b", "c.d = 2 (from flag): too small"]
    checks = d.run_checks(healthy_facts(hw), None, problems)
    assert [c.detail for c in checks if c.name == "settings"] == problems


def test_refusal_with_a_colon_in_its_text_keeps_its_what_and_its_fix():
    from craken_cli.config.options import SpecArgs, load_spec
    from craken_cli.errors import CrakenError
    from craken_cli.plan.resolve import resolve

    # NVML reports the board's own name, which may hold ": "; the refusal names it
    named = GPU(0, "Tesla V100: SXM2 32GB", 32 * GiB, 31 * GiB, (7, 0))
    hw = detect(FakeProbe(gpus=[named]), environ={})
    row = by_name(d.run_checks(healthy_facts(hw), view(hw, precision="bf16")))["settings vs machine"]
    assert row.status == "fail"
    assert row.detail == "bf16 was asked for but Tesla V100: SXM2 32GB (compute capability 7.0) has no bf16"
    assert row.fix == "use --precision fp16 or auto"
    # craken train's exit-2 message is the one sentence, as before
    with pytest.raises(CrakenError) as exc:
        resolve(load_spec(SpecArgs(flags={"--precision": "bf16"}), environ={}), hw)
    assert exc.value.problems == [f"{row.detail}: {row.fix}"]
    assert str(exc.value) == f"craken: this machine cannot run that: {row.detail}: {row.fix}"


def test_settings_rule_broken_by_a_filled_value_is_reported_whole():
    # two CPU processes are filled in, and 4 x 2 does not divide the global batch of 10
    hw = hw_with(0)
    row = by_name(d.run_checks(healthy_facts(hw), view(hw, global_batch=10, micro_batch=4)))["settings vs machine"]
    assert row.status == "fail" and row.fix == "fix the settings named above"
    assert row.detail.startswith("global batch 10 is not a multiple of micro_batch 4 x 2 processes = 8: ")
    assert row.detail.endswith("change --global-batch or --micro-batch")


def test_verdict_and_plain_rendering():
    checks = [Check("system", "a", "ok", "fine"), Check("gpu", "b", "warn", "meh", "do x"),
              Check("gpu", "c", "fail", "bad", "do y")]
    assert d.verdict(checks[:1]) == "ok" and d.verdict(checks[:2]) == "warn" and d.verdict(checks) == "fail"
    assert [d.exit_code(checks[:n]) for n in (1, 2, 3)] == [0, 1, 2]
    text = d.render_plain(checks)
    assert text.splitlines() == ["[system]", "  OK    a: fine", "[gpu]", "  WARN  b: meh", "        fix: do x",
                                 "  FAIL  c: bad", "        fix: do y",
                                 "verdict: FAIL, 1 failure(s), 1 warning(s) in 3 checks (exit 2)"]


# --- facts from this machine, and the command -------------------------------------------------


def test_gather_reads_this_machine():
    hw = detect(environ={})
    v = view(hw)
    f = d.gather(hw, v)
    import importlib.metadata as md

    assert f.versions["torch"] == md.version("torch") and f.versions["deepspeed"] == md.version("deepspeed")
    assert f.python == tuple(sys.version_info[:3])
    assert f.paths["output"].writable
    assert f.params is not None  # the built-in model's size is known


def _doctor(*argv, **kw):
    return subprocess.run([sys.executable, "-m", "craken_cli", "doctor", *argv], capture_output=True, text=True,
                          timeout=60, **kw)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("", 0))
        return str(s.getsockname()[1])


def test_cli_json(tmp_path):
    done = _doctor("--json", "--main-process-port", _free_port(), cwd=tmp_path)
    report = json.loads(done.stdout)
    assert done.returncode == report["exit_code"] == d.VERDICT_EXIT[report["verdict"]]
    names = {(c["area"], c["name"]) for c in report["checks"]}
    assert {("packages", "torch"), ("gpu", "GPUs"), ("run", "processes"), ("network", "port")} <= names
    assert all(c["fix"] for c in report["checks"] if c["status"] != "ok")
    assert report["versions"]["deepspeed"] and report["hardware"]["cpu_count"] == os.cpu_count()


def test_cli_plain_output_and_exit_code(tmp_path):
    done = _doctor("--main-process-port", _free_port(), cwd=tmp_path)
    assert "\x1b" not in done.stdout and "\r" not in done.stdout  # stdout is a pipe: no control characters
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("verdict: ") and last.endswith(f"(exit {done.returncode})")
    assert "[packages]" in done.stdout and "[run]" in done.stdout


def test_cli_port_in_use_warns_on_one_machine_and_fails_for_several(tmp_path):
    """On one machine accelerate moves the rendezvous to a free port and `craken train` runs (issue
    21: doctor exited 2 on it); the other machines of a job connect to rank 0's port, so there it fails."""
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen(1)
        port = str(s.getsockname()[1])
        one = _doctor("--main-process-port", port, cwd=tmp_path)
        several = _doctor("--main-process-port", port, "--num-machines", "2", "--num-processes", "2",
                          "--main-process-ip", "127.0.0.1", cwd=tmp_path)
    assert "WARN  port: " in one.stdout and "already in use" in one.stdout and "FAIL  port" not in one.stdout
    assert several.returncode == 2 and "FAIL  port: " in several.stdout


def test_cli_bad_settings_still_report(tmp_path):
    done = _doctor("--set", "zero.stage=7", cwd=tmp_path)
    assert done.returncode == 2
    assert "FAIL  settings: zero.stage" in done.stdout and "[packages]" in done.stdout


def test_cli_imports_nothing_heavy(tmp_path):
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "craken_cli", "doctor", "--json"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode in (0, 1, 2) and json.loads(done.stdout)["checks"]
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert "craken_cli" in imported
    assert not imported & {"torch", "deepspeed", "transformers", "accelerate", "datasets"}
