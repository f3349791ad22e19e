"""`craken launch` without training: the workers' argv, the plan handed to a script, the host's
TrainingArguments reconciliation, the launcher's failure words, and every bad input (exit 2, nothing written)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from craken_cli.launch import command as launch, launcher, userscript
from craken_cli.plan.hardware import FakeProbe, detect
from craken_cli.config.options import SpecArgs, load_run

RUN_FLAGS = ["--zero", "1", "--micro-batch", "4", "--grad-accum", "2", "--max-steps", "6", "--cpu"]


def spec_of(flags: dict):
    resolved, _ = load_run(SpecArgs(flags={"--cpu": True, **flags}), hardware=detect(FakeProbe()), environ={})
    return resolved.spec


@pytest.fixture
def script(workdir) -> Path:
    path = workdir / "train.py"
    path.write_text("print('training')\n")
    return path


def test_the_workers_run_the_script_under_the_host_after_the_run_file(tmp_path):
    spec = spec_of({"--zero": 2})
    target = userscript.Target(script="train.py", args=("--epochs", "1", "--name=a b"))
    argv, env = launch.build(spec, tmp_path, {}, cpu_count=2, script_args=target.host_args)
    assert argv[1:3] == ["-m", launch.LAUNCHER_MODULE]
    assert argv[argv.index("--config_file") + 1] == str(tmp_path.absolute() / "accelerate.yaml")
    tail = argv[argv.index(launch.SCRIPT_HOST_MODULE) - 1:]
    assert tail == ["-m", launch.SCRIPT_HOST_MODULE, str(tmp_path.absolute() / "run.yaml"),
                    str(Path("train.py").absolute()), "--epochs", "1", "--name=a b"]  # untouched, no shell
    module = userscript.Target(module="pkg.train", args=("--x",))
    argv, _ = launch.build(spec, tmp_path, {}, cpu_count=2, script_args=module.host_args)
    assert argv[-4:] == [str(tmp_path.absolute() / "run.yaml"), "-m", "pkg.train", "--x"]
    told = launch.with_failure_file(argv, "/tmp/f.json")
    assert told[1:5] == ["-m", launch.LAUNCHER_MODULE, "--failure-file", "/tmp/f.json"] and told[5:] == argv[3:]



FAKE_TOKEN = "hf_" + "FAKE" * 8 + "xy"


def test_dry_run_masks_the_credentials_in_the_scripts_arguments(craken, workdir, script):
    """Found in a first-contact audit: `craken launch --dry-run train.py --hub_token hf_...` printed the token
    (and a URL's password) in the argv it shows; the launched argv keeps them, the script needs them."""
    args = [str(script), "--hub_token", FAKE_TOKEN, f"--db=postgres://u:FAKEpw0123@db/x"]
    result = craken("launch", "--dry-run", *RUN_FLAGS, *args)
    assert result.code == 0, result.output
    assert json.loads(result.out)["argv"][-3:] == ["--hub_token", "hf_***", "--db=postgres://***@db/x"]
    train = craken("train", "--dry-run", "--cpu", "--", f"--some_launcher_arg={FAKE_TOKEN}")
    assert train.code == 0 and "--some_launcher_arg=hf_***" in train.out, train.output
    assert FAKE_TOKEN not in result.output + train.output and "FAKEpw0123" not in result.output
    assert list(workdir.iterdir()) == [script]

def test_dry_run_shows_the_plan_the_script_gets_and_writes_nothing(craken, workdir, script):
    shown = json.loads(craken("config", "show", "--json", *RUN_FLAGS).out)["spec"]
    result = craken("launch", "--dry-run", *RUN_FLAGS, str(script), "--my-flag", "1", "--lr", "5", "--dry-run",
                    env={"HF_TOKEN": "hf_secret"})
    assert result.code == 0, result.output
    data = json.loads(result.out)
    assert data["argv"][-6:] == [str(script), "--my-flag", "1", "--lr", "5", "--dry-run"]  # the script's, unparsed
    assert data["env"]["CRAKEN_PLAN_LR"] == str(shown["optimizer"]["lr"])
    env = data["env"]
    assert env["CRAKEN_PLAN_MICRO_BATCH"] == str(shown["batch"]["micro_batch"]) == "4"
    assert env["CRAKEN_PLAN_GRAD_ACCUM"] == str(shown["batch"]["grad_accum"]) == "2"
    assert env["CRAKEN_PLAN_GLOBAL_BATCH"] == str(4 * 2 * shown["cluster"]["num_processes"])
    assert env["CRAKEN_PLAN_MAX_STEPS"] == "6" and env["CRAKEN_PLAN_DS_OPTIMIZER"] == "0"
    assert "hf_secret" not in result.output
    ds = json.loads(data["files"]["ds_config.json"])
    assert "optimizer" not in ds and "scheduler" not in ds  # the script brings its own
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_micro_batch_size_per_gpu"] == 4
    assert not (workdir / "runs").exists()
    kept = json.loads(craken("launch", "--dry-run", "--ds-optimizer", *RUN_FLAGS, str(script)).out)
    assert {"optimizer", "scheduler"} <= set(json.loads(kept["files"]["ds_config.json"]))
    assert kept["env"]["CRAKEN_PLAN_DS_OPTIMIZER"] == "1"


def test_offloaded_optimizer_keeps_deepspeeds_optimizer_which_alone_steps_it():
    spec = spec_of({"--zero": 2, "--offload-optimizer": "cpu"})
    assert userscript.keeps_ds_optimizer(spec, None)
    assert not userscript.keeps_ds_optimizer(spec_of({"--zero": 2, "--offload-optimizer": "none"}), None)
    assert not userscript.keeps_ds_optimizer(spec, False)  # asked for: the script's own (DeepSpeed may refuse it)


@pytest.mark.parametrize("case", ["missing", "folder", "device", "shell", "syntax", "module", "package", "conflict",
                                  "conflict_eq", "deepspeed", "deepspeed_config", "auto"])
def test_bad_input_is_refused_before_launch_with_exit_2_and_nothing_written(craken, workdir, case):
    (workdir / "pkg").mkdir()
    (workdir / "pkg" / "__init__.py").write_text("")
    (workdir / "train.sh").write_text("echo hi\n")
    (workdir / "broken.py").write_text("def f(:\n")
    (workdir / "ok.py").write_text("pass\n")
    args, expected = {
        "missing": (["nope.py"], "nope.py does not exist"),
        "folder": (["pkg"], "is a folder"),
        "device": (["/dev/null"], "/dev/null is not a regular file"),
        "shell": (["train.sh"], "not a .py file"),
        "syntax": (["broken.py"], "not valid Python (line 1"),
        "module": (["-m", "no_such_module_xyz"], "module no_such_module_xyz is not found"),
        "package": (["-m", "pkg"], "package without __main__.py"),
        "conflict": (["ok.py", "--per_device_train_batch_size", "8"],
                     "argument --per_device_train_batch_size 8 contradicts craken's plan, per_device_train_batch_size=4"),
        "conflict_eq": (["ok.py", "--max_grad_norm=1.0"], "change the plan with --clip"),
        "deepspeed": (["ok.py", "--deepspeed", "ds.json"], "--deepspeed ds.json: craken launch renders the DeepSpeed "
                      "config itself"),
        "deepspeed_config": (["ok.py", "--deepspeed", "--deepspeed_config=ds.json"],  # the deepspeed launcher's line
                             "--deepspeed_config ds.json: craken launch renders"),
        "auto": (["--auto", "ok.py"], "pass --model"),
    }[case]
    before = sorted(p.name for p in workdir.iterdir())
    if args[0] == "--auto":
        result = craken("launch", *RUN_FLAGS, *args)
    else:
        result = craken("launch", *RUN_FLAGS, *args)
    assert result.code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in workdir.iterdir()) == before  # no runs/ folder


