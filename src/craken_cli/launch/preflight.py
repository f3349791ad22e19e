"""Checks of a run's inputs before any process is launched: each problem found is one message
naming what to change. Reads config.json, the model's file headers and local data files up to
CONTENT_SCAN_BYTES; imports neither torch nor transformers, except to count the blocks of a local data
set small enough that it may not fill one micro-batch per process (datasize, with the run's tokenizer);
datasets only for a folder (its split file names) or a save_to_disk folder."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path

from ..plan.hardware import nearest_existing
from ..runfolder import CHECKPOINTS, FINAL, MARKER, METRICS, metrics_file
from ..train import builtin
from ..train import formats
from ..train.data import (COMPRESSIONS, LOCAL_FORMATS, READ_ERRORS, BadJsonLine, DataError, data_suffix,
                          is_saved_dataset, json_lines, open_text)
from . import modelcheck



def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def names_local_folder(name: str) -> bool:
    """--model/--tokenizer NAME is a local folder (so spelled, there, or deeper than a hub id's org/name)."""
    return looks_like_path(name) or name.count("/") > 1


def missing_model_folder(name: str) -> str:
    """--model NAME names a local folder that is not one."""
    what = "is a file, not a folder" if Path(name).expanduser().exists() else "no such folder"
    return f"--model {name}: {what}; give a folder with config.json or a hub id"


def names_local_data(name: str) -> bool:
    """--dataset NAME is a local file or folder (so spelled, or there), not a hub id."""
    return looks_like_path(name) or data_suffix(Path(name).expanduser()) in LOCAL_FORMATS


def model_max_positions(name: str) -> int | None:
    if builtin.is_builtin(name):
        return builtin.TINY_CONFIG["max_position_embeddings"]
    cfg_file = Path(name).expanduser() / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None  # model_problems says why
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")  # any one lets AutoTokenizer load


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).exists() for name in TOKENIZER_FILES)


def tokenizer_folder(model, folder: Path) -> tuple[Path | None, str]:
    """The local folder the run's tokenizer comes from (None: a hub id or built-in), and its flag."""
    if model.tokenizer is None:
        return folder, f"--model {model.name_or_path}"
    if builtin.is_builtin(model.tokenizer):
        return None, f"--tokenizer {model.tokenizer}"
    local = Path(model.tokenizer).expanduser()
    return (local if local.is_dir() else None), f"--tokenizer {model.tokenizer}"


def model_folder_problems(model) -> list[str]:
    """--model as a local folder (so spelled, or there; [] for a hub id or built-in): there, with a config,
    a tokenizer and files modelcheck can read. `craken doctor` reports the same."""
    name = model.name_or_path
    if builtin.is_builtin(name) or not names_local_folder(name):
        return []
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return [missing_model_folder(name)]
    if not (folder / "config.json").is_file():
        return [f"--model {name}: no config.json inside; give the folder that save_pretrained wrote"]
    if model.tokenizer is None and not has_tokenizer_files(folder):
        return [f"--model {name}: no tokenizer files inside; add them or set --tokenizer"]
    return modelcheck.folder_problems(f"--model {name}", folder, model.trust_remote_code,
                                      *tokenizer_folder(model, folder))


def model_problems(spec) -> list[str]:
    model = spec.model
    out = model_folder_problems(model)
    if builtin.is_builtin(model.name_or_path) and model.name_or_path != builtin.BUILTIN_MODEL:
        out.append(f"--model {model.name_or_path}: the only built-in model is {builtin.BUILTIN_MODEL}")
    if model.tokenizer and not builtin.is_builtin(model.tokenizer) and looks_like_path(model.tokenizer):
        local = Path(model.tokenizer).expanduser()
        if not local.is_dir():
            out.append(f"--tokenizer {model.tokenizer}: no such folder")
        elif not has_tokenizer_files(local):  # every worker died in AutoTokenizer, blaming sentencepiece
            out.append(f"--tokenizer {model.tokenizer}: no tokenizer files inside ({', '.join(TOKENIZER_FILES)}); "
                       "give the folder the tokenizer's save_pretrained wrote")
    if model.attn_implementation == "flash_attention_2":
        if spec.cluster.use_cpu:
            out.append("--set model.attn_implementation=flash_attention_2 needs CUDA GPUs (these are CPU "
                       "processes): use sdpa")
        elif importlib.util.find_spec("flash_attn") is None:
            out.append("--set model.attn_implementation=flash_attention_2: the flash-attn package is not installed "
                       "(every process would fail loading the model): pip install flash-attn, or use sdpa")
    limit = model_max_positions(model.name_or_path)
    if limit is not None and spec.data.seq_len > limit:
        out.append(f"--seq-len {spec.data.seq_len} is beyond the model's maximum of {limit} positions: "
                   f"use --seq-len {limit} or less")
    return out


