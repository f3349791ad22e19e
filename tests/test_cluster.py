"""`craken cluster slurm|hostfile`: the generated sbatch script (read, `bash -n`, and run against fake
`srun`/`scontrol`/`craken` emulating two nodes) and the DeepSpeed hostfile (read back by DeepSpeed's
own parser). Run: pytest tests/test_cluster.py"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from craken_cli.launch import cluster
from craken_cli.app import main
from craken_cli.errors import CrakenError

BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="needs bash")


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A folder with a valid craken.yaml, as cwd, and no CRAKEN_* variables leaking in."""
    for name in list(os.environ):
        if name.startswith("CRAKEN_"):
            monkeypatch.delenv(name)
    (tmp_path / "craken.yaml").write_text("zero:\n  stage: 2\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run `craken ARGS` in-process, as the console script does: -> (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def slurm(project, capsys, *extra: str, nodes=2, gpus=4, port=29501) -> str:
    code, out, err = cli(["cluster", "slurm", "--nodes", str(nodes), "--gpus-per-node", str(gpus),
                          "--port", str(port), *extra], capsys)
    assert code == 0, err
    return out


# ---------------------------------------------------------------------------------------------
# the script, read


def test_script_header_and_per_node_command(project, capsys):
    text = slurm(project, capsys, "--partition", "gpu", "--time", "1-02:00:00", "--account", "proj-1",
                 "--job-name", "llm", "--cpus-per-task", "16", "--config", "craken.yaml")
    assert text.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=1-02:00:00", "#SBATCH --account=proj-1",
                 "#SBATCH --job-name=llm", "#SBATCH --cpus-per-task=16"):
        assert line in text.splitlines()
    # Main address: the first node of the allocation, exported for every task.
    assert 'MAIN_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in text
    assert "export MAIN_ADDR" in text
    # One task per node; rank and address expand inside each task's shell (single-quoted here).
    srun = text[text.index("\nsrun "):]
    assert "--ntasks-per-node=1" in srun and "--nodes=2" in srun
    assert """bash -c 'exec craken train --machine-rank "$SLURM_NODEID" --main-process-ip "$MAIN_ADDR" "$@"'""" in srun
    config = str(project / "craken.yaml")
    for piece in ("--num-machines 2", "--num-processes 8", "--main-process-port 29501",
                  f"--config {config}", "--launcher accelerate"):
        assert piece in srun
    assert Path(config).is_absolute()


@needs_bash
def test_script_is_valid_bash(project, capsys):
    text = slurm(project, capsys, "--", "--name", "it's $HOME", "--max-steps", "5")
    script = project / "job.sbatch"
    script.write_text(text)
    proc = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_pure_functions_agree_with_the_command(project, capsys):
    job = cluster.slurm_job(3, 2, Path("craken.yaml"), port=30000, train_args=["--zero", "3"])
    assert job.config == project / "craken.yaml" and job.num_processes == 6
    assert cluster.node_args(job) == ["--num-machines", "3", "--num-processes", "6", "--main-process-port", "30000",
                                      "--config", str(project / "craken.yaml"), "--launcher", "accelerate",
                                      "--zero", "3"]
    assert cluster.slurm_script(job) == slurm(project, capsys, "--", "--zero", "3", nodes=3, gpus=2, port=30000)


def test_default_run_file_is_craken_yaml(project, capsys):
    assert f"--config {project / 'craken.yaml'}" in slurm(project, capsys)


# ---------------------------------------------------------------------------------------------
# the script, run on two emulated nodes

FAKE_SRUN = r"""#!/bin/bash
# Emulates srun on a 2-node allocation: one task per node, run one after the other.
nodes=2
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do
  case "$1" in --nodes=*) nodes="${1#--nodes=}" ;; esac
  shift
done
for ((id = 0; id < nodes; id++)); do
  SLURM_NODEID=$id SLURM_PROCID=$id SLURMD_NODENAME="node-$id" "$@" || exit $?
done
"""
FAKE_SCONTROL = r"""#!/bin/bash
[ "$1" = show ] && [ "$2" = hostnames ] && [ "$3" = "node-[0-1]" ] || { echo "fake scontrol: $*" >&2; exit 1; }
echo node-0
echo node-1
"""
FAKE_CRAKEN = r"""#!/bin/bash
# Records its arguments, NUL-separated, one file per node.
printf '%s\0' "$@" > "$FAKE_RECORD_DIR/argv-$SLURM_NODEID"
"""