def test_a_script_argument_that_agrees_with_the_plan_is_accepted(tmp_path):
    spec = spec_of({"--micro-batch": 4, "--lr": 1e-3})
    target = userscript.Target(script="t.py", args=("--per_device_train_batch_size", "4", "--learning_rate=0.001",
                                                    "--bf16", "--output_dir", "elsewhere", "--epochs", "3"))
    assert userscript.arg_problems(spec, tmp_path, target, False, False) == []


# --- the host's TrainingArguments plan --------------------------------------------------------------------

@pytest.fixture
def args_class():
    """A subclass, patched alone: TrainingArguments itself stays as transformers made it for other tests."""
    from transformers import TrainingArguments

    from craken_cli.launch import script_host

    @dataclasses.dataclass
    class ScriptArgs(TrainingArguments):
        learning_rate: float = 2e-5  # a subclass with defaults of its own (trl's SFTConfig has some)

    plan = userscript.trainer_plan(spec_of({"--zero": 2, "--micro-batch": 4, "--grad-accum": 3, "--clip": 0.5,
                                            "--lr": 1e-3, "--max-steps": 7, "--seed": 5, "--precision": "fp32"}),
                                   Path("/runs/x"), keep_optimizer=False, keep_scheduler=False)
    script_host.patch_training_arguments(ScriptArgs, plan)
    return ScriptArgs


