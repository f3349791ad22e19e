"""hardware.detect(): GPU facts through the GpuProbe interface (FakeProbe), the rest from this machine."""

from __future__ import annotations

import os

from craken_cli.plan.hardware import GPU, GiB, FakeProbe, Hardware, detect, free_disk


def gpus(n: int, name: str = "NVIDIA H100 80GB HBM3", cap=(9, 0), mem=80) -> list[GPU]:
    return [GPU(i, name, mem * GiB, mem * GiB - GiB // 2, cap, f"GPU-{i:08x}-aaaa") for i in range(n)]


def all_pairs(n: int) -> set[tuple[int, int]]:
    return {(i, j) for i in range(n) for j in range(i + 1, n)}


class Broken:
    def read(self):
        raise OSError("NVML unavailable: driver not loaded")


def test_probe_error_is_zero_gpus_not_an_error():
    hw = detect(Broken(), environ={})
    assert hw.gpu_count == 0 and not hw.all_bf16
    assert hw.nvml_error == "NVML unavailable: driver not loaded"
    assert hw.links() == "no GPU"


def test_real_nvml_probe_never_raises():
    hw = detect()  # NVML on this machine: no GPU here gives an error text, a GPU machine gives GPUs
    assert (hw.nvml_error is not None) == (hw.gpu_count == 0 and hw.driver_version is None)
    for g in hw.gpus:
        assert g.memory_total >= g.memory_free > 0 and g.capability >= (3, 0)


def test_machine_facts_are_read():
    hw = detect(FakeProbe(), paths=("/definitely/not/here/xyz",), environ={})
    assert hw.cpu_count == os.cpu_count()
    assert hw.ram_total >= hw.ram_available > 0
    if os.path.isdir("/dev/shm"):
        assert hw.shm_total and hw.shm_total > 0
    # a path that does not exist yet is measured at its nearest existing parent ("/")
    assert hw.disk_free["/definitely/not/here/xyz"] == free_disk("/")


def test_bf16_and_fp8_follow_compute_capability():
    v100, a100, l4, h100 = (GPU(0, n, GiB, GiB, c) for n, c in
                            (("V100", (7, 0)), ("A100", (8, 0)), ("L4", (8, 9)), ("H100", (9, 0))))
    assert (v100.bf16, v100.fp8) == (False, False)
    assert (a100.bf16, a100.fp8) == (True, False)
    assert (l4.bf16, l4.fp8) == (True, True)
    assert (h100.bf16, h100.fp8) == (True, True)
    mixed = Hardware(gpus=(a100, GPU(1, "V100", GiB, GiB, (7, 0))))
    assert not mixed.all_bf16


def test_links_nvlink_everywhere():
    hw = detect(FakeProbe(gpus=gpus(8), nvlink=all_pairs(8)), environ={})
    assert hw.gpu_count == 8 and hw.nvlink_all
    assert hw.nvlink_between(7, 2) and hw.links() == "NVLink between all 28 pairs"
    assert hw.p2p_pairs >= hw.nvlink_pairs  # NVLink pairs are peer-to-peer pairs too


def test_links_pcie_and_none():
    pcie = detect(FakeProbe(gpus=gpus(4, "NVIDIA A100-PCIE-40GB", (8, 0), 40), p2p=all_pairs(4)), environ={})
    assert not pcie.nvlink_all and pcie.links() == "peer-to-peer 6/6 pairs"
    none = detect(FakeProbe(gpus=gpus(4, "NVIDIA A100-PCIE-40GB", (8, 0), 40)), environ={})
    assert none.links() == "no peer-to-peer (through host memory)"
    partial = detect(FakeProbe(gpus=gpus(4), nvlink={(0, 1), (2, 3)}, p2p=all_pairs(4)), environ={})
    assert partial.links() == "NVLink 2/6 pairs, peer-to-peer 6/6 pairs"
    assert detect(FakeProbe(gpus=gpus(1)), environ={}).links() == "single GPU"


def test_cuda_visible_devices_limits_and_renumbers():
    probe = FakeProbe(gpus=gpus(8), nvlink={(2, 3), (3, 5)})
    hw = detect(probe, environ={"CUDA_VISIBLE_DEVICES": "3,2"})
    assert [g.index for g in hw.gpus] == [0, 1]
    assert [g.uuid for g in hw.gpus] == ["GPU-00000003-aaaa", "GPU-00000002-aaaa"]
    assert hw.nvlink_pairs == {(0, 1)} and hw.hidden_gpus == 6
    assert detect(probe, environ={"CUDA_VISIBLE_DEVICES": ""}).gpu_count == 0
    # CUDA stops at the first entry it cannot match
    assert detect(probe, environ={"CUDA_VISIBLE_DEVICES": "1,bogus,2"}).gpu_count == 1
    assert detect(probe, environ={"CUDA_VISIBLE_DEVICES": "0,99"}).gpu_count == 1
    by_uuid = detect(probe, environ={"CUDA_VISIBLE_DEVICES": "GPU-00000005"})
    assert by_uuid.gpu_count == 1 and by_uuid.gpus[0].uuid == "GPU-00000005-aaaa"
    assert detect(probe, environ={}).gpu_count == 8