def first_record(path: Path, split: str = "train") -> dict | None:
    """The first record of a local data file or saved data set (a text file's first line as {'text': ...}, a CSV
    file's first row as text), {} when it has none, None when it cannot tell cheaply."""
    if is_saved_dataset(path):
        from ..train.data import saved_split

        saved = saved_split(path, split)
        return saved[0] if len(saved) else {}
    suffix = data_suffix(path)
    fmt = LOCAL_FORMATS.get(suffix)
    if fmt == "text":
        return {"text": ""}
    with open_text(path, errors="replace") as fh:
        if suffix == ".jsonl":
            for line in fh:
                if line.strip():
                    rec = json.loads(line)
                    return rec if isinstance(rec, dict) else None
            return {}
        if suffix == ".csv":  # cells as text, as the workers read them
            rows = csv.reader(fh)
            header = next(rows, [])
            first = next(rows, None)
            return dict(zip(header, [*first, *[""] * len(header)])) if first is not None else dict.fromkeys(header, "")
        if suffix == ".json":
            data = json.load(fh)
            if isinstance(data, list):
                return data[0] if data and isinstance(data[0], dict) else {}
            return None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        first = next(pq.ParquetFile(path).iter_batches(batch_size=1), None)
        return first.to_pylist()[0] if first is not None and first.num_rows else \
            dict.fromkeys(pq.read_schema(path).names, "")
    return None


def first_record_columns(path: Path) -> list[str] | None:
    """Column names from the first record of a local data file; None if it cannot tell cheaply."""
    record = first_record(path)
    return None if record is None else list(record)


def data_files(path: Path, split: str = "train") -> tuple[list[Path], str | None]:
    """The data files of --dataset (of `split` in a folder of split files; a saved data set's folder itself)
    and the problem with them, if any (a folder mixing formats included)."""
    from ..train.data import local_data_files

    if is_saved_dataset(path):
        return [path], None
    try:
        return [Path(f) for f in local_data_files(path, split)[1]], None
    except DataError as exc:
        return [], str(exc)


def data_problems(spec) -> list[str]:
    data = spec.data
    if builtin.is_builtin(data.dataset):
        if data.dataset != builtin.BUILTIN_DATA:
            return [f"--dataset {data.dataset}: the only built-in data set is {builtin.BUILTIN_DATA}"]
        return template_problems(spec, "text" if data.format == "auto" else data.format) or size_problems(spec)
    path = Path(data.dataset).expanduser()
    if not path.exists():
        if names_local_data(data.dataset):
            return [f"--dataset {data.dataset}: no such file or folder"]
        return []  # a hub id: hubcheck's
    files, problem = data_files(path, data.split)
    if problem:
        return [problem]
    if all(f.is_file() and f.stat().st_size == 0 for f in files):
        return [f"--dataset {data.dataset}: the data set is empty; add text"]
    try:
        record = first_record(files[0], data.split)
    except DataError as exc:
        return [str(exc)]
    except READ_ERRORS as exc:
        return [f"--dataset {files[0]}: cannot be read ({exc.__class__.__name__}: {exc}); fix the file"]
    if record == {}:
        return [f"--dataset {data.dataset}: the data set is empty; add text"]
    return record_problems(spec, files, record) or eval_problems(spec, path, record)


