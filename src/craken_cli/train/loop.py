"""The training loop, one process per GPU (or CPU process), started by `accelerate launch`:

    accelerate launch --config_file RUN/accelerate.yaml -m craken_cli.train.loop RUN/run.yaml

It reads the same run file that rendered the DeepSpeed JSON, so batch sizes, accumulation and
precision cannot disagree. DeepSpeed owns the optimizer and schedule (from the JSON), Accelerate
owns processes and data sharding. Only the main process writes metrics, plots and `final/`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

PROCESS_START = time.time()
NONFINITE_EXIT = 3  # a non-finite loss or gradient norm stopped the run (train.on_nonfinite=stop)

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
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m craken_cli.train.loop RUN/run.yaml", file=sys.stderr)
        return 2
    run_file = Path(argv[0]).resolve()
    run_dir = run_file.parent
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from ..sources import build_spec, file_layer

    spec = build_spec([file_layer(run_file)]).spec
    trainer = Trainer(spec, run_file)
    try:
        return trainer.run()
    except Exception as exc:
        if not _is_oom(exc):
            raise
        # Leave a marker for `craken train --auto`, which relaunches with the next strategy.
        rank = int(os.environ.get("RANK", "0"))
        (run_dir / f"{OOM_MARKER_PREFIX}{rank}.json").write_text(json.dumps({"step": trainer.step, "rank": rank}))
        print(f"craken: out of GPU memory at step {trainer.step} on rank {rank}: {str(exc).splitlines()[0]}",
              file=sys.stderr, flush=True)
        return OOM_EXIT_CODE


OOM_MARKER_PREFIX = "oom-rank"
TENSORBOARD_DIR = "tensorboard"  # RUN/tensorboard/<run name>/ holds the event files of --report-to tensorboard
OOM_EXIT_CODE = 4


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class Trainer:
    def __init__(self, spec, run_file: Path):
        self.spec = spec
        self.run_file = run_file  # run.yaml, or run-machine<R>.yaml in a folder the machines share
        self.run_dir = run_file.parent
        self.resume_from = os.environ.get("CRAKEN_RESUME_FROM") or None
        self.step = 0  # last optimizer step started, for the out-of-memory report

    def run(self) -> int:
        import torch
        from accelerate import Accelerator
        from accelerate.utils import (DataLoaderConfiguration, DummyOptim, DummyScheduler, InitProcessGroupKwargs,
                                      ProjectConfiguration, set_seed)

        from . import checkpoint, data, modeling

        spec = self.spec
        stop = StopRequest()
        quiet_libraries()
        # On CPU processes accelerate finds no backend by itself and would run each process alone.
        handlers = [InitProcessGroupKwargs(backend="gloo")] if spec.cluster.use_cpu else []
        accelerator = Accelerator(
            kwargs_handlers=handlers,
            gradient_accumulation_steps=spec.grad_accum,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            log_with=None if spec.logging.report_to == "none" else spec.logging.report_to,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir),
                                                logging_dir=str(self.run_dir / TENSORBOARD_DIR)),
        )
        # Each machine's first process logs (metrics, progress) into the run folder, its own file on
        # machines of rank > 0; the losses are reduced over all processes, so every log has the same numbers.
        is_main = accelerator.is_local_main_process
        blind = machines_not_sharing(accelerator, self.run_dir) if spec.cluster.num_machines > 1 else []
        if blind:
            if is_main:
                print(f"craken: machine(s) {', '.join(map(str, blind))} do not see what machine 0 wrote into the run "
                      f"folder {self.run_dir}: a checkpoint is one folder that every process writes its shards "
                      "into, so the machines of a job need one run folder on a filesystem they all mount (NFS, "
                      "Lustre, ...): set --output-dir there", file=sys.stderr, flush=True)
            raise SystemExit(2)
        # Seconds from process start at which each start-up phase ended (metrics "end" line): where
        # launch-to-first-step goes (imports, data, model build, engine set-up, first step).
        startup = {"imports_s": round(time.time() - PROCESS_START, 2)}
        set_seed(spec.train.seed)
        if spec.logging.report_to != "none":
            accelerator.init_trackers(spec.output.name, config={"zero_stage": spec.zero.stage,
                                                                "micro_batch": spec.batch.micro_batch,
                                                                "grad_accum": spec.grad_accum,
                                                                "lr": spec.optimizer.lr})

        tokenizer = modeling.load_tokenizer(spec)
        with accelerator.main_process_first():
            raw = data.load_raw(spec)
            blocks = data.pack(raw, tokenizer, spec.data.seq_len)
        startup["data_s"] = round(time.time() - PROCESS_START, 2)
        if len(blocks) == 0:
            raise SystemExit(f"craken: the data set gives no {spec.data.seq_len}-token block: "
                             "add text or lower --seq-len")
        train_blocks, eval_blocks = data.train_eval_split(blocks, spec.data.eval_fraction, spec.train.seed)
        train_blocks.set_format("torch")
        gen = torch.Generator().manual_seed(spec.train.seed)
        train_dl = torch.utils.data.DataLoader(
            train_blocks, batch_size=spec.batch.micro_batch, shuffle=True, drop_last=True, generator=gen,
            collate_fn=_collate, num_workers=spec.data.num_workers, pin_memory=not spec.cluster.use_cpu)
        eval_dl = None
        if eval_blocks is not None:
            eval_blocks.set_format("torch")
            eval_dl = torch.utils.data.DataLoader(eval_blocks, batch_size=spec.batch.micro_batch, shuffle=False,
                                                  collate_fn=_collate)
        if len(train_dl) // accelerator.num_processes == 0:
            raise SystemExit(f"craken: {len(train_blocks)} training blocks are fewer than one micro-batch per "
                             "process: add data, lower --micro-batch or --seq-len")

        model = modeling.load_model(spec, tokenizer, modeling.init_device(spec, accelerator.device))
        checkpoint.write_model_meta(accelerator, self.run_dir, model, tokenizer, spec.precision)
        n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
        emb = model.get_input_embeddings()
        n_emb = emb.weight.ds_numel if hasattr(emb.weight, "ds_numel") else emb.weight.numel()
        fpt = flops_per_token(model.config, n_params - n_emb, spec.data.seq_len)
        if spec.model.compile and not spec.cluster.use_cpu:
            modeling.compile_regions(model)
        startup["model_s"] = round(time.time() - PROCESS_START, 2)

        decay, no_decay = [], []
        for name, p in model.named_parameters():
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": spec.optimizer.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        plain = not spec.uses_deepspeed
        fp32_grad_accum = spec.fp32_grad_accum  # which DeepSpeed optimizer writes the checkpoints
        if plain:
            # No DeepSpeed: torch's fused AdamW on fp32 weights under bf16 autocast, the schedule
            # stepped here once per optimizer step (accelerate would step it once per process).
            o = spec.optimizer
            optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=True)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(spec))
            accelerator.register_for_checkpointing(scheduler)
        else:
            # DeepSpeed owns optimizer and schedule, built from the rendered JSON.
            optimizer = DummyOptim(groups, lr=spec.optimizer.lr)
            scheduler = DummyScheduler(optimizer, total_num_steps=spec.train.max_steps,
                                       warmup_num_steps=spec.schedule.warmup_steps)
        prepared = [model, optimizer, train_dl] + ([eval_dl] if eval_dl is not None else [])
        prepared += [] if plain else [scheduler]
        prepared = accelerator.prepare(*prepared)
        startup["prepare_s"] = round(time.time() - PROCESS_START, 2)
        model, optimizer, train_dl = prepared[:3]
        if eval_dl is not None:
            eval_dl = prepared[3]
        if not plain:
            scheduler = prepared[-1]
        grad_norm = None

        device = accelerator.device
        on_gpu = device.type == "cuda"
        device_name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
        peak = peak_flops(device_name) if on_gpu else None
        world = accelerator.num_processes
        tokens_per_step = spec.batch.micro_batch * spec.grad_accum * spec.data.seq_len * world

        state = checkpoint.TrainState()
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
            # Restarted by the launcher (--max-restarts) after a worker failed: continue from the
            # latest good checkpoint. The environment still names the one this launch began from
            # (--resume), which is older, or pruned by keep_checkpoints, once the run saved again.
            latest, _ = checkpoint.latest_checkpoint(self.run_dir)
            if latest and (not self.resume_from
                           or checkpoint.saved_step(latest) > checkpoint.saved_step(Path(self.resume_from))):
                self.resume_from = str(latest)
            if is_main:
                print(f"craken: worker group restarted; resuming from {self.resume_from or 'the start'}", flush=True)
        if self.resume_from:
            state = checkpoint.load(accelerator, Path(self.resume_from))
            if is_main:
                print(f"craken: resumed from {self.resume_from} at step {state.step}", flush=True)

        write = None
        if is_main:
            write, metrics_fh = _jsonl(self.run_dir / metrics_file(spec.cluster.machine_rank))
            if state.step == 0:
                write({"event": "start", "strategy": strategy_name(spec), "num_processes": world,
                       "precision": spec.precision, "model_params": n_params, "flops_per_token": fpt,
                       "seq_len": spec.data.seq_len, "micro_batch": spec.batch.micro_batch,
                       "grad_accum": spec.grad_accum, "global_batch": spec.train_batch_size,
                       "max_steps": spec.train.max_steps, "device": device_name})
            else:
                write({"event": "resume", "step": state.step, "num_processes": world})
        from ..progress import ProgressReporter

        progress = ProgressReporter(spec.train.max_steps, spec.logging.steps_per_print) if is_main else None
        if progress:
            progress.start()

        def evaluate() -> float | None:
            if eval_dl is None:
                return None
            model.eval()
            total = torch.zeros((), device=device)
            count = 0
            with torch.no_grad():
                for i, batch in enumerate(eval_dl):
                    if i >= spec.train.eval_batches:
                        break
                    total += model(**batch).loss.detach().float()
                    count += 1
            model.train()
            mean = accelerator.reduce(total / max(count, 1), reduction="mean")
            return float(mean)

        def log_eval(step: int) -> None:
            value = evaluate()
            if value is not None and is_main:
                write({"step": step, "time_s": round(time.time() - t_start, 3), "eval_loss": value})
                progress.log(f"eval step {step}: eval_loss {value:.4f}")
                if spec.logging.report_to != "none":
                    accelerator.log({"eval_loss": value}, step=step)

        t_start = time.time()
        if state.step == 0 and spec.train.eval_every and eval_dl is not None:
            log_eval(0)  # the starting point, so a falling eval loss is visible from the first step

        model.train()
        loss_sum = torch.zeros((), device=device)
        loss_count = 0
        interval_start = time.time()
        interval_steps = 0
        first_step_s = None
        last_good = {"loss": None, "lr": None}
        exit_code = 0
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)

        check_every = max(1, min(spec.logging.steps_per_print, 10))
        epoch = state.epoch
        micro_in_epoch = state.batch_in_epoch
        step = state.step
        done = step >= spec.train.max_steps
        while not done:
            train_dl.set_epoch(epoch)
            loader = accelerator.skip_first_batches(train_dl, micro_in_epoch) if micro_in_epoch else train_dl
            for batch in loader:
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    if plain and accelerator.sync_gradients and spec.optimizer.clip > 0:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), spec.optimizer.clip)
                        if spec.train.on_nonfinite == "skip" and not bool(torch.isfinite(grad_norm)):
                            optimizer.zero_grad(set_to_none=True)  # no gradients: AdamW skips the update
                    optimizer.step()
                    if not plain:
                        scheduler.step()
                    optimizer.zero_grad()
                if plain and accelerator.sync_gradients:
                    scheduler.step()
                loss_sum += loss.detach().float()
                loss_count += 1
                micro_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue
                step += 1
                self.step = step
                interval_steps += 1
                # Every `check_every` steps, and before every checkpoint, one small all-reduce (and the only
                # host sync besides logging): a stop request on any process, or a non-finite loss or gradient
                # norm, stops all processes at one step. The gradient norm is what keeps a checkpoint from
                # holding weights a non-finite update has just reached: DeepSpeed's own bf16 overflow check
                # is off unless on_nonfinite is skip (render.deepspeed_config); fp16: nonfinite_update.
                flags = [0.0, 0.0]
                saves_now = spec.train.save_every and step % spec.train.save_every == 0
                if step % check_every == 0 or step >= spec.train.max_steps or step == 1 or saves_now:
                    norm = grad_norm if plain else model.get_global_grad_norm()
                    bad = nonfinite_update(loss_sum, norm, spec.precision)
                    flags = torch.stack([torch.tensor(float(stop.signum != 0), device=device), bad.float()])
                    flags = accelerator.reduce(flags, reduction="sum").tolist()
                if first_step_s is None:
                    first_step_s = time.time() - PROCESS_START
                if flags[1] and spec.train.on_nonfinite == "stop":
                    if is_main:
                        msg = nonfinite_advice(step, last_good, spec)
                        progress.log(msg)
                        write({"event": "nonfinite", "step": step, "message": msg})
                    exit_code = NONFINITE_EXIT
                    done = True
                    break
                if flags[1]:  # skip: DeepSpeed already skipped the update (non-finite gradient norm)
                    if is_main:
                        progress.log(f"step {step}: non-finite loss or gradient norm, update skipped "
                                     "(on_nonfinite=skip)")
                    loss_sum.zero_()
                    loss_count = 0
                log_now = step % spec.logging.steps_per_print == 0 or step == spec.train.max_steps
                if log_now and loss_count:
                    mean_loss = float(accelerator.reduce(loss_sum / loss_count, reduction="mean"))
                    elapsed = time.time() - interval_start
                    tps = tokens_per_step * interval_steps / max(elapsed, 1e-9)
                    if plain:
                        lr, gn = scheduler.get_last_lr()[0], grad_norm
                    else:
                        lr, gn = float(model.get_lr()[0]), model.get_global_grad_norm()
                    gn = float(gn) if gn is not None else None
                    record = {
                        "step": step, "time_s": round(time.time() - t_start, 3), "loss": mean_loss, "lr": lr,
                        "grad_norm": gn if gn is None or math.isfinite(gn) else None,
                        "tokens": step * tokens_per_step, "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / world,
                        "mfu": (tps / world * fpt / peak) if peak else None,
                        "gpu_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None,
                        "gpu_mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if on_gpu else None,
                    }
                    last_good = {"loss": mean_loss, "lr": lr, "grad_norm": record["grad_norm"]}
                    if is_main:
                        write(record)
                        progress.update(step, record)
                        if spec.logging.report_to != "none":
                            accelerator.log({k: v for k, v in record.items() if v is not None}, step=step)
                    loss_sum.zero_()
                    loss_count = 0
                    interval_start = time.time()
                    interval_steps = 0
                state = checkpoint.TrainState(step=step, epoch=epoch, batch_in_epoch=micro_in_epoch,
                                              fp32_grad_accum=fp32_grad_accum, zero_stage=spec.zero.stage,
                                              offload_optimizer=spec.offload.optimizer.device)
                if spec.train.eval_every and step % spec.train.eval_every == 0 and step != spec.train.max_steps:
                    log_eval(step)
                if flags[0]:
                    path = checkpoint.save(accelerator, self.run_dir, state, spec.train.keep_checkpoints)
                    if is_main:
                        progress.log(f"craken: stopped by signal at step {step}; checkpoint {path}. "
                                     f"Resume with: craken train --config {self.run_file} --resume auto")
                    exit_code = 130 if stop.signum == signal.SIGINT else 143
                    done = True
                    break
                if spec.train.save_every and step % spec.train.save_every == 0 and step != spec.train.max_steps:
                    checkpoint.save(accelerator, self.run_dir, state, spec.train.keep_checkpoints)
                if step >= spec.train.max_steps:
                    done = True
                    break
            else:
                epoch += 1
                micro_in_epoch = 0

        final_dir = None
        if exit_code == 0 and eval_dl is not None:
            log_eval(step)
        if exit_code == 0 and spec.train.save_final:
            checkpoint.save(accelerator, self.run_dir, state, spec.train.keep_checkpoints)
            final_dir = checkpoint.save_final(accelerator, model, tokenizer, self.run_dir, spec,
                                              check_batch=_check_batch(eval_dl or train_dl, device))
        if progress:
            progress.close()
        if is_main:
            write({"event": "end", "steps": step, "wall_s": round(time.time() - t_start, 3),
                   "first_step_s": first_step_s, "startup": startup, "final_dir": str(final_dir) if final_dir else None,
                   "exit_code": exit_code})
            metrics_fh.close()
        accelerator.wait_for_everyone()
        # Finishes the trackers and destroys the process group: with gloo, a process that exits with
        # its group alive can abort in teardown ("terminate called without an active exception").
        # Only on this path, where every process arrives: after an error, destroying could hang.
        accelerator.end_training()
        return exit_code


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


def lr_factor(spec):
    """The schedule of the rendered DeepSpeed JSON (render._scheduler), as a LambdaLR factor."""
    s, total = spec.schedule, spec.train.max_steps
    warmup = min(s.warmup_steps, total)

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        if s.kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if s.kind == "linear":
            return max(0.0, 1.0 - progress)
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def metrics_file(machine_rank: int) -> str:
    """metrics.jsonl on machine 0; metrics-machine<R>.jsonl elsewhere (safe on a shared run folder)."""
    return "metrics.jsonl" if machine_rank == 0 else f"metrics-machine{machine_rank}.jsonl"


def quiet_libraries() -> None:
    """Library progress bars and deprecation notes that say nothing about this run."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def _collate(rows):
    import torch

    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids}


def _check_batch(loader, device):
    """A fixed, small batch to compare the trained model's logits with the saved one's."""
    ds = loader.dataset if hasattr(loader, "dataset") else loader.base_dataloader.dataset
    ids = ds[0]["input_ids"][:32].unsqueeze(0).to(device)
    return ids


def strategy_name(spec) -> str:
    """The run's strategy under the planner's one name (metrics.jsonl's "strategy")."""
    from ..planner import strategy_name as name_of

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