def test_values_the_script_leaves_at_their_defaults_take_the_plan(args_class):
    args = args_class(report_to="none")
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.max_grad_norm) == (4, 3, 0.5)
    assert (args.learning_rate, args.max_steps, args.seed, args.adam_beta2) == (1e-3, 7, 5, 0.95)
    assert (args.bf16, args.fp16, args.use_cpu) == (False, False, True)
    assert str(args.lr_scheduler_type.value) == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert args.output_dir == "/runs/x/output" and args.warmup_steps == 7  # the plan's 10, capped at max_steps


def test_a_value_set_against_the_plan_stops_with_the_flag_to_change(args_class):
    from craken_cli.launch.script_host import PlanConflict

    with pytest.raises(PlanConflict) as info:
        args_class(report_to="none", per_device_train_batch_size=8, gradient_accumulation_steps=3, learning_rate=0.1)
    text = str(info.value)
    assert "per_device_train_batch_size=8 against craken's plan, per_device_train_batch_size=4" in text
    assert "--micro-batch" in text and "--lr" in text and "gradient_accumulation_steps" not in text
    ok = args_class(report_to="none", output_dir="mine", logging_steps=3, seed=9)  # fill-only values stay the script's
    assert (ok.output_dir, ok.logging_steps, ok.seed) == ("mine", 3, 9)
    with pytest.raises(PlanConflict, match="renders the DeepSpeed config itself"):
        args_class(report_to="none", deepspeed="ds.json")


def test_each_conflict_reaches_craken_launch_as_one_problem_even_with_a_semicolon(tmp_path, monkeypatch, capsys):
    """The worker records the list; craken launch prints one line per problem, never a joined string split again."""
    from types import SimpleNamespace

    from craken_cli.launch import process
    from craken_cli.launch.script_host import PlanConflict
    from craken_cli.runfolder import EXIT_CODES

    problems = ["the script sets a=1 against craken's plan, a=2: drop it; or set --a", "the script sets b=3: drop it"]
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    assert launcher.record_error(PlanConflict(problems), PlanConflict(problems).problems)
    failure = SimpleNamespace(error_file_data=json.loads((tmp_path / "error.json").read_text()), exitcode=2,
                              timestamp=0)
    record = launcher.failure_record(0, failure)
    assert record["problems"] == problems
    prepared = SimpleNamespace(request=SimpleNamespace(script=SimpleNamespace(shown="train.py")), run_dir=tmp_path)
    process.script_verdict(prepared, EXIT_CODES["bad_input"], [record])
    printed = capsys.readouterr().err
    assert "craken: train.py was stopped before training (2 problems):" in printed
    assert [line for line in printed.splitlines() if line.startswith("  - ")] == [f"  - {p}" for p in problems]


def test_with_deepspeeds_scheduler_the_trainer_gets_no_schedule_of_its_own():
    plan = userscript.trainer_plan(spec_of({"--zero": 2, "--offload-optimizer": "cpu"}), Path("r"), keep_optimizer=True,
                                   keep_scheduler=True)
    assert "lr_scheduler_type" not in plan and plan["warmup_steps"].must_agree


# --- the launcher's words -----------------------------------------------------------------------------------

def test_the_failure_named_is_the_first_recorded_exception_not_its_followers():
    records = [{"rank": 0, "exitcode": 1, "message": "RuntimeError: Connection closed by peer", "time": 10.5},
               {"rank": 1, "exitcode": 1, "message": "ValueError: boom", "time": 10.2},
               {"rank": 2, "exitcode": -15, "message": "", "time": 10.0}]
    ordered = sorted(records, key=launcher.first_cause)
    assert launcher.failure_summary(ordered) == "rank 1 exited with code 1: ValueError: boom (and 2 more ranks)"
    assert launcher.failure_summary([records[2]]) == "rank 2 was killed by signal 15"
    unrecorded = [{"rank": 0, "exitcode": -15, "message": "", "time": 3.0}, {"rank": 1, "exitcode": 3, "message": "", "time": 3.0}]
    assert sorted(unrecorded, key=launcher.first_cause)[0]["rank"] == 1  # it exited; torchrun then stopped rank 0
    assert launcher.worker_exit_code(-15) == 143 and launcher.worker_exit_code(3) == 3
    assert launcher.last_line("Traceback\n  x\nKeyError: 'a'\n") == "KeyError: 'a'"


def test_script_options_are_read_as_hf_argument_parser_writes_them():
    assert userscript.parsed_options(["pos", "--a", "1", "--b=2", "--flag", "--c-d", "x", "--"]) == \
        {"a": "1", "b": "2", "flag": "true", "c_d": "x"}
    assert userscript.read_scalar("yes", True) is True and userscript.read_scalar("x", 3) is None