def eval_problems(spec, path: Path, record: dict | None) -> list[str]:
    """The eval split data.eval_split names or auto finds: there, and its first record of the training
    split's format (its rows are encoded as the training rows are)."""
    from ..train.data import eval_source

    data = spec.data
    try:
        source = eval_source(spec, look_up=False)
    except DataError as exc:
        return [str(exc)]
    if source.split is None or record is None:
        return []
    files, problem = data_files(path, source.split)
    if problem:
        return [problem]
    try:
        first = first_record(files[0], source.split)
    except READ_ERRORS as exc:  # a DataError among them
        return [f"--dataset {files[0]} (the eval split {source.split}): cannot be read ({exc}); fix the file"]
    if not first:
        return []  # an empty eval split: no evaluation, said at start-up
    fmt = formats.resolve(data.format, list(record), data.text_column, record)
    problem = formats.format_problem(fmt, list(first), data.text_column, str(files[0]), first)
    if problem is None and fmt == "chat" and formats.conversational_pair(record) \
            and not formats.conversational_pair(first):
        problem = f"{files[0]} holds no prompt/completion lists of chat messages"
    if problem:
        return [f"the eval split {source.split!r} (data.eval_split {data.eval_split}) does not fit the training "
                f"split's format {fmt}: {problem}; or set data.eval_split to none"]
    return []


def record_problems(spec, files: list[Path], record: dict | None) -> list[str]:
    """The format against the first record's columns; every record of small files (content_problem);
    the chat template; enough data for one micro-batch per process."""
    data = spec.data
    fmt = None  # unknown when the first record cannot be told cheaply
    if record is not None:
        problem = formats.format_problem(data.format, list(record), data.text_column, str(files[0]), record)
        if problem:
            return [problem]
        fmt = formats.resolve(data.format, list(record), data.text_column, record)
    for f in files:
        problem = content_problem(f, data.text_column if fmt == "text" else None)
        if problem:
            return [f"--dataset {f}: {problem}"]
    return [] if fmt is None else template_problems(spec, fmt) or eos_problems(spec, fmt) or size_problems(spec)


def eos_problems(spec, fmt: str) -> list[str]:
    """Texts and responses end with the tokenizer's EOS token: a local tokenizer folder without one is refused
    (chat templates end their own turns)."""
    name = spec.model.tokenizer or spec.model.name_or_path
    folder = Path(name).expanduser()
    if fmt == "chat" or builtin.is_builtin(name) or not folder.is_dir() or has_special_token(folder, "eos_token"):
        return []
    return [formats.no_eos_message(name, fmt)]


def has_special_token(folder: Path, key: str) -> bool:
    """Whether the tokenizer files of a folder name this special token (tokenizer_config.json or
    special_tokens_map.json); True when neither can be read (the loading then decides)."""
    found = []
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            config = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        found.append(isinstance(config, dict) and bool(config.get(key)))
    return any(found) or not found


def template_problems(spec, fmt: str | None) -> list[str]:
    """A chat data set needs a chat template: --chat-template (text or an existing file), or the tokenizer's own."""
    data = spec.data
    if fmt != "chat":
        return []
    if data.chat_template is not None:
        if "{" not in data.chat_template and not Path(data.chat_template).expanduser().is_file():
            return [f"--chat-template {data.chat_template}: no such file, and not a Jinja template"]
        return []
    name = spec.model.tokenizer or spec.model.name_or_path
    if builtin.is_builtin(name):
        return [formats.no_template_message(name)]
    folder = Path(name).expanduser()
    if folder.is_dir() and not has_chat_template(folder):
        return [formats.no_template_message(name)]
    return []  # a hub tokenizer: the workers check


def has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(isinstance(config, dict) and config.get("chat_template"))


BYTES_PER_TOKEN_AT_MOST = 32  # a data set of more bytes per token the run needs is counted as enough