def _fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("craken", FAKE_CRAKEN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


@needs_bash
def test_script_runs_craken_on_each_node_with_its_rank(project, capsys):
    extra = ["--max-steps", "5", "--name", "it's a \"run\" $HOME;`x`"]
    text = slurm(project, capsys, "--port", "29777", "--", *extra)
    script = project / "job.sbatch"
    script.write_text(text)
    records = project / "records"
    records.mkdir()
    env = {**os.environ, "PATH": f"{_fake_bin(project)}{os.pathsep}{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": "node-[0-1]", "FAKE_RECORD_DIR": str(records)}
    env.pop("SLURM_NODEID", None)
    proc = subprocess.run([BASH, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "main node-0:29777" in proc.stderr

    argvs = {}
    for rank in (0, 1):
        raw = (records / f"argv-{rank}").read_bytes()
        argvs[rank] = raw.decode().split("\0")[:-1]
    config = str(project / "craken.yaml")
    for rank, argv in argvs.items():
        assert argv[0] == "train"
        opts = dict(zip(argv[1:-len(extra)][::2], argv[2:-len(extra)][::2]))
        assert opts == {"--machine-rank": str(rank), "--main-process-ip": "node-0", "--num-machines": "2",
                        "--num-processes": "8", "--main-process-port": "29777", "--config": config,
                        "--launcher": "accelerate"}
        assert argv[-len(extra):] == extra  # spaces, quotes and $ arrive untouched
    assert [a for a in argvs[0] if a != "0"] == [a for a in argvs[1] if a != "1"]


@needs_bash
def test_script_stops_without_a_main_address(project, capsys, tmp_path):
    script = project / "job.sbatch"
    script.write_text(slurm(project, capsys))
    env = {**os.environ, "PATH": f"{_fake_bin(project)}{os.pathsep}{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": "elsewhere", "FAKE_RECORD_DIR": str(tmp_path)}
    proc = subprocess.run([BASH, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert not list(tmp_path.glob("argv-*"))


# ---------------------------------------------------------------------------------------------
# writing files


def test_out_file_is_never_overwritten_without_force(project, capsys):
    target = project / "job.sbatch"
    code, out, _ = cli(["cluster", "slurm", "--nodes", "2", "--gpus-per-node", "1", "--out", str(target)], capsys)
    assert code == 0 and out == ""
    first = target.read_text()
    assert "#SBATCH --nodes=2" in first
    target.write_text("mine\n")
    code, out, err = cli(["cluster", "slurm", "--nodes", "3", "--gpus-per-node", "1", "--out", str(target)], capsys)
    assert code == 2 and "--force" in err and "Traceback" not in err
    assert target.read_text() == "mine\n"
    code, _, err = cli(["cluster", "slurm", "--nodes", "3", "--gpus-per-node", "1", "--out", str(target),
                        "--force"], capsys)
    assert code == 0, err
    assert "#SBATCH --nodes=3" in target.read_text()


# ---------------------------------------------------------------------------------------------
# bad input: exit 2, one message naming the flag, nothing written


BAD_SLURM = [
    (["--nodes", "0"], "--nodes"),
    (["--gpus-per-node", "0"], "--gpus-per-node"),
    (["--port", "80"], "--port"),
    (["--port", "70000"], "--port"),
    (["--time", "1:75"], "--time"),
    (["--time", "1:00:00:00"], "--time"),
    (["--time", "12:60:00"], "--time"),
    (["--time", "2-24:00:00"], "--time"),
    (["--time", "00:00:00"], "--time"),
    (["--time", "1-2-03:00:00"], "--time"),
    (["--partition", "gpu a100"], "--partition"),
    (["--job-name", "x\n#SBATCH --nodes=99"], "--job-name"),
    (["--cpus-per-task", "0"], "--cpus-per-task"),
    (["--config", "missing.yaml"], "--config"),
    (["--", "--machine-rank", "1"], "--machine-rank"),
    (["--", "--main-process-ip=10.0.0.1"], "--main-process-ip"),
    (["--", "-c", "other.yaml"], "-c"),
    # found in a first-contact audit: each was written into the job script, to fail on every node once queued
    (["--", "--zero", "7"], "--zero"),
    (["--", "--bogus-flag"], "No such option: --bogus-flag"),
    (["--", "--max-steps", "ten"], "the craken train arguments after --: Invalid value for '--max-steps'"),
    (["--", "--micro-batch", "3", "--global-batch", "100"], "micro_batch 3 x 8 processes"),
    (["--", "--set", "zero.stgae=3"], "did you mean 'zero.stage'"),
]


@pytest.mark.parametrize("args,flag", BAD_SLURM, ids=[" ".join(a) for a, _ in BAD_SLURM])
def test_bad_slurm_input(project, capsys, args, flag):
    target = project / "job.sbatch"
    base = {"--nodes": "2", "--gpus-per-node": "4"}
    if "--" not in args:
        for i in range(0, len(args), 2):
            base.pop(args[i], None)
    argv = ["cluster", "slurm", *[x for kv in base.items() for x in kv], "--out", str(target), *args]
    code, out, err = cli(argv, capsys)
    assert code == 2
    assert err.startswith("craken: ") and flag in err and "Traceback" not in err
    assert out == "" and not target.exists()


def test_all_slurm_problems_reported_at_once():
    with pytest.raises(CrakenError) as info:
        cluster.slurm_job(0, 0, Path("x.yaml"), port=1, time="bad")
    assert len(info.value.problems) == 4


def test_run_file_is_validated_for_the_total_world_size(project, capsys):
    (project / "craken.yaml").write_text("batch:\n  micro_batch: 4\n  global_batch: 12\n")
    code, out, err = cli(["cluster", "slurm", "--nodes", "2", "--gpus-per-node", "4"], capsys)
    assert code == 2 and "global" in err and "8 processes" in err and out == ""
    # extra train arguments may change the batch, so the file alone is not judged then
    code, out, err = cli(["cluster", "slurm", "--nodes", "2", "--gpus-per-node", "4", "--",
                          "--global-batch", "64"], capsys)
    assert code == 0, err


def test_run_file_asking_for_cpu_is_refused(project, capsys):
    (project / "craken.yaml").write_text("cluster:\n  use_cpu: true\n")
    code, out, err = cli(["cluster", "slurm", "--nodes", "2", "--gpus-per-node", "4"], capsys)
    assert code == 2 and "use_cpu" in err and out == ""


def test_a_flags_only_run_needs_no_run_file(tmp_path, monkeypatch, capsys):
    """Issue 21: `cluster slurm` refused a run given by flags alone."""
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(["cluster", "slurm", "--nodes", "2", "--gpus-per-node", "4", "--time", "25:00",
                          "--", "--zero", "2", "--max-steps", "100"], capsys)
    assert code == 0, err
    assert "--config" not in out and "#SBATCH --time=25:00" in out and "no run file" in out
    assert "--num-machines 2 --num-processes 8 --main-process-port 29500 --launcher accelerate" in out
    assert "--zero 2 --max-steps 100" in out


@pytest.mark.parametrize("value", ["00:30:00", "48:00:00", "1-00:00:00", "7-23:59:59", "0-00:00:01",
                                   "25:00", "90", "1:00", "2-12", "2-12:30", "UNLIMITED"])
def test_good_times(value):
    assert cluster.time_problem(value) is None


# ---------------------------------------------------------------------------------------------
# hostfile


def test_hostfile_to_stdout(capsys):
    code, out, err = cli(["cluster", "hostfile", "node1:8", "node2.example.org", "10.0.0.3:2", "--slots", "4"], capsys)
    assert code == 0, err
    lines = [line for line in out.splitlines() if not line.startswith("#")]
    assert lines == ["node1 slots=8", "node2.example.org slots=4", "10.0.0.3 slots=2"]


def test_hostfile_is_read_by_deepspeed(tmp_path, capsys):
    runner = pytest.importorskip("deepspeed.launcher.runner")
    target = tmp_path / "hostfile"
    code, _, err = cli(["cluster", "hostfile", "worker-0:4", "worker-1:4", "--out", str(target)], capsys)
    assert code == 0, err
    assert dict(runner.fetch_hostfile(str(target))) == {"worker-0": 4, "worker-1": 4}


def test_hostfile_out_not_overwritten(tmp_path, capsys):
    target = tmp_path / "hostfile"
    target.write_text("mine\n")
    code, _, err = cli(["cluster", "hostfile", "a:1", "--out", str(target)], capsys)
    assert code == 2 and "--force" in err and target.read_text() == "mine\n"
    code, _, err = cli(["cluster", "hostfile", "a:1", "--out", str(target), "--force"], capsys)
    assert code == 0 and "a slots=1" in target.read_text()


BAD_HOSTS = [
    (["a:1", "A:2"], "twice"),
    (["node1:4", "node1"], "twice"),
    (["a:0"], "slots"),
    (["a:-1"], "slots"),
    (["a:x"], "slots"),
    (["a:"], "slots"),
    (["a"], "--slots"),
    (["a", "--slots", "0"], "--slots"),
    (["bad_host:1"], "hostname"),
    (["--", "-a:1"], "hostname"),
    (["a:\u00b2"], "slots"),
    (["n\u00f6de:1"], "hostname"),
    (["a..b:1"], "hostname"),
    (["300.1.1.1:1"], "hostname"),
    (["fe80::1"], "hostname"),
    ([":4"], "hostname"),
]


@pytest.mark.parametrize("args,word", BAD_HOSTS, ids=[" ".join(a) for a, _ in BAD_HOSTS])
def test_bad_hostfile_input(tmp_path, capsys, args, word):
    target = tmp_path / "hostfile"
    code, out, err = cli(["cluster", "hostfile", "--out", str(target), *args], capsys)
    assert code == 2
    assert err.startswith("craken: ") and word in err and "Traceback" not in err
    assert out == "" and not target.exists()


# ---------------------------------------------------------------------------------------------
# as installed


def test_console_script_exit_code_and_light_import(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "craken_cli", "cluster", "slurm", "--nodes", "0",
                           "--gpus-per-node", "1"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--nodes" in proc.stderr
    probe = "import sys, craken_cli.commands.cluster; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120).stdout
    assert out.strip() == "False"