def test_hf_argument_parser_scripts_are_judged_by_what_differs_from_the_defaults(args_class):
    """HfArgumentParser passes every field; a value on the command line equal to its default is caught
    before launch from the script's arguments (arg_problems), not here."""
    from transformers import HfArgumentParser

    from craken_cli.launch.script_host import PlanConflict

    (args,) = HfArgumentParser((args_class,)).parse_args_into_dataclasses(args=["--report_to", "none"])
    assert (args.per_device_train_batch_size, args.learning_rate) == (4, 1e-3)
    with pytest.raises(PlanConflict, match="learning_rate=0.1"):
        HfArgumentParser((args_class,)).parse_args_into_dataclasses(args=["--report_to", "none", "--learning_rate", "0.1"])


def test_make_targets_launch_the_script_when_script_is_set(tmp_path):
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("no make")
    root = Path(__file__).resolve().parents[1]

    def dry(*args):
        return subprocess.run(["make", "-s", "-n", "-C", str(root), *args], capture_output=True, text=True).stdout

    assert dry("craken_ds2").strip() == "craken train --preset ds_zero2 --name ds2"
    assert dry("craken_ds2", "SCRIPT=train.py", "SCRIPT_ARGS=--epochs 1", "ARGS=--lr 1e-4").strip() == \
        "craken launch --preset ds_zero2 --name ds2 --lr 1e-4 train.py --epochs 1"
    assert dry("test_craken_ds3_auto", "SCRIPT=-m pkg.train").strip() == \
        "craken launch --preset ds_zero3 --auto --test --name ds3_auto -m pkg.train"


def test_launch_test_is_a_short_run_of_the_same_plan_in_its_own_folder(craken, script):
    data = json.loads(craken("launch", "--dry-run", "--test", "--zero", "2", "--max-steps", "500", str(script)).out)
    assert data["env"]["CRAKEN_PLAN_MAX_STEPS"] == "20" and data["env"]["CRAKEN_PLAN_RUN_DIR"].endswith("default-test")


@pytest.mark.parametrize("body, code, recorded", [
    ("raise ValueError('bad row 3')", 1, "ValueError: bad row 3"),
    ("import no_such_module_for_this_test", 1, "ModuleNotFoundError: No module named 'no_such_module_for_this_test'"),
    ("import sys; sys.exit(3)", 3, "SystemExit: 3"),
    ("raise KeyboardInterrupt", 130, None),
    ("import sys; assert sys.argv[1:] == ['--a', '1'] and __name__ == '__main__'", 0, None),
])
def test_the_host_runs_the_script_as_main_and_records_how_it_failed(tmp_path, monkeypatch, capsys, body, code, recorded):
    from craken_cli.launch import script_host

    script = tmp_path / "user_train.py"
    script.write_text(body + "\n")
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert script_host.run_target(str(script), None, ["--a", "1"]) == code
    if recorded is None:
        assert not error_file.exists()
        return
    data = json.loads(error_file.read_text())["message"]
    assert data["message"] == recorded and isinstance(data["extraInfo"]["time"], float)
    err = capsys.readouterr().err
    if code == 1:  # the traceback starts in the user's script, not in runpy or the host
        assert err.startswith("[rank 0] Traceback") and "user_train.py" in err
        assert "runpy" not in err and "script_host" not in err


def test_craken_train_refuses_a_script_after_the_double_dash(craken, workdir, script):
    result = craken("train", "--dry-run", "--", str(script))
    assert result.code == 2 and "run your script with craken launch" in result.output
    assert craken("train", "--dry-run", "--", "--main_process_port", "29601").code == 0  # launcher flags still pass


def test_every_problem_of_a_launch_is_reported_at_once(craken, workdir):
    (workdir / "runs" / "default").mkdir(parents=True)
    (workdir / "runs" / "default" / "metrics.jsonl").write_text("{}\n")  # an earlier run's folder
    result = craken("launch", *RUN_FLAGS, "nope.py", "--gradient_accumulation_steps", "5")
    assert result.code == 2
    for part in ("nope.py does not exist", "already holds a run", "--gradient_accumulation_steps 5 contradicts"):
        assert part in result.output


# --- script shapes: raw DeepSpeed, the deepspeed launcher's --local_rank, odd paths ---------------------------

RAW_DEEPSPEED = '''
import argparse
import deepspeed
parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", type=int, default=-1)
parser = deepspeed.add_config_arguments(parser)
args = parser.parse_args()
engine, optimizer, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
'''