def size_problems(spec) -> list[str]:
    """A local or built-in data set too small for one micro-batch per process: every process would stop
    after loading the model. Counted exactly with the run's tokenizer (datasize), when the model's files are
    sound."""
    from ..plan import datasize
    from ..plan.memory import data_problem, train_blocks
    from ..train.data import builtin_lines, held_out_fraction

    world = spec.cluster.num_processes or 1
    fraction = held_out_fraction(spec)
    needed_tokens = spec.batch.micro_batch * world * spec.data.seq_len / max(0.05, 1 - fraction)
    path = Path(spec.data.dataset).expanduser()
    if builtin.is_builtin(spec.data.dataset):
        size = sum(len(line) + 1 for line in builtin.pattern_lines(builtin_lines(spec.data.seq_len)))
    else:
        size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.iterdir()) if f.is_file())
    if size > BYTES_PER_TOKEN_AT_MOST * needed_tokens or model_problems(spec):
        return []  # plenty (no token spans that many bytes in practice): not worth tokenizing in the CLI
    blocks, report = datasize.rows_and_report(spec)
    if blocks is None:
        return []
    problem = data_problem(train_blocks(blocks, fraction), world, spec.data.seq_len,
                           spec.batch.micro_batch)
    if problem and "prompt fills seq_len" in report:
        problem += f" ({report}: raise --seq-len, now {spec.data.seq_len})"
    return [f"--dataset {spec.data.dataset}: {problem}"] if problem else []


CONTENT_SCAN_BYTES = 64 << 20  # local files up to this size are read whole before launch


def content_problem(path: Path, column: str) -> str | None:
    """What in a local text data file would stop every process after start-up: bytes that are not
    UTF-8 (a binary or latin-1 file), a JSON line that does not parse, a text value that is not a
    string; each with its line. Parquet files and files over CONTENT_SCAN_BYTES are left to the workers."""
    suffix = data_suffix(path)
    if (path.is_dir() or LOCAL_FORMATS.get(suffix) == "parquet" or path.suffix.lower() in COMPRESSIONS
            or path.stat().st_size > CONTENT_SCAN_BYTES):
        return None
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is no text (datasets drops it too)
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        return (f"line {line} is not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start}; a binary file, "
                "or another encoding such as latin-1): convert it to UTF-8 (iconv -f latin1 -t utf-8)")
    if "\0" in text:
        line = text[:text.index("\0")].count("\n") + 1
        return f"line {line} holds NUL bytes: a binary file, not text; give a text file"
    if suffix == ".json":
        try:
            records = json.loads(text)
        except ValueError:
            records = None  # JSON lines under a .json name, as datasets reads them too
        if isinstance(records, list):
            return next((f"record {i + 1}: {why}" for i, r in enumerate(records)
                         if (why := record_problem(r, column))), None)
        if isinstance(records, dict) and len(records) and all(isinstance(v, list) for v in records.values()):
            return ("one JSON object of columns ({\"column\": [values]}), which datasets reads as one record: "
                    "write a list of records ([{...}, {...}]) or JSON lines (.jsonl)")
        if records is not None:
            return None  # one object of another shape: datasets' own reading decides
    if suffix in (".json", ".jsonl"):
        return json_lines_problem(text, column)
    return None


def json_lines_problem(text: str, column: str) -> str | None:
    try:
        for number, record in json_lines(text.splitlines()):
            why = record_problem(record, column)
            if why:
                return f"line {number}: {why}"
    except BadJsonLine as bad:
        return (f"line {bad.number} is not valid JSON ({bad.error.msg}, column {bad.error.colno}): fix or remove "
                "that line")
    return None


def record_problem(record, column: str | None) -> str | None:
    """What is wrong with one record: not an object, or (text format: `column`) its text missing or not a string."""
    if not isinstance(record, dict):
        return (f"a record is {type(record).__name__}, not a JSON object: each record is one object with a "
                f"{column!r} field")
    if column is None:  # a supervised format: its encoder counts and reports bad values
        return None
    if column not in record:
        return f"the record has no {column!r} field: add it, or remove the record"
    if not isinstance(record[column], str):
        return (f"{column!r} is {json.dumps(record[column])[:40]}, not a string: every {column!r} value must be "
                "text")
    return None


