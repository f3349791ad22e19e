"""The launch command is a pure function of the spec: argv list, no shell, a clean environment."""

from craken_cli import launch
from craken_cli.options import SpecArgs, load_run
from craken_cli.hardware import detect, FakeProbe


def test_launch_does_not_inherit_a_parent_process_group(tmp_path):
    resolved, _ = load_run(SpecArgs(flags={"--cpu": True}), hardware=detect(FakeProbe()), environ={})
    parent = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "37385", "RANK": "0", "WORLD_SIZE": "1",
              "LOCAL_RANK": "0", "PATH": "/usr/bin", "HF_TOKEN": "hf_secret"}
    argv, env = launch.build(resolved.spec, tmp_path, parent, cpu_count=2)
    assert isinstance(argv, list) and argv[1:3] == ["-m", "accelerate.commands.launch"]
    assert argv[-3:] == ["-m", launch.LOOP_MODULE, str(tmp_path.absolute() / "run.yaml")]
    assert not {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"} & set(env)
    assert env["PATH"] == "/usr/bin" and env["DS_ACCELERATOR"] == "cpu" and env["OMP_NUM_THREADS"] == "1"
    assert launch.redact_env(env)["HF_TOKEN"] == "***"  # passed to the job, never shown


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