@pytest.mark.parametrize("source, raw", [
    (RAW_DEEPSPEED, True),  # DeepSpeedExamples: the optimizer comes from the JSON
    (RAW_DEEPSPEED.replace("model_parameters=", "optimizer=torch.optim.AdamW(model.parameters()), x="), False),
    ("import deepspeed\ne, o, _, _ = deepspeed.initialize(args, model, opt, params)\n", False),  # positional optimizer
    ("import deepspeed\ne, o, _, _ = deepspeed.initialize(**kwargs)\n", False),  # cannot tell: the script's own
    ("from accelerate import Accelerator\nmodel = Accelerator().prepare(model)\n", False),
    ("def f(:\n", False),
])
def test_a_raw_deepspeed_script_without_an_optimizer_keeps_the_jsons(source, raw):
    assert userscript.engine_without_optimizer(source) is raw
    spec = spec_of({"--zero": 1})
    assert userscript.keeps_ds_optimizer(spec, None, engine_without_optimizer=raw) is raw
    assert userscript.keeps_ds_optimizer(spec, False, engine_without_optimizer=True) is False  # --no-ds-optimizer


def test_a_raw_deepspeed_script_or_module_gets_deepspeeds_optimizer_in_its_json(craken, workdir, monkeypatch):
    (workdir / "ds_train.py").write_text(RAW_DEEPSPEED)
    (workdir / "dspkg").mkdir()
    (workdir / "dspkg" / "__init__.py").write_text("")
    (workdir / "dspkg" / "__main__.py").write_text(RAW_DEEPSPEED)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for target in (["ds_train.py"], ["-m", "dspkg"]):
        data = json.loads(craken("launch", "--dry-run", *RUN_FLAGS, *target, "--deepspeed").out)  # its bare switch
        assert "optimizer" in json.loads(data["files"]["ds_config.json"]), target
        assert data["env"]["CRAKEN_PLAN_DS_OPTIMIZER"] == "1"