def op_problems(spec, environ) -> list[str]:
    """A DeepSpeed op this run loads whose last build was killed would hang every process silently."""
    from ..doctor.dsops import ops_for, stale_build_locks, stale_lock_message

    if not spec.uses_deepspeed:
        return []
    ops = ops_for(spec.offload.optimizer.device, bool(spec.cluster.use_cpu), spec.optimizer.fused,
                  spec.offload.param.device)
    return [f"{stale_lock_message(op, lock, age)}: delete it (when no build is running) and start again"
            for op, (lock, age) in stale_build_locks(ops, environ).items()]


def nvme_problems(spec, environ) -> list[str]:
    """NVMe offload loads DeepSpeed's async_io op, built against libaio at first use (or pre-built):
    without libaio every process fails after start-up ('Unable to JIT load the async_io op'). Its
    optimizer swapper needs enough swap buffers, which DeepSpeed's config models do not check."""
    from ..doctor.dsops import deepspeed_ops, find_libaio, libaio_missing, nvme_offload_flags

    nvme = nvme_offload_flags(spec.offload.optimizer.device, spec.offload.param.device)
    if not nvme or not spec.uses_deepspeed:
        return []
    problems = swap_buffer_problems(spec)
    prebuilt, _ = deepspeed_ops(environ)
    missing = libaio_missing(bool(prebuilt.get("async_io")), *find_libaio(environ))
    if not missing:
        return problems
    return [f"{' '.join(f + ' nvme' for f in nvme)}: DeepSpeed's async_io op needs libaio, which is not installed here "
            f"({' and '.join(missing)} not found): apt install libaio-dev, or offload to cpu instead "
            f"({' '.join(f + ' cpu' for f in nvme)})", *problems]


def deepspeed_extra_problems(spec) -> list[str]:
    """Values of `deepspeed.extra` that DeepSpeed's own config models and parser refuse (a boolean given as
    "maybe", a size as text, a monitor or profiler section of the wrong type, an optimizer it cannot build):
    without this check every process stops at `deepspeed.initialize` with a traceback. The rendered JSON is
    checked, so craken's own values beside them count too."""
    if not spec.uses_deepspeed or not spec.deepspeed.extra:
        return []
    from .render import deepspeed_config

    rendered = deepspeed_config(spec)
    refused = section_model_problems(spec, rendered)
    return [p for found in refused.values() for p in found] + parser_problems(spec, rendered, skip=set(refused))


def cpu_optimizer_problems(spec) -> list[str]:
    """DeepSpeed's Lamb is a CUDA kernel alone (FusedLamb), and its Lion one too unless the states are
    offloaded (DeepSpeedCPULion): on CPU processes every process stops at deepspeed.initialize ("This op
    had not been implemented on CPU backend"), which DeepSpeedConfig does not foresee."""
    if not spec.uses_deepspeed or not spec.cluster.use_cpu:
        return []
    kind, offloaded = spec.deepspeed.optimizer_type(), spec.offload.optimizer.device != "none"
    if kind == "lamb":
        return ["deepspeed.extra.optimizer.type 'Lamb' is DeepSpeed's FusedLamb, a CUDA kernel with no CPU version, "
                "and this run has CPU processes: use Lion with --offload-optimizer cpu, Adagrad, or craken's AdamW "
                "(drop deepspeed.extra.optimizer)"]
    if kind == "lion" and not offloaded:
        return ["deepspeed.extra.optimizer.type 'Lion' is DeepSpeed's FusedLion, a CUDA kernel, on states that are not "
                "offloaded, and this run has CPU processes: pass --offload-optimizer cpu (DeepSpeed's CPU Lion), or "
                "drop deepspeed.extra.optimizer"]
    return []


