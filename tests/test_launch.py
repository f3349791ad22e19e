"""The launch command is a pure function of the spec: argv list, no shell, a clean environment."""

from craken_cli.launch import command as launch
from craken_cli.config.options import SpecArgs, load_run
from craken_cli.plan.hardware import detect, FakeProbe


def test_launch_does_not_inherit_a_parent_process_group(tmp_path):
    resolved, _ = load_run(SpecArgs(flags={"--cpu": True}), hardware=detect(FakeProbe()), environ={})
    parent = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "37385", "RANK": "0", "WORLD_SIZE": "1",
              "LOCAL_RANK": "0", "PATH": "/usr/bin", "HF_TOKEN": "hf_secret"}
    argv, env = launch.build(resolved.spec, tmp_path, parent, cpu_count=2)
    assert isinstance(argv, list) and argv[1:3] == ["-m", launch.LAUNCHER_MODULE]
    assert argv[-3:] == ["-m", launch.LOOP_MODULE, str(tmp_path.absolute() / "run.yaml")]
    assert not {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"} & set(env)
    assert env["PATH"] == "/usr/bin" and env["DS_ACCELERATOR"] == "cpu" and env["OMP_NUM_THREADS"] == "1"
    assert launch.redact_env(env)["HF_TOKEN"] == "***"  # passed to the job, never shown


def test_the_checkpoint_to_resume_from_is_an_argument_of_the_worker_module(tmp_path):
    """It travelled in CRAKEN_RESUME_FROM: a channel nobody sees, which a shell (or DeepSpeed's env
    file) could carry into a later run."""
    from craken_cli.train import loop

    resolved, _ = load_run(SpecArgs(flags={"--cpu": True}), hardware=detect(FakeProbe()), environ={})
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    argv, env = launch.build(resolved.spec, tmp_path, {}, cpu_count=2, resume_from=ckpt)
    run_file = str(tmp_path.absolute() / "run.yaml")
    assert argv[-5:] == ["-m", launch.LOOP_MODULE, run_file, "--resume-from", str(ckpt)]
    assert not any(name.startswith("CRAKEN_") for name in env)
    argv, _ = launch.build(resolved.spec, tmp_path, {}, cpu_count=2)
    assert argv[-3:] == ["-m", launch.LOOP_MODULE, run_file]

    seen = {}

    class Recorder(loop.Trainer):
        def run(self):
            seen.update(resume_from=self.resume_from, run_file=self.run_file)
            return 0

    (tmp_path / "run.yaml").write_text("cluster:\n  use_cpu: true\n  num_processes: 1\nprecision: bf16\n")
    original, loop.Trainer = loop.Trainer, Recorder
    try:
        assert loop.main([run_file, "--resume-from", str(ckpt)]) == 0
    finally:
        loop.Trainer = original
    assert seen == {"resume_from": str(ckpt), "run_file": tmp_path.absolute() / "run.yaml"}


def test_secrets_are_redacted_by_word_and_the_rest_is_shown():
    env = {"HF_TOKEN": "a", "WANDB_API_KEY": "b", "AWS_SECRET_ACCESS_KEY": "c", "GITHUB_AUTHTOKEN": "d",
           "DB_PASSWORD": "e", "GOOGLE_APPLICATION_CREDENTIALS": "f", "hf_token": "g",
           "TOKENIZERS_PARALLELISM": "false", "KEYBOARD_LAYOUT": "us", "PATH": "/usr/bin"}
    shown = launch.redact_env(env)
    assert {k for k, v in shown.items() if v == "***"} == {"HF_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY",
                                                           "GITHUB_AUTHTOKEN", "DB_PASSWORD",
                                                           "GOOGLE_APPLICATION_CREDENTIALS", "hf_token"}


def test_a_stopped_run_has_time_to_write_its_checkpoint(tmp_path):
    """torchrun SIGKILLs workers 30 s after relaying Ctrl-C unless told otherwise; a user's value stays."""
    resolved, _ = load_run(SpecArgs(flags={"--cpu": True}), hardware=detect(FakeProbe()), environ={})
    _, env = launch.build(resolved.spec, tmp_path, {}, cpu_count=2)
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == str(launch.STOP_GRACE_S) and launch.STOP_GRACE_S >= 300
    _, env = launch.build(resolved.spec, tmp_path, {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "45"}, cpu_count=2)
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "45"


def test_pdsh_launch_keeps_its_env_file_in_the_run_folder_fresh_and_without_secrets(tmp_path):
    """accelerate appends the whole environment to DeepSpeed's env file and DeepSpeed exports every
    line on every machine: at ./.deepspeed_env it grew each launch (an old CRAKEN_RESUME_FROM came
    back in a later run) and held tokens."""
    from craken_cli.plan.hardware import GPU

    hw = detect(FakeProbe(gpus=[GPU(i, "NVIDIA H100 80GB HBM3", 80 << 30, 79 << 30, (9, 0)) for i in range(8)]),
                environ={})
    flags = {"--num-machines": 2, "--num-processes": 16, "--main-process-ip": "10.0.0.1", "--launcher": "deepspeed",
             "--zero": 2}
    resolved, _ = load_run(SpecArgs(flags=flags), hardware=hw, environ={})
    run = tmp_path / "run"
    _, env = launch.build(resolved.spec, run, {"HF_TOKEN": "hf_x", "PATH": "/usr/bin", "NCCL_DEBUG": "INFO"}, 16)
    assert env["DS_ENV_FILE"] == str(run.absolute() / ".deepspeed_env")
    assert "HF_TOKEN" not in env and env["NCCL_DEBUG"] == "INFO"

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    for d, text in ((home, "NCCL_IB_HCA=mlx5\nWANDB_API_KEY=k\n"), (cwd, "NCCL_SOCKET_IFNAME=eth0\n")):
        d.mkdir()
        (d / ".deepspeed_env").write_text(text)
    run.mkdir()
    target = run / ".deepspeed_env"
    target.write_text("CRAKEN_RESUME_FROM=/old/step_00000004\n")  # what an earlier launch appended
    launch.seed_deepspeed_env(target, home, cwd)
    assert target.read_text() == "NCCL_IB_HCA=mlx5\nNCCL_SOCKET_IFNAME=eth0\n"
    assert target.stat().st_mode & 0o077 == 0


def test_gpu_workers_grow_allocator_segments_unless_the_user_chose_a_setting():
    from craken_cli.launch.command import GPU_ALLOCATOR_ENV, allocator_env

    assert allocator_env({}) == GPU_ALLOCATOR_ENV
    assert allocator_env({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}) == {}
    assert allocator_env({"PYTORCH_ALLOC_CONF": "max_split_size_mb:512"}) == {}