def test_a_modules_file_is_read_without_running_its_packages_init(craken, workdir, monkeypatch):
    # find_spec("sidepkg.train") would import sidepkg: its __init__.py would run inside the CLI process.
    marker = workdir / "imported"
    (workdir / "sidepkg" / "tools").mkdir(parents=True)
    for init in (workdir / "sidepkg" / "__init__.py", workdir / "sidepkg" / "tools" / "__init__.py"):
        init.write_text(f"open({str(marker)!r}, 'w').close()\nraise RuntimeError('no CUDA here')\n")
    (workdir / "sidepkg" / "tools" / "train.py").write_text(RAW_DEEPSPEED)
    (workdir / "sidepkg" / "tools" / "__main__.py").write_text("print('main')\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    target = userscript.Target(module="sidepkg.tools.train")
    assert userscript.target_problems(target) == []
    assert userscript.script_source(target) == RAW_DEEPSPEED
    assert userscript.script_source(userscript.Target(module="sidepkg.tools")) == "print('main')\n"
    assert userscript.target_problems(userscript.Target(module="sidepkg.nope"))[0].startswith(
        "module sidepkg.nope is not found")
    assert userscript.target_problems(userscript.Target(module="sidepkg"))[0].endswith("(sidepkg.train?)")
    data = json.loads(craken("launch", "--dry-run", *RUN_FLAGS, "-m", "sidepkg.tools.train").out)
    assert "optimizer" in json.loads(data["files"]["ds_config.json"])  # the module's source was read
    assert not marker.exists() and "sidepkg" not in sys.modules


def test_only_script_options_naming_a_deepspeed_file_are_refused():
    assert userscript.own_config_problems(["--deepspeed", "--steps", "3", "--deepspeed"]) == []
    for args, shown in ((["--deepspeed", "--deepspeed_config", "ds.json"], "--deepspeed_config ds.json"),
                        (["--deepspeed=z2.json"], "--deepspeed z2.json"),
                        (["--deepscale-config", "old.json"], "--deepscale-config old.json")):
        (problem,) = userscript.own_config_problems(args)
        assert problem.startswith(f"the script gets {shown}: craken launch renders the DeepSpeed config itself")


def test_local_rank_is_passed_as_the_deepspeed_launcher_would_to_a_parser_that_declares_it():
    assert userscript.local_rank_args(["-h", "--local_rank"], ["--steps", "2"], "1") == ["--local_rank=1"]
    assert userscript.local_rank_args(["--local-rank"], [], "0") == ["--local-rank=0"]
    assert userscript.local_rank_args(["--local_rank", "--local-rank"], ["--local-rank=3"], "1") == []  # given
    assert userscript.local_rank_args(["--steps"], [], "1") == []  # a parser of its own, without the option
    assert userscript.local_rank_args(["--local_rank"], [], None) == []  # not under a launcher


def test_the_hosts_parsers_read_local_rank_from_the_environment(monkeypatch):
    import argparse

    from craken_cli.launch import script_host

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", argparse.ArgumentParser.parse_known_args)
    monkeypatch.setattr(sys, "argv", ["train.py", "--steps", "2"])
    monkeypatch.setenv("LOCAL_RANK", "1")
    script_host.patch_argparse_local_rank()
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--steps", type=int)
    assert vars(parser.parse_args()) == {"local_rank": 1, "steps": 2}
    assert parser.parse_args(["--steps", "3"]).local_rank == -1  # an explicit list is the script's business
    plain = argparse.ArgumentParser()
    plain.add_argument("--steps", type=int)
    assert vars(plain.parse_args()) == {"steps": 2}


class FakeDeepSpeed:
    """deepspeed's module as far as the host's patch sees it: initialize with DeepSpeed's signature."""

    def __init__(self):
        self.calls = []

    def initialize(self, args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
                   lr_scheduler=None, distributed_port=29500, mpu=None, dist_init_required=None, collate_fn=None,
                   config=None, mesh_param=None, config_params=None):
        self.calls.append({"args": args, "optimizer": optimizer, "config": config, "config_params": config_params})
        return "engine"


def test_a_raw_deepspeed_scripts_initialize_gets_the_rendered_json_and_nothing_else(tmp_path):
    from types import SimpleNamespace

    from craken_cli.launch.script_host import PlanConflict, patch_deepspeed_initialize

    ds_path, ds_config = tmp_path / "ds_config.json", {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW"}}
    fake = FakeDeepSpeed()
    patch_deepspeed_initialize(fake, ds_path, ds_config)
    namespace = SimpleNamespace(local_rank=0, deepspeed=True, deepspeed_config=None)
    assert fake.initialize(namespace, "model", model_parameters=[]) == "engine"
    assert fake.calls[-1]["config"] == str(ds_path) and fake.calls[-1]["args"] is namespace
    fake.initialize(model="model", config=str(tmp_path / "." / "ds_config.json"))  # craken's own file, named
    assert fake.calls[-1]["config"] == str(tmp_path / "." / "ds_config.json")
    calls = len(fake.calls)
    with pytest.raises(PlanConflict) as info:
        fake.initialize(SimpleNamespace(deepspeed_config="user_ds.json"), "model", config_params={"zero": 0})
    assert [p.split(":")[0] for p in info.value.problems] == [
        "the script gives deepspeed.initialize its own DeepSpeed config (config_params",
        "the script gives deepspeed.initialize its own DeepSpeed config (args.deepspeed_config (--deepspeed_config)"]
    assert "'user_ds.json'" in info.value.problems[1] and len(fake.calls) == calls  # DeepSpeed never called

    bare = FakeDeepSpeed()  # a JSON without DeepSpeed's optimizer (--no-ds-optimizer)
    patch_deepspeed_initialize(bare, ds_path, {"train_micro_batch_size_per_gpu": 4})
    with pytest.raises(PlanConflict, match="no optimizer and craken's JSON holds none.*--ds-optimizer"):
        bare.initialize(model="model", model_parameters=[])
    bare.initialize(model="model", optimizer="its own")
    assert bare.calls[-1]["config"] == str(ds_path)
    plain = FakeDeepSpeed()  # ZeRO 0 on GPUs: plain Accelerate, no JSON at all
    patch_deepspeed_initialize(plain, ds_path, {})
    with pytest.raises(PlanConflict, match="renders no DeepSpeed config .* pass --zero 1, 2 or 3"):
        plain.initialize(model="model", optimizer="its own")
    # accelerate's own call (accelerator.prepare) passes the JSON as accelerate filled it: left alone
    exec("engine = init(model='model', config_params={'filled': 1})", {"__name__": "accelerate.accelerator",
                                                                       "init": bare.initialize})
    assert bare.calls[-1]["config_params"] == {"filled": 1} and bare.calls[-1]["config"] is None


def test_script_paths_with_spaces_and_script_flags_named_like_crakens_pass_untouched(craken, workdir):
    script = workdir / "my scripts" / "train me.py"
    script.parent.mkdir()
    script.write_text("print('training')\n")
    data = json.loads(craken("launch", "--dry-run", *RUN_FLAGS, str(script), "--zero", "3", "--micro-batch", "9").out)
    assert data["argv"][-5:] == [str(script), "--zero", "3", "--micro-batch", "9"]
    ds = json.loads(data["files"]["ds_config.json"])
    assert ds["zero_optimization"]["stage"] == 1 and ds["train_micro_batch_size_per_gpu"] == 4  # craken's flags only


def test_an_accelerate_scripts_loader_and_lr_are_checked_against_the_plan():
    assert userscript.prepare_problems([4, 16], [[1e-3, 1e-3]], 4, 1e-3) == []  # an eval loader may differ
    assert userscript.prepare_problems([], [], 4, 1e-3) == []  # a loader of batch_size=None (its own sampler)
    (batch,) = userscript.prepare_problems([8], [[1e-3]], 4, 1e-3)
    assert batch.startswith("the script's DataLoader gives batches of 8 against craken's plan, micro-batch 4:")
    (lr,) = userscript.prepare_problems([4], [[5e-5, 5e-5]], 4, 3e-4)
    assert "optimizer has lr 5e-05 against craken's plan, lr=0.0003" in lr and lr.endswith("--lr")


def test_the_hosts_prepare_check_reads_the_scripts_own_call_only(monkeypatch):
    """run_clm_no_trainer's shape: its own --per_device_train_batch_size (8) and --learning_rate (5e-5)
    defaults, which the JSON's micro-batch would never see."""
    import torch
    from accelerate.utils import DummyOptim

    from craken_cli.launch.script_host import PlanConflict, patch_accelerator_prepare

    class Accelerator:
        def prepare(self, *objects):
            return objects

    patch_accelerator_prepare(Accelerator, micro_batch=4, lr=1e-3, ds_config={})
    model = torch.nn.Linear(2, 1)
    data = torch.utils.data.TensorDataset(torch.zeros(16, 2))
    adamw = torch.optim.AdamW(model.parameters(), lr=5e-5)
    torch.optim.lr_scheduler.LambdaLR(adamw, lambda s: 0.1)  # warm-up: lr now 5e-6, its base stays 5e-5
    with pytest.raises(PlanConflict) as info:
        Accelerator().prepare(model, adamw, torch.utils.data.DataLoader(data, batch_size=8))
    assert [p.split(" against")[0] for p in info.value.problems] == [
        "the script's DataLoader gives batches of 8", "the script's optimizer has lr 5e-05"]
    ok = torch.optim.AdamW(model.parameters(), lr=1e-3)
    Accelerator().prepare(model, ok, torch.utils.data.DataLoader(data, batch_size=4),
                          torch.utils.data.DataLoader(data, batch_size=32))
    Accelerator().prepare(model, DummyOptim(model.parameters()), torch.utils.data.DataLoader(data, batch_size=4))
    Accelerator().prepare(torch.utils.data.DataLoader(data, batch_size=32))  # an eval loader alone
    Accelerator.split_batches, Accelerator.num_processes = True, 2  # a loader batch = both processes' micro-batches
    Accelerator().prepare(model, ok, torch.utils.data.DataLoader(data, batch_size=8))
    with pytest.raises(PlanConflict) as info:
        Accelerator().prepare(model, ok, torch.utils.data.DataLoader(data, batch_size=4))
    assert "micro-batch 4 x 2 processes (split_batches): build it with batch_size=" in info.value.problems[0]
    exec("init(model, adamw, loader)", {"__name__": "transformers.trainer", "init": Accelerator().prepare,
                                       "model": model, "adamw": adamw,
                                       "loader": torch.utils.data.DataLoader(data, batch_size=8)})  # the Trainer's


# --- accelerate's DummyOptim / DummyScheduler built whatever the plan -----------------------------------------

DUMMY_SCRIPT = '''
import torch
from accelerate import Accelerator
from accelerate.utils import DummyOptim, DummyScheduler
accelerator = Accelerator()
optimizer = DummyOptim(model.parameters(), lr=3e-4)
scheduler = DummyScheduler(optimizer, total_num_steps=100)
model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
'''

# accelerate's examples/by_feature/deepspeed_with_config_support.py: the placeholders only where the JSON has the block
ADAPTING_SCRIPT = '''
from accelerate.utils import DummyOptim, DummyScheduler
config = accelerator.state.deepspeed_plugin.deepspeed_config
optimizer_cls = torch.optim.AdamW if "optimizer" not in config else DummyOptim
optimizer = optimizer_cls(params, lr=lr)
if "scheduler" not in config:
    scheduler = get_scheduler("linear", optimizer)
else:
    scheduler = DummyScheduler(optimizer, total_num_steps=100)
scheduler = os.environ["CRAKEN_PLAN_DS_OPTIMIZER"] == "1" and DummyScheduler(optimizer)
'''


@pytest.mark.parametrize("source, use", [
    (DUMMY_SCRIPT, (True, True)),
    (ADAPTING_SCRIPT, (False, False)),
    (DUMMY_SCRIPT.replace("scheduler = DummyScheduler(optimizer, total_num_steps=100)\n", ""), (True, False)),
    # its own schedule through lr_scheduler_callable: no scheduler block needed
    (DUMMY_SCRIPT.replace("total_num_steps=100", "lr_scheduler_callable=make"), (True, False)),
    ("from accelerate.utils import DummyOptim as DO\ndef main():\n    opt = DO(params)\n", (True, False)),
    ("import accelerate\nopt = accelerate.utils.DummyOptim(params)\n", (True, False)),
    ("try:\n    import x\nexcept ImportError:\n    opt = DummyOptim(params)\n", (False, False)),
    ("opt = torch.optim.AdamW(params)\n", (False, False)),
    ("def f(:\n", (False, False)),
])
def test_dummy_optim_and_scheduler_built_whatever_the_plan_are_found(source, use):
    assert tuple(userscript.dummy_use(source)) == use


def test_a_dummy_optim_script_keeps_the_jsons_optimizer_and_a_dummy_scheduler_its_scheduler():
    spec = spec_of({"--zero": 2})
    both, optim_only = userscript.DummyUse(True, True), userscript.DummyUse(True, False)
    assert userscript.keeps_ds_optimizer(spec, None, dummy=both)
    assert userscript.keeps_ds_scheduler(spec, None, dummy=both)
    assert userscript.keeps_ds_optimizer(spec, None, dummy=optim_only)
    assert not userscript.keeps_ds_scheduler(spec, None, dummy=optim_only)  # accelerate allows no other beside it
    cfg = {"optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"}, "zero_optimization": {"stage": 2}}
    assert set(userscript.script_ds_config(cfg, True, False)) == {"optimizer", "zero_optimization"}
    assert set(userscript.script_ds_config(cfg, False, False)) == {"zero_optimization"}
    env = userscript.plan_env(spec, Path("runs/x"), True, False)
    assert (env["CRAKEN_PLAN_DS_OPTIMIZER"], env["CRAKEN_PLAN_DS_SCHEDULER"]) == ("1", "0")
    assert userscript.dummy_problems(spec, None, both) == [] and userscript.dummy_problems(spec, True, both) == []
    [problem] = userscript.dummy_problems(spec, False, optim_only)
    assert "accelerate's DummyOptim whatever the plan" in problem and "drop --no-ds-optimizer" in problem


def test_a_dummy_optim_script_or_ds_optimizer_without_a_deepspeed_json_is_refused_before_launch(tmp_path, monkeypatch):
    from craken_cli.errors import CrakenError
    from craken_cli.launch.prepare import TrainRequest, prepare
    from craken_cli.plan.hardware import GPU

    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text(DUMMY_SCRIPT)
    gpu = detect(FakeProbe(gpus=[GPU(0, "NVIDIA H100 80GB HBM3", 80 * 2**30, 79 * 2**30, (9, 0))]))
    for script, ds_optimizer, words in (
            ("train.py", None, "the script builds accelerate's DummyOptim and accelerate's DummyScheduler whatever"),
            ("plain.py", True, "--ds-optimizer keeps DeepSpeed's optimizer in the DeepSpeed config, and this plan")):
        (tmp_path / "plain.py").write_text("print('training')\n")
        request = TrainRequest(spec_args=SpecArgs(flags={"--zero": 0, "--model": "builtin:tiny"}),
                               script=userscript.Target(script=script), ds_optimizer=ds_optimizer)
        with pytest.raises(CrakenError) as refused:
            prepare(request, environ={}, hardware=gpu)
        [problem] = [p for p in refused.value.problems if "DeepSpeed config" in p]
        assert problem.startswith(words) and "pass --zero 1, 2 or 3" in problem and refused.value.exit_code == 2
    assert not (tmp_path / "runs").exists()


def test_a_dummy_optim_script_gets_the_jsons_optimizer_and_scheduler(craken, workdir):
    (workdir / "train.py").write_text(DUMMY_SCRIPT)
    data = json.loads(craken("launch", "--dry-run", *RUN_FLAGS, "train.py").out)
    assert {"optimizer", "scheduler"} <= set(json.loads(data["files"]["ds_config.json"]))
    assert (data["env"]["CRAKEN_PLAN_DS_OPTIMIZER"], data["env"]["CRAKEN_PLAN_DS_SCHEDULER"]) == ("1", "1")
    refused = craken("launch", "--no-ds-optimizer", *RUN_FLAGS, "train.py")
    assert refused.code == 2 and "drop --no-ds-optimizer" in refused.output and "Traceback" not in refused.output
    assert not (workdir / "runs").exists()