def section_model_problems(spec, rendered: dict) -> dict[str, list[str]]:
    """Every error of DeepSpeed's pydantic sections (zero_optimization, bf16, fp16), at once, by the
    top-level key of deepspeed.extra they are in."""
    from pydantic import ValidationError

    from ..config import dscheck
    from ..config.importers import section_models

    refused = {}
    for section, model in section_models().items():
        value = rendered.get(section)
        if section in spec.deepspeed.extra and isinstance(value, dict):
            try:
                model(**value)
            except ValidationError as exc:
                refused[section] = [f"deepspeed.extra.{problem}" for problem in dscheck.pydantic_problems(exc, rendered)]
    return refused


def parser_problems(spec, rendered: dict, skip: set[str]) -> list[str]:
    """DeepSpeedConfig itself on craken's JSON with one extra key at a time (it stops at its first error,
    and each key should get its own message), then on the whole JSON for what keys refuse together (an
    optimizer DeepSpeed has not tested with ZeRO, unless zero_allow_untested_optimizer allows it)."""
    from ..config import dscheck
    from .render import deepspeed_config

    plain = deepspeed_config(spec.model_copy(update={"deepspeed": spec.deepspeed.model_copy(update={"extra": {}})}))
    problems = []
    for key in spec.deepspeed.extra:
        if key in skip or key not in rendered:
            continue
        try:  # craken's own JSON parses, so whatever fails here is this key's
            problems += dscheck.unknown_class_problems(dscheck.parse_unlaunched({**plain, key: rendered[key]}))
        except Exception as exc:  # DeepSpeed raises assorted types; its words are what the user needs
            problems += dscheck.refusal_problems(exc, key, rendered[key], spec.deepspeed.extra[key])
    if problems or skip:
        return problems
    try:
        parsed = dscheck.parse_unlaunched(rendered)
    except Exception as exc:
        return [f"deepspeed.extra: DeepSpeed refuses these keys together ({exc.__class__.__name__}: "
                f"{' '.join(str(exc).split())[:300]}): fix them"]
    return dscheck.untested_optimizer_problems(parsed)


def swap_buffer_problems(spec) -> list[str]:
    """Optimizer states on NVMe (ZeRO-3 only: stages 1 and 2 keep NVMe-offloaded states in RAM) with too
    few offload_optimizer.buffer_count for the sub-groups DeepSpeed holds at once (plan.memory.SwapSettings.
    optimizer_buffers_needed): every process stops at the first optimizer step. DeepSpeed's
    DeepSpeedZeroOffloadOptimizerConfig (zero/offload_config.py) only asks buffer_count >= 0."""
    from ..plan.memory import SWAP_BUFFERS_PER_SUB_GROUP, SwapSettings

    if spec.offload.optimizer.device != "nvme" or spec.zero.stage != 3:
        return []
    swap = SwapSettings.from_extra(spec.deepspeed.extra)
    need = swap.optimizer_buffers_needed
    if swap.optimizer_buffer_count >= need:
        return []
    key = "zero_optimization.offload_optimizer"
    pipelined = [k for k in ("pipeline_read", "pipeline_write") if getattr(swap, k)]
    held = (f"with {' and '.join(pipelined)} DeepSpeed's NVMe optimizer swapper holds the swap buffers of up to "
            f"{need // SWAP_BUFFERS_PER_SUB_GROUP} sub-groups at once, {SWAP_BUFFERS_PER_SUB_GROUP} each"
            if pipelined else
            f"DeepSpeed's NVMe optimizer swapper holds {SWAP_BUFFERS_PER_SUB_GROUP} swap buffers per sub-group")
    undo = f", or set {' and '.join(f'{key}.{k}' for k in pipelined)} to false" if pipelined else ""
    return [f"{key}.buffer_count is {swap.optimizer_buffer_count}, and {held} (fp32 weights, gradient, Adam's two "
            f"moments): it would stop at the first step, out of swap buffers; set deepspeed.extra "
            f"{key}.buffer_count to {need} or more (in an imported DeepSpeed JSON, its own key){undo}"]


def precision_problems(spec) -> list[str]:
    """What the training processes would only find out after start-up (rendering stays allowed)."""
    if spec.cluster.use_cpu and spec.precision == "fp16":
        return ["fp16 is not supported by DeepSpeed on CPU processes (it fails after start-up): use "
                "--precision bf16 or fp32"]
    return []


