"""Bad inputs through the real CLI (`craken_cli.app.main`, the console script's entry point).

Each must end with exit code 2 and exactly one error message that names the field or flag and says
what to do, with no traceback and no file written anywhere (the working folder is compared before
and after, and the render output folder must not appear).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

OUT = "out"  # render target inside the working folder; must never appear

GOOD_DS = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 8, "train_batch_size": 64,
           "gradient_clipping": 0.3, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}
ACCEL_WITH_FILE = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED", "num_processes": 2,
                   "deepspeed_config": {"deepspeed_config_file": "ds_config.json"}}


@dataclass
class Case:
    args: list[str]  # after `craken`
    needles: list[str]  # all must appear in the message: the field/flag, and the fix
    files: dict[str, str | bytes] = field(default_factory=dict)  # written into the working folder first
    env: dict[str, str] = field(default_factory=dict)
    dirs: list[str] = field(default_factory=list)


def render(*args: str) -> list[str]:
    return ["config", "render", "--out", OUT, *args]


def js(data) -> str:
    return json.dumps(data)


CASES = {
    "unknown-key-in-craken-yaml": Case(render(), ["zero.stgae", "did you mean 'zero.stage'"],
                                       files={"craken.yaml": "zero:\n  stgae: 2\n"}),
    "unknown-section": Case(render(), ["optimiser", "did you mean 'optimizer'"],
                            files={"craken.yaml": "optimiser:\n  lr: 1.0e-3\n"}),
    "wrong-type": Case(render(), ["zero.overlap_comm", "valid boolean"],
                       files={"craken.yaml": "zero:\n  overlap_comm: sometimes\n"}),
    "quoted-number": Case(render(), ["batch.micro_batch", "must not be quoted", "--micro-batch"],
                          files={"craken.yaml": 'batch:\n  micro_batch: "8"\n'}),
    "negative-micro-batch": Case(render("--micro-batch", "-1"),
                                 ["batch.micro_batch", "greater than 0", "--micro-batch"]),
    "zero-grad-accum": Case(render("--grad-accum", "0"), ["batch.grad_accum", "greater than 0", "--grad-accum"]),
    "zero-bucket-size": Case(render("--set", "zero.reduce_bucket_size=0"),
                             ["zero.reduce_bucket_size", "greater than 0"]),
    "inconsistent-global-batch": Case(
        render("--micro-batch", "4", "--grad-accum", "8", "--num-processes", "2", "--global-batch", "100"),
        ["global batch 100", "--global-batch", "--grad-accum"]),
    "global-batch-not-a-multiple": Case(render("--micro-batch", "4", "--num-processes", "2", "--global-batch", "60"),
                                        ["global batch 60", "--global-batch or --micro-batch"]),
    "nvme-without-path": Case(render("--zero", "2", "--offload-optimizer", "nvme"),
                              ["offload.optimizer.nvme_path", "--nvme-path"]),
    "nvme-path-without-nvme": Case(render("--zero", "2", "--nvme-path", "/tmp/nvme"),
                                   ["--nvme-path", "--offload-optimizer nvme"]),
    "stage3-keys-at-stage2": Case(render("--zero", "2", "--set", "zero.stage3_max_live_parameters=1e9"),
                                  ["zero.stage3_max_live_parameters", "--zero 3"]),
    "param-offload-at-stage2": Case(render("--zero", "2", "--offload-param", "cpu"),
                                    ["parameter offload", "--zero 3", "--offload-param none"]),
    "optimizer-offload-at-stage0": Case(render("--zero", "0", "--offload-optimizer", "cpu"),
                                        ["optimizer offload", "--offload-optimizer none"]),
    "zero-5": Case(render("--zero", "5"), ["zero.stage", "5", "--zero"]),
    "unknown-precision": Case(render("--precision", "bf32"), ["precision", "bf32", "--precision"]),
    "port-out-of-range": Case(render("--main-process-port", "70000"),
                              ["cluster.main_process_port", "--main-process-port"]),
    "machine-rank-too-high": Case(render("--num-machines", "2", "--machine-rank", "2", "--main-process-ip", "10.0.0.1"),
                                  ["machine_rank 2", "--machine-rank"]),
    "machines-without-address": Case(render("--num-machines", "2"), ["--main-process-ip"]),
    "not-an-integer-flag": Case(render("--micro-batch", "four"), ["--micro-batch", "valid integer"]),
    "bad-env-value": Case(render(), ["batch.micro_batch", "from env", "--micro-batch"],
                          env={"CRAKEN_BATCH__MICRO_BATCH": "many"}),
    "bad-env-key": Case(render(), ["zero.stgae", "from env", "did you mean 'zero.stage'"],
                        env={"CRAKEN_ZERO__STGAE": "2"}),
    "malformed-env-yaml": Case(render(), ["CRAKEN_OPTIMIZER__BETAS", "malformed YAML"],
                               env={"CRAKEN_OPTIMIZER__BETAS": "[0.9, 0.95"}),
    "set-without-equals": Case(render("--set", "zero.stage"), ["--set 'zero.stage'", "section.field=value"]),
    "set-unknown-field": Case(render("--set", "zero.stages=3"), ["zero.stages", "did you mean 'zero.stage'"]),
    "malformed-yaml": Case(render(), ["craken.yaml", "malformed YAML", "line 3", "fix the file"],
                           files={"craken.yaml": "zero:\n  stage: [2\nbatch: {}\n"}),
    "yaml-not-a-mapping": Case(render(), ["craken.yaml", "expected a mapping"], files={"craken.yaml": "- 1\n- 2\n"}),
    "missing-config-file": Case(render("--config", "nope.yaml"), ["nope.yaml", "no such file", "check the path"]),
    "config-is-a-folder": Case(render("--config", "conf"), ["conf", "is a folder", "give --config a YAML or JSON file"], dirs=["conf"]),
    "config-not-utf8": Case(render("--config", "latin1.yaml"), ["latin1.yaml", "cannot be read", "encoding"],
                            files={"latin1.yaml": "model:\n  name_or_path: caf\xe9\n".encode("latin-1")}),
    "malformed-json": Case(["config", "validate", "ds.json"], ["ds.json", "malformed JSON", "line 1", "fix the file"],
                           files={"ds.json": '{"train_batch_size": 8,, }'}),
    "missing-validate-file": Case(["config", "validate", "absent.json"], ["absent.json", "no such file"]),
    "bf16-and-fp16": Case(["config", "validate", "ds.json"], ["bf16.enabled and fp16.enabled", "keep one"],
                          files={"ds.json": js({**GOOD_DS, "fp16": {"enabled": True}})}),
    # ("auto" that nothing fills is no problem: DeepSpeed reads it as the field's default)
    "bad-value-in-ds-section": Case(["config", "validate", "ds.json"], ["zero_optimization.overlap_comm",
                                                                        "'sometimes'", "fix the value"],
                                    files={"ds.json": js({**GOOD_DS, "zero_optimization": {
                                        "stage": 2, "overlap_comm": "sometimes"}})}),
    "quoted-number-in-ds-json": Case(["config", "validate", "ds.json"],
                                     ["gradient_accumulation_steps", "'8'", "without quotes"],
                                     files={"ds.json": js({**GOOD_DS, "gradient_accumulation_steps": "8"})}),
    # (an unknown top-level key is no problem: DeepSpeed ignores it; craken keeps it with a note)
    "unknown-key-in-ds-json": Case(["config", "validate", "ds.json"], ["zero_optimization.overlap_com",
                                                                       "did you mean overlap_comm"],
                                   files={"ds.json": js({**GOOD_DS, "zero_optimization": {
                                       "stage": 2, "overlap_com": True}})}),
    "inconsistent-triple-in-ds-json": Case(["config", "validate", "ds.json"],
                                           ["train_batch_size 60", "train_micro_batch_size_per_gpu 4"],
                                           files={"ds.json": js({**GOOD_DS, "train_batch_size": 60})}),
    # (in a DeepSpeed JSON DeepSpeed ignores them at stage 2, and craken says so; in a run file they are a mistake)
    "stage3-keys-at-stage2-in-craken-yaml": Case(
        render(), ["zero.stage3_max_live_parameters", "--zero 3"],
        files={"craken.yaml": "zero:\n  stage: 2\n  stage3_max_live_parameters: 1000\n"}),
    "nvme-without-path-in-ds-json": Case(
        ["config", "validate", "ds.json"], ["offload.optimizer.nvme_path", "--nvme-path"],
        files={"ds.json": js({**GOOD_DS, "zero_optimization": {"stage": 2,
                                                               "offload_optimizer": {"device": "nvme"}}})}),
    "mixed-precision-beside-ds-file": Case(
        ["config", "validate", "ds.json", "accelerate.yaml"], ["mixed_precision", "deepspeed_config_file", "remove it"],
        files={"ds.json": js(GOOD_DS), "accelerate.yaml": js({**ACCEL_WITH_FILE, "mixed_precision": "bf16"})}),
    "grad-accum-disagrees-between-files": Case(
        ["config", "validate", "ds.json", "accelerate.yaml"], ["deepspeed_config.gradient_accumulation_steps",
                                                               "deepspeed_config_file", "remove it"],
        files={"ds.json": js(GOOD_DS),
               "accelerate.yaml": js({**ACCEL_WITH_FILE, "deepspeed_config": {"gradient_accumulation_steps": 4}})}),
    "render-over-existing-files": Case(render(), ["already exist", "--force"],
                                       files={"out/ds_config.json": "{}\n"}),
    # found in a first-contact audit: pydantic's "Field required" / "valid array" named no fix
    "betas-one-value": Case(render("--set", "optimizer.betas=[0.9]"), ["optimizer.betas = [0.9]",
                                                                      "takes a list of 2 values",
                                                                      "optimizer.betas=[0.9, 0.95]"]),
    "betas-a-number-in-yaml": Case(render(), ["optimizer.betas = 0.9 (from file", "takes a list of 2 values"],
                                   files={"craken.yaml": "optimizer:\n  betas: 0.9\n"}),
    "betas-three-values": Case(render("--set", "optimizer.betas=[0.9, 0.9, 0.9]"), ["takes a list of 2 values"]),
    # a file's batch triple written for 2 processes, read where 4 are: the process count is the way out
    "batch-of-another-process-count": Case(render("--num-processes", "4"),
                                           ["global batch 64 != micro_batch 4 x grad_accum 8 x 4 processes",
                                            "or run it on --num-processes 2"],
                                           files={"craken.yaml": "batch:\n  micro_batch: 4\n  grad_accum: 8\n"
                                                                 "  global_batch: 64\n"}),
}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, craken, workdir):
    case = CASES[name]
    for rel, content in case.files.items():
        path = workdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    for rel in case.dirs:
        (workdir / rel).mkdir()
    out_existed = (workdir / OUT).exists()
    before = snapshot(workdir)

    result = craken(*case.args, env=case.env)

    assert result.code == 2, result.output
    assert "Traceback" not in result.output
    assert result.out == ""
    message = result.err.strip()
    # exactly one error: one "craken:" line naming one problem (or one usage-error panel from the parser)
    if message.startswith("craken:"):
        assert len(message.splitlines()) == 1, message
        assert message.count("craken:") == 1 and "problems" not in message, message
    else:
        assert "Invalid value" in message and message.count("Error") == 1, message
    for needle in case.needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert snapshot(workdir) == before
    if not out_existed:
        assert not (workdir / OUT).exists()


def test_there_are_at_least_twenty_distinct_cases():
    assert len(CASES) >= 20
    assert len({tuple(c.args) + tuple(sorted(c.files.items())) + tuple(sorted(c.env.items())) + tuple(c.dirs)
                for c in CASES.values()}) == len(CASES)


def test_problems_are_all_reported_at_once(craken, workdir):
    (workdir / "craken.yaml").write_text('batch:\n  micro_batch: 0\n  grad_accum: "8"\nzero:\n  stgae: 1\n')
    result = craken(*render("--main-process-port", "0"))
    assert result.code == 2
    assert "4 problems" in result.err
    assert not (workdir / OUT).exists()


def test_subprocess_has_no_traceback(tmp_path, python):
    """The same through a real process: `python -m craken_cli`."""
    import subprocess

    proc = subprocess.run([python, "-m", "craken_cli", *render("--zero", "5")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.startswith("craken: invalid configuration: zero.stage = 5")
    assert not (tmp_path / OUT).exists()
