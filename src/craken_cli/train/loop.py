"""The training loop, one process per GPU (or CPU process), started by `accelerate launch`:

    accelerate launch --config_file RUN/accelerate.yaml -m craken_cli.train.loop RUN/run.yaml \
        [--resume-from RUN/checkpoints/step_N]

It reads the same run file that rendered the DeepSpeed JSON, so batch sizes, accumulation and
precision cannot disagree. `Trainer.run` is the recipe: setup, data, model, engine (train/engine.py:
the plain Accelerate engine or DeepSpeed), resume, the step loop, validation, checkpoints, finish.
Accelerate owns processes and data sharding. Only each machine's first process writes metrics and
progress; the main process writes `final/`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..runfolder import EXIT_CODES, TENSORBOARD, metrics_file, oom_marker

PROCESS_START = time.time()

# Dense bf16 peak of common GPUs, for MFU (datasheet, without sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0,
               "V100": 125.0, "4090": 165.0, "3090": 71.0}


def peak_flops(device_name: str) -> float | None:
    for key, tflops in PEAK_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


def flops_per_token(model_config, params_non_embedding: int, seq_len: int) -> int:
    """6 N (forward + backward matmuls) + 12 L H S (attention scores), as in gpu-baseline.md."""
    layers = getattr(model_config, "num_hidden_layers", 0)
    hidden = getattr(model_config, "hidden_size", 0)
    return 6 * params_non_embedding + 12 * layers * hidden * seq_len


class StopRequest:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit non-zero."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        # torchrun starts each worker in its own session, so a kill of the launcher's process group
        # never reaches the workers: one whose launcher died stops as if sent SIGTERM, instead of
        # training on unsupervised (and racing the next run for the same run folder).
        import threading

        parent = os.getppid()
        threading.Thread(target=self._watch_parent, args=(parent,), daemon=True).start()

    def _handle(self, signum, frame):
        self.signum = signum

    def _watch_parent(self, parent: int) -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        self.signum = self.signum or signal.SIGTERM


def _jsonl(path: Path):
    fh = open(path, "a", encoding="utf-8", buffering=1)

    def write(record: dict) -> None:
        fh.write(json.dumps(record) + "\n")

    return write, fh


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m craken_cli.train.loop",
                                     description="One process of a craken run (started by `craken train`).")
    parser.add_argument("run_file", type=Path, help="RUN/run.yaml (run-machine<R>.yaml on machine R)")
    parser.add_argument("--resume-from", default=None, help="checkpoint folder this launch continues from")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    run_file = args.run_file.resolve()
    run_dir = run_file.parent
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from ..config.sources import build_spec, file_layer
    from .checkpoint import DiskFull

    spec = build_spec([file_layer(run_file)]).spec
    from ..noise import quiet_known_noise

    quiet_known_noise(bool(spec.cluster.use_cpu))
    trainer = Trainer(spec, run_file, resume_from=args.resume_from)
    try:
        return trainer.run()
    except DiskFull as exc:  # raised on every process at once, before anything was left half-written
        if int(os.environ.get("RANK", "0")) == 0:
            print(exc, file=sys.stderr, flush=True)
        return EXIT_CODES["disk_full"]
    except Exception as exc:
        if not _is_oom(exc):
            from ..launch.launcher import record_error

            record_error(exc)  # the rank and the last line of this error, for craken's one message
            raise
        # Leave a marker for `craken train --auto`, which relaunches with the next strategy.
        rank = int(os.environ.get("RANK", "0"))
        (run_dir / oom_marker(rank)).write_text(json.dumps({"step": trainer.step, "rank": rank}))
        print(f"craken: out of GPU memory at step {trainer.step} on rank {rank}: {str(exc).splitlines()[0]}",
              file=sys.stderr, flush=True)
        return EXIT_CODES["out_of_memory"]


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


@dataclass
class Position:
    """Where the run is: optimizer steps done, epoch, micro-batches of this epoch consumed per process."""
    step: int = 0
    epoch: int = 0
    micro: int = 0


class Window:
    """The losses since the last log line (kept on the device: no host sync per step) and the timing."""

    def __init__(self, device):
        import torch

        self.loss_sum = torch.zeros((), device=device)
        self.count = 0
        self.restart()

    def add(self, loss) -> None:
        self.loss_sum += loss.detach().float()
        self.count += 1

    def clear_loss(self) -> None:
        self.loss_sum.zero_()
        self.count = 0

    def restart(self) -> None:
        self.start = time.time()
        self.steps = 0


class Trainer:
    """One process of a run: setup -> data -> model -> engine -> resume -> train -> finish, in `run`."""

    def __init__(self, spec, run_file: Path, resume_from: str | None = None):
        self.spec = spec
        self.run_file = run_file  # run.yaml, or run-machine<R>.yaml in a folder the machines share
        self.run_dir = run_file.parent
        self.resume_from = resume_from
        self.step = 0  # last optimizer step started, for the out-of-memory report
        self.resumed = None  # the TrainState this launch resumed from
        # Seconds from process start at which each start-up phase ended (metrics "end" line): where
        # launch-to-first-step goes (imports, data, model build, engine set-up, first step).
        self.startup: dict[str, float] = {}
        self.write = None  # the metrics writer, on each machine's first process
        self.progress = None
        self.last_good: dict = {"loss": None, "lr": None}
        self.first_step_s = None
        self.states_pending = False
        self.model_record: dict = {}  # what setup_model converted and compiled (modeling.ready_for_training)

    def run(self) -> int:
        from accelerate.utils import set_seed

        from . import data, modeling
        from .engine import make_engine

        spec = self.spec
        self.stop = StopRequest()
        quiet_libraries()
        self.setup_accelerator()
        self.startup["imports_s"] = _since_start()
        set_seed(spec.train.seed)
        self.tokenizer = modeling.load_tokenizer(spec)
        train_dl, eval_dl = self.setup_data()
        self.data_fingerprint = data.fingerprint(spec)  # once: each checkpoint records it
        self.startup["data_s"] = _since_start()
        model = self.setup_model()
        self.startup["model_s"] = _since_start()
        self.engine = make_engine(spec, self.accelerator)
        self.model, self.train_dl, self.eval_dl = self.engine.prepare(model, train_dl, eval_dl)
        self.startup["prepare_s"] = _since_start()
        self.setup_device()
        position = self.resume()
        self.open_metrics(position)
        exit_code, position = self.train(position)
        return self.finish(exit_code, position)

    # --- setup -------------------------------------------------------------------------------------

    def setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import (DataLoaderConfiguration, GradientAccumulationPlugin, InitProcessGroupKwargs,
                                      ProjectConfiguration)

        spec = self.spec
        # On CPU processes accelerate finds no backend by itself and would run each process alone.
        handlers = [InitProcessGroupKwargs(backend="gloo")] if spec.cluster.use_cpu else []
        self.accelerator = Accelerator(
            kwargs_handlers=handlers,
            # A window may span an epoch's end, so every optimizer step gets the whole global batch
            # (accelerate's default steps early on what is left of the window at each epoch's end).
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=spec.grad_accum,
                                                                    sync_with_dataloader=False),
            # streaming: each process reads its own shards of the stream (not batches sent from the first)
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                      dispatch_batches=False if spec.data.streaming else None),
            log_with=None if spec.logging.report_to == "none" else spec.logging.report_to,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir),
                                                logging_dir=str(self.run_dir / TENSORBOARD)),
        )
        # Each machine's first process logs (metrics, progress) into the run folder, its own file on
        # machines of rank > 0; the losses are reduced over all processes, so every log has the same numbers.
        self.is_main = self.accelerator.is_local_main_process
        if spec.cluster.num_machines > 1:
            self.check_shared_run_folder()
        if spec.logging.report_to != "none":
            self.accelerator.init_trackers(spec.output.name, config={
                "zero_stage": spec.zero.stage, "micro_batch": spec.batch.micro_batch, "grad_accum": spec.grad_accum,
                "lr": spec.optimizer.lr})

    def check_shared_run_folder(self) -> None:
        blind = machines_not_sharing(self.accelerator, self.run_dir)
        if not blind:
            return
        if self.is_main:
            print(f"craken: machine(s) {', '.join(map(str, blind))} do not see what machine 0 wrote into the run "
                  f"folder {self.run_dir}: a checkpoint is one folder that every process writes its shards "
                  "into, so the machines of a job need one run folder on a filesystem they all mount (NFS, "
                  "Lustre, ...): set --output-dir there", file=sys.stderr, flush=True)
        raise SystemExit(2)

    def setup_data(self):
        """(train loader, eval loader or None), refusing data too small for one step."""
        import torch

        from . import data

        spec = self.spec
        if spec.data.streaming:
            return self.stream_data(), None
        built = self.build_data()
        if len(built.rows) == 0:
            if self.accelerator.is_main_process:
                print(f"craken: the data set gives no {spec.data.seq_len}-token row ({built.report()}): add data, "
                      "or raise --seq-len when its prompts fill it", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_CODES["bad_input"])
        source, eval_built = self.build_eval_data(built.format)
        self.data_record = {"format": built.format, "samples": built.samples, "rows": len(built.rows),
                            "cache": built.cache, "skipped": built.skipped, "eval": source.describe()}
        if eval_built is not None:
            train_blocks, eval_blocks = built.rows, (eval_built.rows if len(eval_built.rows) else None)
            used = eval_built.report().removeprefix("data: ")
        else:
            train_blocks, eval_blocks = data.train_eval_split(built.rows, source.fraction, spec.train.seed)
            used = f"{len(eval_blocks) if eval_blocks is not None else 0} of {len(built.rows)} rows"
        self.data_record["eval_rows"] = len(eval_blocks) if eval_blocks is not None else 0
        if self.accelerator.is_local_main_process:
            print(f"craken: eval rows from {source.describe()} ({used})", file=sys.stderr, flush=True)
        train_blocks.set_format("torch")
        gen = torch.Generator().manual_seed(spec.train.seed)
        train_dl = torch.utils.data.DataLoader(
            train_blocks, batch_size=spec.batch.micro_batch, shuffle=True, drop_last=True, generator=gen,
            collate_fn=collate, num_workers=spec.data.num_workers, pin_memory=not spec.cluster.use_cpu)
        eval_dl = None
        if eval_blocks is not None:
            eval_blocks.set_format("torch")
            eval_dl = torch.utils.data.DataLoader(eval_blocks, batch_size=spec.batch.micro_batch, shuffle=False,
                                                  collate_fn=collate)
        if len(train_dl) // self.accelerator.num_processes == 0:
            raise SystemExit(f"craken: {len(train_blocks)} training blocks are fewer than one micro-batch per "
                             "process: add data, lower --micro-batch or --seq-len")
        return train_dl, eval_dl

    def stream_data(self):
        """`--streaming`: a loader over rows made while training (no eval split, no length)."""
        import torch

        from . import data

        try:
            rows, fmt = data.stream_rows(self.spec, self.tokenizer)
        except data.DataError as exc:
            if self.accelerator.is_main_process:
                print(f"craken: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_CODES["bad_input"]) from None
        self.data_record = {"format": fmt, "streaming": True}
        return torch.utils.data.DataLoader(rows.with_format("torch"), batch_size=self.spec.batch.micro_batch,
                                           drop_last=True, collate_fn=collate)

    def build_data(self):
        """The packed rows (train/data.prepared); a data problem is one message from the first process, exit 2."""
        from . import data

        try:
            built = data.prepared(self.spec, self.tokenizer, self.accelerator)
        except data.DataError as exc:
            if self.accelerator.is_main_process:
                print(f"craken: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_CODES["bad_input"]) from None
        if self.accelerator.is_local_main_process:
            data.print_report(built)
        return built

    def build_eval_data(self, fmt: str):
        """(where the eval rows come from, the eval split's rows or None); a problem as build_data's."""
        from . import data

        try:
            source = data.eval_source(self.spec)
            built = data.prepared_eval(self.spec, self.tokenizer, self.accelerator, source, fmt)
        except data.DataError as exc:
            if self.accelerator.is_main_process:
                print(f"craken: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_CODES["bad_input"]) from None
        return source, built

    def setup_model(self):
        """Build or load the model in the engine's dtype, record what export needs, convert, compile."""
        from . import checkpoint, modeling

        spec, acc = self.spec, self.accelerator
        model = modeling.load_model(spec, self.tokenizer, modeling.init_device(spec, acc.device))
        self.final_dtype = modeling.saved_dtype(spec)
        checkpoint.write_model_meta(acc, self.run_dir, model, self.tokenizer, self.final_dtype)
        self.n_params, n_embedding = parameter_counts(model)
        self.flops_per_token = flops_per_token(model.config, self.n_params - n_embedding, spec.data.seq_len)
        model, self.model_record = modeling.ready_for_training(model, spec)
        return model

    def setup_device(self) -> None:
        import torch

        self.device = self.accelerator.device
        self.on_gpu = self.device.type == "cuda"
        self.device_name = torch.cuda.get_device_name(self.device) if self.on_gpu else "cpu"
        self.peak = peak_flops(self.device_name) if self.on_gpu else None
        self.world = self.accelerator.num_processes
        spec = self.spec
        self.tokens_per_step = spec.batch.micro_batch * spec.grad_accum * spec.data.seq_len * self.world

    def resume(self) -> Position:
        """Where this launch starts: the --resume-from checkpoint, or after a restart of the worker
        group (--max-restarts) the newest good one."""
        from . import checkpoint

        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
            # The launch's own checkpoint is older than what the run saved since, or pruned by
            # keep_checkpoints once it saved again.
            latest, _ = checkpoint.latest_checkpoint(self.run_dir)
            if latest and (not self.resume_from
                           or checkpoint.saved_step(latest) > checkpoint.saved_step(Path(self.resume_from))):
                self.resume_from = str(latest)
            if self.is_main:
                print(f"craken: worker group restarted; resuming from {self.resume_from or 'the start'}", flush=True)
        if not self.resume_from:
            return Position()
        state = self.engine.load(Path(self.resume_from), self.spec.batch.micro_batch)
        self.resumed = state
        # Checkpoints are taken at window ends; accelerate's restored micro-step count is of the saved
        # run's accumulation, which a resume at another micro-batch changes.
        self.accelerator.step = 0
        if self.is_main:
            print(f"craken: resumed from {self.resume_from} at step {state.step}", flush=True)
        return Position(state.step, state.epoch, state.batch_in_epoch)

    def open_metrics(self, position: Position) -> None:
        """The metrics file and progress display of each machine's first process; the start line."""
        spec = self.spec
        dtypes = self.engine.precision_record()
        # DeepSpeed makes its optimizer states in its first step: measured then, on a fresh run
        self.states_pending = dtypes["optimizer_state_dtype"] is None and position.step == 0
        if not self.is_main:
            return
        from ..report.progress import ProgressReporter

        self.write, self.metrics_fh = _jsonl(self.run_dir / metrics_file(spec.cluster.machine_rank))
        if position.step == 0:
            self.write({"event": "start", "strategy": strategy_name(spec), "num_processes": self.world,
                        "precision": spec.precision, "model_params": self.n_params,
                        "flops_per_token": self.flops_per_token, "seq_len": spec.data.seq_len,
                        "micro_batch": spec.batch.micro_batch, "grad_accum": spec.grad_accum,
                        "global_batch": spec.train_batch_size, "max_steps": spec.train.max_steps,
                        "device": self.device_name, "data": self.data_record, **dtypes,
                        "final_dtype": str(self.final_dtype).split(".")[-1], **self.model_record})
        else:
            self.write({"event": "resume", "step": position.step, "num_processes": self.world})
        self.progress = ProgressReporter(spec.train.max_steps, spec.logging.steps_per_print)
        self.progress.start()

    # --- train -------------------------------------------------------------------------------------

    def train(self, position: Position) -> tuple[int, Position]:
        """The step loop; (exit code, where it stopped)."""
        import torch

        from . import checkpoint

        spec, acc = self.spec, self.accelerator
        self.t_start = time.time()
        if position.step == 0 and spec.train.eval_every and self.eval_dl is not None:
            self.log_eval(0)  # the starting point, so a falling eval loss is visible from the first step
        self.model.train()
        self.window = Window(self.device)
        if self.resumed is not None:  # the losses since the last line logged before the checkpoint
            self.window.loss_sum, self.window.count = checkpoint.partial_loss(self.resumed, acc, self.device)
        if self.on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        exit_code, done = 0, position.step >= spec.train.max_steps
        while not done:
            self.train_dl.set_epoch(position.epoch)
            loader = acc.skip_first_batches(self.train_dl, position.micro) if position.micro else self.train_dl
            for batch in loader:
                loss = self.micro_step(batch)
                self.window.add(loss)
                position.micro += 1
                if not acc.sync_gradients:
                    continue
                position.step += 1
                exit_code, done = self.after_step(position)
                if done:
                    break
            else:
                position.epoch += 1
                position.micro = 0
        return exit_code, position

    def micro_step(self, batch):
        """One micro-batch: forward, backward and, at an accumulation boundary, the optimizer step; the
        loss. (benchmarks/planner_bench.py measures memory through this same call.)"""
        with self.accelerator.accumulate(self.model):
            loss = self.model(**batch).loss
            self.engine.backward_step(loss)
        return loss

    def after_step(self, position: Position) -> tuple[int, bool]:
        """Checks, logging, evaluation and checkpoints after optimizer step `position.step`:
        (exit code, whether the run stops here)."""
        spec, step = self.spec, position.step
        self.step = step
        self.window.steps += 1
        if self.states_pending and self.is_main:
            self.write({"event": "precision", "step": step, **self.engine.precision_record()})
        self.states_pending = False
        stop_requested, nonfinite = self.check(step)
        if self.first_step_s is None:
            self.first_step_s = time.time() - PROCESS_START
        if nonfinite and spec.train.on_nonfinite == "stop":
            if self.is_main:
                msg = nonfinite_advice(step, self.last_good, spec)
                self.progress.log(msg)
                self.write({"event": "nonfinite", "step": step, "message": msg})
            return EXIT_CODES["nonfinite"], True
        if nonfinite:  # skip: the engine already skipped the update (non-finite gradient norm)
            if self.is_main:
                self.progress.log(f"step {step}: non-finite loss or gradient norm, update skipped (on_nonfinite=skip)")
            self.window.clear_loss()
        if step % spec.logging.steps_per_print == 0 or step == spec.train.max_steps:
            self.log_train(step)
        elif self.is_main:
            self.progress.update(step)  # the bar moves every step; the numbers come every steps_per_print
        if spec.train.eval_every and step % spec.train.eval_every == 0 and step != spec.train.max_steps:
            self.log_eval(step)
        if stop_requested:
            path = self.engine.save(self.run_dir, self.train_state(position), spec.train.keep_checkpoints,
                                    self.partial_loss())
            if self.is_main:
                self.progress.log(f"craken: stopped by signal at step {step}; checkpoint {path}. "
                                  f"Resume with: craken train --config {self.run_file} --resume auto")
            return EXIT_CODES["sigint" if self.stop.signum == signal.SIGINT else "sigterm"], True
        if spec.train.save_every and step % spec.train.save_every == 0 and step != spec.train.max_steps:
            self.engine.save(self.run_dir, self.train_state(position), spec.train.keep_checkpoints,
                             self.partial_loss())
        return 0, step >= spec.train.max_steps

    def check(self, step: int) -> tuple[bool, bool]:
        """(stop requested on any process, non-finite loss or gradient norm on any process).

        Every `check_every` steps, and before every checkpoint, one small all-reduce (and the only
        host sync besides logging), so all processes stop at one step. The gradient norm is what
        keeps a checkpoint from holding weights a non-finite update has just reached: DeepSpeed's own
        bf16 overflow check is off unless on_nonfinite is skip (render.deepspeed_config); fp16:
        nonfinite_update."""
        import torch

        spec = self.spec
        check_every = max(1, min(spec.logging.steps_per_print, 10))
        saves_now = spec.train.save_every and step % spec.train.save_every == 0
        if not (step % check_every == 0 or step >= spec.train.max_steps or step == 1 or saves_now):
            return False, False
        bad = nonfinite_update(self.window.loss_sum, self.engine.grad_norm(), spec.precision)
        flags = torch.stack([torch.tensor(float(self.stop.signum != 0), device=self.device), bad.float()])
        stop, nonfinite = self.accelerator.reduce(flags, reduction="sum").tolist()
        return bool(stop), bool(nonfinite)

    def log_train(self, step: int) -> None:
        """A train line: the loss reduced over all processes (collective), speed, lr, norm, memory."""
        import torch

        window, spec = self.window, self.spec
        if not window.count:
            return
        mean_loss = float(self.accelerator.reduce(window.loss_sum / window.count, reduction="mean"))
        tps = self.tokens_per_step * window.steps / max(time.time() - window.start, 1e-9)
        lr, norm = self.engine.lr(), self.engine.grad_norm()
        norm = float(norm) if norm is not None else None
        on_gpu, device = self.on_gpu, self.device
        record = {
            "step": step, "time_s": round(time.time() - self.t_start, 3), "loss": mean_loss, "lr": lr,
            "grad_norm": norm if norm is None or math.isfinite(norm) else None,
            "tokens": step * self.tokens_per_step, "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / self.world,
            "mfu": (tps / self.world * self.flops_per_token / self.peak) if self.peak else None,
            "gpu_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None,
            "gpu_mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if on_gpu else None,
        }
        self.last_good = {"loss": mean_loss, "lr": lr, "grad_norm": record["grad_norm"]}
        if self.is_main:
            self.write(record)
            self.progress.update(step, record)
            if spec.logging.report_to != "none":
                self.accelerator.log({k: v for k, v in record.items() if v is not None}, step=step)
        window.clear_loss()
        window.restart()

    # --- validate ----------------------------------------------------------------------------------

    def evaluate(self) -> float | None:
        """Mean eval loss over `eval_batches` micro-batches and all processes (collective)."""
        import torch

        if self.eval_dl is None:
            return None
        self.model.eval()
        total = torch.zeros((), device=self.device)
        count = 0
        with torch.no_grad():
            for index, batch in enumerate(self.eval_dl):
                if index >= self.spec.train.eval_batches:
                    break
                total += self.model(**batch).loss.detach().float()
                count += 1
        self.model.train()
        return float(self.accelerator.reduce(total / max(count, 1), reduction="mean"))

    def log_eval(self, step: int) -> None:
        value = self.evaluate()
        if value is not None and self.is_main:
            self.write({"step": step, "time_s": round(time.time() - self.t_start, 3), "eval_loss": value})
            self.progress.log(f"eval step {step}: eval_loss {value:.4f}")
            if self.spec.logging.report_to != "none":
                self.accelerator.log({"eval_loss": value}, step=step)

    # --- save --------------------------------------------------------------------------------------

    def train_state(self, position: Position):
        from . import checkpoint

        spec = self.spec
        return checkpoint.TrainState(step=position.step, epoch=position.epoch, batch_in_epoch=position.micro,
                                     fp32_grad_accum=spec.fp32_grad_accum, zero_stage=spec.zero.stage,
                                     offload_optimizer=spec.offload.optimizer.device, data=self.data_fingerprint,
                                     **checkpoint.data_shape(spec))

    def partial_loss(self):
        """(loss sum, micro-batches) since the last log line: saved so a resume logs the same lines."""
        return self.window.loss_sum, self.window.count

    def finish(self, exit_code: int, position: Position) -> int:
        """The last eval, checkpoint and final model of a finished run; the end line; the process group
        taken down."""
        from . import checkpoint, fp8

        spec = self.spec
        final_dir = None
        if exit_code == 0 and self.eval_dl is not None:
            self.log_eval(position.step)
        if exit_code == 0 and spec.train.save_final:
            self.engine.save(self.run_dir, self.train_state(position), spec.train.keep_checkpoints)
            fp8.unconvert(self.accelerator.unwrap_model(self.model))  # final/ and its check logits: plain bf16
            final_dir = checkpoint.save_final(self.accelerator, self.model, self.tokenizer, self.run_dir, spec,
                                              check_batch=_check_batch(self.eval_dl or self.train_dl, self.device),
                                              dtype=self.final_dtype)
        if self.progress:
            self.progress.close()
        if self.is_main:
            self.write({"event": "end", "steps": position.step, "wall_s": round(time.time() - self.t_start, 3),
                        "first_step_s": self.first_step_s, "startup": self.startup,
                        "final_dir": str(final_dir) if final_dir else None, "exit_code": exit_code})
            self.metrics_fh.close()
        self.accelerator.wait_for_everyone()
        # Finishes the trackers and destroys the process group: with gloo, a process that exits with
        # its group alive can abort in teardown ("terminate called without an active exception").
        # Only on this path, where every process arrives: after an error, destroying could hang.
        self.accelerator.end_training()
        return exit_code


def _since_start() -> float:
    return round(time.time() - PROCESS_START, 2)


def parameter_counts(model) -> tuple[int, int]:
    """(all parameters, input embedding), counted under ZeRO-3's partitioning too (ds_numel)."""
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    weight = model.get_input_embeddings().weight
    return n_params, (weight.ds_numel if hasattr(weight, "ds_numel") else weight.numel())


def machines_not_sharing(accelerator, run_dir: Path) -> list[int]:
    """Collective: the machines whose processes do not see a file the first process writes into
    the run folder (machines hold equal numbers of processes, ranks in machine order)."""
    import secrets

    import torch
    from accelerate.utils import broadcast_object_list

    token = broadcast_object_list([secrets.token_hex(8) if accelerator.is_main_process else None])[0]
    probe = run_dir / f".craken-shared-{token}"
    if accelerator.is_main_process:
        probe.write_text(token)
    accelerator.wait_for_everyone()
    sees = accelerator.gather(torch.tensor([float(probe.is_file())], device=accelerator.device)).tolist()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE") or accelerator.num_processes)  # set by torchrun
    return sorted({rank // per_machine for rank, seen in enumerate(sees) if not seen})


def quiet_libraries() -> None:
    """Library progress bars and deprecation notes that say nothing about this run."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def collate(rows):
    """Rows -> a batch; text rows train on every token (labels are the inputs), supervised rows bring
    their own labels (-100 on prompts) and position ids (restarting at every packed sample)."""
    import torch

    batch = {key: torch.stack([r[key] for r in rows]) for key in rows[0]}
    batch.setdefault("labels", batch["input_ids"])
    return batch


def _check_batch(loader, device):
    """A fixed, small batch to compare the trained model's logits with the saved one's."""
    ds = loader.dataset if hasattr(loader, "dataset") else loader.base_dataloader.dataset
    import datasets
    import torch

    if isinstance(ds, (datasets.IterableDataset, torch.utils.data.IterableDataset)):  # --streaming
        return next(iter(loader))["input_ids"][:1, :32].to(device)
    ids = ds[0]["input_ids"][:32].unsqueeze(0).to(device)
    return ids


def strategy_name(spec) -> str:
    """The run's strategy under the planner's one name (metrics.jsonl's "strategy")."""
    from ..plan.memory import strategy_name as name_of

    return name_of(spec.zero.stage, spec.offload.optimizer.device, spec.offload.param.device,
                   spec.model.activation_checkpointing, spec.model.compile)


def nonfinite_update(loss_sum, grad_norm, precision: str):
    """A 0-dim bool tensor: whether this process saw a non-finite loss, or a non-finite gradient norm
    that reaches the weights. Under fp16 the loss scaler (DeepSpeed's, or the GradScaler of the plain
    engine) skips an overflowed step itself and reports its norm as inf: routine while the scale
    settles in the first steps, and the weights never see it, so there only the loss counts."""
    import torch

    bad = ~torch.isfinite(loss_sum)
    if grad_norm is not None and precision != "fp16":
        bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm, dtype=torch.float32, device=loss_sum.device))
    return bad


def nonfinite_advice(step: int, last: dict, spec) -> str:
    return (f"craken: non-finite loss or gradient norm at step {step} (last finite loss {last.get('loss')}, "
            f"lr {last.get('lr')}, grad norm {last.get('grad_norm')}). Lower --lr (now {spec.optimizer.lr:g}), "
            f"keep gradient clipping on (--clip, now {spec.optimizer.clip:g}), prefer bf16 over fp16, or set "
            "--set train.on_nonfinite=skip to skip such steps. Resume from the last checkpoint with --resume auto.")


def exit_without_teardown(code: int) -> None:
    """Leave a finished process without interpreter teardown. By now the run's files are closed and
    the process group is destroyed, but the C++ state DeepSpeed and gloo leave behind can abort the
    finalization ("terminate called without an active exception", SIGABRT after the last Python
    line; seen in 1 of 6 loaded 2-process CPU runs of ZeRO-3 with optimizer offload), which turns a
    finished run into a failed one."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())