def schedule_problems(spec) -> list[str]:
    """An imported scheduler block the engine without DeepSpeed (ZeRO 0 on GPUs) cannot run; DeepSpeed
    judges the block itself on every other engine."""
    if spec.uses_deepspeed or "scheduler" not in spec.deepspeed.extra:
        return []
    from ..train import schedule

    fix = "; or use --zero 1, or drop the imported block to train craken's schedule"
    try:
        schedule.lr_lambda(schedule.run_block(spec), spec.optimizer.lr)
    except KeyError as exc:
        return [f"deepspeed.extra.scheduler has no params.{exc.args[0]}, which its type needs{fix}"]
    except (ValueError, TypeError) as exc:
        return [f"deepspeed.extra.scheduler: {exc}{fix}"]
    return []


# What each --report-to tracker imports (accelerate takes either TensorBoard writer); the extras of
# pyproject.toml install them.
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def tracker_problems(spec, find_spec=importlib.util.find_spec) -> list[str]:
    """Accelerate drops a tracker whose package is missing with only a debug line, so the run would
    train for hours and log nowhere."""
    tracker = spec.logging.report_to
    if tracker == "none" or any(find_spec(name) for name in TRACKER_PACKAGES[tracker]):
        return []
    package = TRACKER_PACKAGES[tracker][0]
    return [f"--report-to {tracker}: the {package} package is not installed: pip install {package}, "
            "or use --report-to none"]


def own_run_markers(machine_rank: int) -> tuple[str, ...]:
    """What tells that this machine already ran in a run folder. Machine 0's run owns the folder;
    a machine of rank R > 0 shares it (`craken cluster slurm`) and only has its own files there. The
    rendered files alone (`craken config render`, or a launch that never started) are no run: `craken
    train` renders them again from the same sources."""
    if machine_rank == 0:
        return METRICS, CHECKPOINTS, FINAL
    return (metrics_file(machine_rank),)


def output_name_problems(spec) -> list[str]:
    """A run folder that is the working folder, or a run name that leaves runs/."""
    out = spec.output
    if out.dir is not None and not out.dir.strip():
        return ["--output-dir '' is the working folder: give the run a folder of its own (e.g. --output-dir "
                "runs/NAME)"]
    if out.dir is None and (out.name in (".", "..") or "/" in out.name or "\\" in out.name):
        return [f"--name {out.name}: a run name is one folder name under runs/ (no '/', not '.' or '..'): choose "
                "another --name, or give the folder with --output-dir"]
    return []


def lock_message(run_dir: Path, holder: str) -> str:
    return (f"run folder {run_dir} is in use by a live craken train (process {holder}): one run per folder; "
            "wait for it to end (or stop it), or choose another --name/--output-dir")


def force_problems(run_dir: Path) -> list[str]:
    """--force clears a run folder: only a craken run's, never a folder above what the user works in."""
    from ..runfolder import foreign_outputs, protected

    why = protected(run_dir)
    if why:
        return [f"--force would clear {run_dir}, which is {why}: give the run a folder of its own "
                "(--output-dir runs/NAME)"]
    foreign = foreign_outputs(run_dir)
    if foreign:
        return [f"--force: {run_dir} is not a craken run folder (no {MARKER}) but holds {', '.join(foreign)}: craken "
                "removes only what it wrote; move them away yourself or choose another --output-dir"]
    return []


def unwritable(folder: Path) -> str | None:
    """Why nothing can be created in `folder` (None when something can). Tried, not guessed from the
    mode bits: root passes every access() test, /proc and read-only mounts still refuse; the probe
    folder is removed at once."""
    import tempfile

    if not os.access(folder, os.W_OK | os.X_OK):
        return "not writable"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".craken-probe-", dir=folder))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def output_problems(run_dir: Path, resume: str | None, force: bool, machine_rank: int = 0) -> list[str]:
    from ..runfolder import lock_holder

    holder = lock_holder(run_dir, machine_rank) if run_dir.is_dir() else None
    if holder:
        return [lock_message(run_dir, holder)]
    if force and not resume and machine_rank == 0:
        problems = force_problems(run_dir)
        if problems:
            return problems
    if run_dir.exists() and not run_dir.is_dir():
        return [f"run folder {run_dir} is a file: choose another --output-dir"]
    parent = nearest_existing(run_dir)
    why = unwritable(parent)
    if why:
        return [f"run folder {run_dir} cannot be created or written (creating a folder in {parent} failed: {why}): "
                "choose another --output-dir"]
    if run_dir.is_dir() and not resume and not force and any((run_dir / m).exists()
                                                             for m in own_run_markers(machine_rank)):
        return [earlier_run_message(run_dir)]
    return []


def earlier_run_message(run_dir: Path) -> str:
    """What to do with the run a folder holds: --resume auto only where a checkpoint can be resumed
    (else it refuses in turn, naming --force: the circle of issue 21)."""
    from ..train import checkpoint

    if checkpoint.latest_checkpoint(run_dir, verify=False)[0] is not None:
        return (f"run folder {run_dir} already holds a run: pass --resume auto to continue it, --force to start "
                "over (its checkpoints are replaced), or choose --name/--output-dir")
    return (f"run folder {run_dir} already holds a run, with no checkpoint to continue from: pass --force to start "
            "over (its metrics and weights are replaced), or choose --name/--output-dir")


# What decides a model's shape: a checkpoint of another shape cannot be loaded into this run's model.
SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size")


def model_config(name: str) -> dict | None:
    """The model's config.json as a dict (the built-in model's from its definition); None for a hub id
    or an unreadable file (reported by model_problems)."""
    if builtin.is_builtin(name):
        return {"model_type": "llama", **builtin.TINY_CONFIG}
    try:
        data = json.loads((Path(name).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def resume_problems(ckpt: Path, state, spec) -> list[str]:
    """What the checkpoint's data position and weights depend on, where this run differs: each with
    the flag value that resumes it (a data position counts blocks of seq_len tokens, shuffled by the seed,
    in steps of the global batch)."""
    out = []
    recorded = {"--seq-len": (state.seq_len, lambda: spec.data.seq_len), "--seed": (state.seed, lambda: spec.train.seed),
                "--global-batch": (state.global_batch, lambda: spec.train_batch_size),
                "--precision": (state.precision, lambda: spec.precision)}
    for flag, (saved, current) in recorded.items():
        if saved is None:
            continue  # a checkpoint of an older craken
        now = current()
        if saved != now:
            how = (f" ({spec.batch.micro_batch} x {spec.grad_accum} accumulation steps x {spec.world_size} processes: "
                   "a new --grad-accum, --micro-batch or --num-processes changes it)" if flag == "--global-batch" else "")
            out.append(f"it was trained with {flag} {saved}, this run has {now}{how}: resume with {flag} {saved}, or "
                       f"start a new run from its weights (craken ckpt export {ckpt} --out DIR, then --model DIR)")
    if state.micro_batch and state.micro_batch != spec.batch.micro_batch and state.world_size:
        samples = state.batch_in_epoch * state.world_size * state.micro_batch
        if samples % (spec.batch.micro_batch * spec.world_size):
            out.append(f"it was trained with --micro-batch {state.micro_batch}; its data position ({samples} samples "
                       f"into the epoch) is no whole number of --micro-batch {spec.batch.micro_batch} x "
                       f"{spec.world_size} processes: resume with --micro-batch {state.micro_batch}")
    saved_cfg = model_config(str(Path(ckpt) / "hf"))
    run_cfg = model_config(spec.model.name_or_path) if saved_cfg else None
    if saved_cfg and run_cfg:
        differ = [k for k in SHAPE_KEYS if k in saved_cfg and k in run_cfg and saved_cfg[k] != run_cfg[k]]
        if differ:
            shown = ", ".join(f"{k} {saved_cfg[k]} (this model: {run_cfg[k]})" for k in differ)
            out.append(f"it holds a model of another shape: {shown}: resume with the --model it was trained with")
    return out
