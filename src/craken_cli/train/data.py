"""Records -> rows of `seq_len` tokens, split into train and eval, cached on disk.

The eval rows (`eval_source`) are the data's own validation split when it has one (data.eval_split
auto, or the split named), built like the training rows under their own cache key; else
data.eval_fraction of the training rows, picked by index after the cache (`train_eval_split`).

Loading is the real one: `datasets.load_dataset` on a hub id, or on local json/jsonl/csv/parquet/txt
files (gzip, bzip2 or xz compressed too; a folder's files split by name as datasets splits them),
`datasets.load_from_disk` on a folder `save_to_disk` wrote; the built-in pattern language is generated in
memory. The format (train/formats.py) is the
one asked for or the one the columns show. Records are encoded by a batched `map` on `num_proc`
processes, then packed on the Arrow columns as NumPy arrays. The rows of a local data set are saved in
a cache keyed by the data files (path, size, mtime), the tokenizer, the format, the chat template and
the packing settings (`cache_key`), so the next launch on this machine reads them instead of
tokenizing; each machine's first process builds them while the others wait (`prepared`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import lzma
import os
import shutil
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from . import builtin, formats

CACHE_VERSION = 3  # bump when the rows a given input gives change
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
COMPRESSIONS = (".gz", ".bz2", ".xz")  # datasets reads them by their suffix, the preflight through the stdlib
# What reading a damaged data file through `open_text` raises: a parser's ValueError (UnicodeDecodeError
# among them), csv's error, and the decompressors' own, which are no OSError (zlib.error, LZMAError) or
# an EOFError for a file cut short.
READ_ERRORS = (ValueError, OSError, EOFError, csv.Error, zlib.error, lzma.LZMAError)


class DataError(ValueError):
    """A data problem the user fixes (one message naming what to change)."""


def builtin_lines(seq_len: int) -> int:
    """Lines of the built-in data set: enough for about 64 blocks, so long sequences still get several batches."""
    return max(4000, seq_len * 64 // 16)


def data_suffix(path: Path) -> str:
    """A data file's format suffix, under its compression suffix: a.jsonl.gz -> .jsonl."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def is_saved_dataset(path: Path) -> bool:
    """A folder `Dataset.save_to_disk` or `DatasetDict.save_to_disk` wrote."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def folder_splits(path: Path) -> dict[str, list[Path]]:
    """A folder's files by split, as datasets splits them by name (train.jsonl, data/test-0.jsonl, ...):
    all of them under 'train' when no name is a split's."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        resolved = DataFilesDict.from_patterns(get_data_patterns(str(path)), str(path))
    except FileNotFoundError:  # no data file at all
        return {}
    splits = {str(split): sorted(p for p in map(Path, files) if data_suffix(p) in LOCAL_FORMATS)
              for split, files in resolved.items()}
    return {split: files for split, files in splits.items() if files}


def local_data_files(path: Path, split: str = "train") -> tuple[str, list[str]]:
    """(builder, files) for a local file, or a folder's files of one format in `split`."""
    if path.is_file():
        if data_suffix(path) not in LOCAL_FORMATS:
            raise DataError(f"--dataset {path}: unsupported file type '{path.suffix}'; use one of "
                            f"{', '.join(LOCAL_FORMATS)} (or one of them {'/'.join(COMPRESSIONS)} compressed)")
        if split != "train":
            raise DataError(f"--set data.split={split}: a single file is read whole: point --dataset at the "
                            "file of that split, or at the folder that holds the splits")
        return LOCAL_FORMATS[data_suffix(path)], [str(path)]
    splits = folder_splits(path)
    if split not in splits:
        held = f"holds the splits {', '.join(splits)}" if splits else f"holds no {', '.join(LOCAL_FORMATS)} files"
        raise DataError(f"--dataset {path}: the folder {held}" + (": set --set data.split to one of them"
                                                                   if splits else ""))
    files = splits[split]
    found = {data_suffix(p) for p in files}
    if len({LOCAL_FORMATS[f] for f in found}) > 1:
        raise DataError(f"--dataset {path}: the folder mixes {', '.join(sorted(found))} files, which are read as one "
                        "data set of one format: keep one format, or point --dataset at one file")
    return LOCAL_FORMATS[found.pop()], [str(p) for p in files]


def csv_options(files: list[str]) -> dict:
    """Every CSV cell read as text: pandas would read a column of numbers ("42") as int, and "NA", "null" or an
    empty cell as NaN, which no format trains on. The columns are the first file's header."""
    import datasets

    with open_text(Path(files[0])) as fh:
        header = next(csv.reader(fh), [])
    return {"keep_default_na": False,
            "features": datasets.Features({name: datasets.Value("string") for name in header})}


def saved_split(path: Path, split: str):
    """The Dataset of a `save_to_disk` folder (`split` of a DatasetDict's)."""
    import datasets

    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataError(f"--dataset {path}: the saved DatasetDict has no split {split!r} (it has "
                            f"{', '.join(saved)}): set --set data.split to one of them")
        return saved[split]
    if split != "train":
        raise DataError(f"--set data.split={split}: {path} is one saved Dataset, without splits: leave data.split")
    return saved


def read_local(path: Path, split: str, streaming: bool):
    """The records of a local file, folder or saved data set; a file datasets cannot read is named."""
    import datasets

    if is_saved_dataset(path):
        raw = saved_split(path, split)
        return raw.to_iterable_dataset() if streaming else raw
    builder, files = local_data_files(path, split)
    try:
        options = csv_options(files) if builder == "csv" else {}
        return datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming, **options)
    except Exception as exc:  # datasets names neither file nor line of a corrupt record
        where = corrupt_json_line(files)
        raise DataError(f"--dataset {where}: fix or remove that line" if where else
                        f"--dataset {path}: cannot be read ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); fix the file") from exc


class BadJsonLine(ValueError):
    """A line of a JSON-lines file that is not JSON: its number (from 1) and the parser's error."""

    def __init__(self, number: int, error: json.JSONDecodeError):
        super().__init__(f"line {number}: {error}")
        self.number, self.error = number, error


def json_lines(lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each record of a JSON-lines text as datasets reads it: one JSON value a line,
    blank lines skipped; `BadJsonLine` at the first line that does not parse. The pre-launch check
    (launch/preflight) and the worker's message after datasets fails both read the lines with it."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadJsonLine(number, exc) from None
        yield number, record


def corrupt_json_line(files: list[str]) -> str | None:
    """'FILE line N: ...' for the first line of a .jsonl file that is not a JSON object, else None."""
    for name in files:
        if data_suffix(Path(name)) != ".jsonl":
            continue
        try:
            with open_text(Path(name), errors="replace") as fh:
                for number, record in json_lines(fh):
                    if not isinstance(record, dict):
                        return f"{name} line {number}: a JSON {type(record).__name__}, not an object"
        except BadJsonLine as bad:
            return f"{name} line {bad.number}: not valid JSON ({bad.error})"
        except READ_ERRORS:  # damaged past what datasets read: its own error is the message
            return None
    return None


def open_text(path: Path, errors: str = "strict"):
    """A data file opened as text, through its compression; a UTF-8 byte-order mark dropped."""
    import bz2
    import gzip
    import lzma

    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix.lower(), open)
    return opener(path, "rt", encoding="utf-8-sig", errors=errors)


def load_raw(spec):
    """The raw records of the run's format columns (a `datasets.Dataset`)."""
    return load_records(spec)[0]


def load_records(spec, streaming: bool = False):
    """The raw records (a `datasets.Dataset`, or IterableDataset when streaming) and their format."""
    import datasets

    data = spec.data
    if builtin.is_builtin(data.dataset):
        raw = datasets.Dataset.from_dict(builtin.dataset_records(builtin_lines(data.seq_len), seed=spec.train.seed))
        if streaming:
            raw = raw.to_iterable_dataset(num_shards=8)
    else:
        path = Path(data.dataset).expanduser()
        if path.exists():
            raw = read_local(path, data.split, streaming)
        else:
            raw = datasets.load_dataset(data.dataset, split=data.split, streaming=streaming)
    if data.max_samples is not None:
        raw = raw.take(data.max_samples) if streaming else raw.select(range(min(data.max_samples, len(raw))))
    columns = list(raw.column_names or raw.features or [])
    record = first_row(raw)
    problem = formats.format_problem(data.format, columns, data.text_column, data.dataset, record)
    if problem:
        raise DataError(problem)
    fmt = formats.resolve(data.format, columns, data.text_column, record)
    return raw.select_columns([c for c in formats.columns_of(fmt, data.text_column) if c in columns]), fmt


def first_row(raw) -> dict | None:
    """The first record (whether prompt/completion hold text or chat messages shows in the values), or None."""
    if hasattr(raw, "__len__"):
        return raw[0] if len(raw) else None
    return next(iter(raw.take(1)), None)


def chat_template(spec, tokenizer) -> str | None:
    """The template chat records are rendered with; a DataError when there is none."""
    template = formats.template_text(spec.data.chat_template)
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise DataError(formats.no_template_message(spec.model.tokenizer or spec.model.name_or_path))
    return template


def num_proc(spec, rows: int) -> int | None:
    """Tokenizing processes: data.num_proc, else every core; one (no pool) for small data sets."""
    cores = spec.data.num_proc or len(os.sched_getaffinity(0))
    procs = min(cores, max(1, rows // 10_000))
    return procs if procs > 1 else None


@dataclass
class Built:
    """The packed rows and what building them found."""
    rows: object  # datasets.Dataset of input_ids [, labels, position_ids]
    format: str
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> records
    samples: int = 0
    cache: str = "none"  # hit | written | none
    seconds: float = 0.0
    bytes_read: int = 0

    def report(self) -> str:
        parts = [f"data: {self.format}, {self.samples} samples -> {len(self.rows)} rows"]
        if self.cache == "hit":
            parts.append("cache hit")
        elif self.bytes_read:
            mb = self.bytes_read / 1e6
            parts.append(f"tokenized {mb:.1f} MB in {self.seconds:.1f} s ({mb / max(self.seconds, 1e-9):.1f} MB/s)")
        if self.skipped:
            parts.append("skipped or cut: " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())))
        return "; ".join(parts)


def encoder_for(spec, tokenizer, fmt: str) -> formats.Encoder:
    if fmt != "chat" and tokenizer.eos_token_id is None:
        raise DataError(formats.no_eos_message(spec.model.tokenizer or spec.model.name_or_path, fmt))
    template = chat_template(spec, tokenizer) if fmt == "chat" else None
    data = spec.data
    return formats.Encoder(tokenizer, fmt, data.seq_len, data.overlong, data.text_column, template)


def build(spec, tokenizer) -> Built:
    """Load, encode and pack the whole data set (no cache)."""
    import datasets
    import pyarrow.compute as pc

    start = time.time()
    raw, fmt = load_records(spec)
    encoder = encoder_for(spec, tokenizer, fmt)
    features = {"input_ids": datasets.List(datasets.Value("int32")), "skip": datasets.Value("string")}
    if fmt in formats.SUPERVISED:
        features["labels"] = datasets.List(datasets.Value("int32"))
    try:
        encoded = raw.map(encoder, batched=True, batch_size=1000, remove_columns=raw.column_names,
                          num_proc=num_proc(spec, len(raw)), features=datasets.Features(features),
                          desc=f"tokenizing ({fmt})")
    except UnicodeDecodeError as exc:  # Arrow's JSON reader leaves the UTF-8 check to the first read
        raise DataError(f"--dataset {spec.data.dataset}: holds bytes that are not UTF-8 text ({exc.reason}): "
                        "convert it to UTF-8 (iconv -f latin1 -t utf-8)") from exc
    table = encoded.data.table
    skip = table.column("skip")
    counts = {str(v["values"]): int(v["counts"]) for v in pc.value_counts(skip).to_pylist() if v["values"]}
    keep = pc.or_(pc.equal(skip, ""), pc.ends_with(skip, "(truncated, kept)"))
    table = table.filter(keep)
    rows = pack_table(table, fmt, spec.data.seq_len, pad_id(tokenizer), spec.data.packing)
    return Built(rows, fmt, counts, table.num_rows, seconds=time.time() - start, bytes_read=data_bytes(spec))


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def pack_table(table, fmt: str, seq_len: int, pad: int, packing: bool):
    """Encoded Arrow rows -> a datasets.Dataset of fixed-length rows."""
    import datasets
    import numpy as np
    import pyarrow as pa

    values, offsets = formats.list_column(table, "input_ids")
    if fmt == "text":
        columns = {"input_ids": formats.pack_text(values, seq_len)}
    else:
        labels, _ = formats.list_column(table, "labels")
        columns = formats.pack_supervised(values, labels, offsets, seq_len, pad, packing)
    arrays = {name: pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a, dtype=np.int32).ravel()),
                                                      seq_len) for name, a in columns.items()}
    return datasets.Dataset(pa.table(arrays))


def pack(raw, tokenizer, seq_len: int, num_proc: int | None = None):
    """Text records (a `text` column) -> blocks of seq_len with `input_ids`."""
    encoded = raw.map(formats.Encoder(tokenizer, "text", seq_len), batched=True, remove_columns=raw.column_names,
                      num_proc=num_proc)
    return pack_table(encoded.data.table, "text", seq_len, pad_id(tokenizer), True)


# --- the cache ------------------------------------------------------------------------------------

def data_files(spec) -> list[Path]:
    path = Path(spec.data.dataset).expanduser()
    if is_saved_dataset(path):
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [Path(f) for f in local_data_files(path, spec.data.split)[1]]


END_BYTES = 1 << 16  # a file's first and last 64 KiB: an edit or an append shows, a large file costs no read


def fingerprint(spec) -> dict:
    """What a checkpoint's data position counts in: the data set, split and format settings, and each
    local training file's size and a digest of its ends (a resume on other data is said before launch,
    ckpt/resume.data_change)."""
    data = spec.data
    out = {"dataset": data.dataset, "split": data.split, "eval_split": data.eval_split, "format": data.format}
    path = Path(data.dataset).expanduser()
    if builtin.is_builtin(data.dataset) or not path.exists():
        return out
    base = (path if path.is_dir() else path.parent).resolve()
    files = {}
    for file in data_files(spec):
        try:
            size = file.stat().st_size
            with open(file, "rb") as fh:
                head = fh.read(END_BYTES)
                fh.seek(max(size - END_BYTES, len(head)))
                digest = hashlib.sha256(head + fh.read()).hexdigest()[:16]
        except OSError:
            continue
        resolved = file.resolve()
        files[resolved.relative_to(base).as_posix() if resolved.is_relative_to(base) else str(resolved)] = [size, digest]
    return {**out, "files": files}


def data_bytes(spec) -> int:
    if builtin.is_builtin(spec.data.dataset) or not Path(spec.data.dataset).expanduser().exists():
        return 0
    return sum(p.stat().st_size for p in data_files(spec))


def tokenizer_digest(tokenizer) -> str:
    """A hash of what tokenizing depends on: the vocabulary and rules, special tokens, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps([tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id,
                        getattr(tokenizer, "chat_template", None), type(tokenizer).__name__])
    return hashlib.sha256((body + extra).encode()).hexdigest()


def cache_key(spec, tokenizer) -> str | None:
    """The cache entry of this data set, tokenizer and packing; None when not cached (built-in or hub data)."""
    data = spec.data
    path = Path(data.dataset).expanduser()
    if builtin.is_builtin(data.dataset) or not path.exists():
        return None
    files = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in data_files(spec)]
    fields = {"version": CACHE_VERSION, "files": files, "tokenizer": tokenizer_digest(tokenizer),
              "format": data.format, "text_column": data.text_column, "split": data.split,
              "template": formats.template_text(data.chat_template), "seq_len": data.seq_len,
              "overlong": data.overlong, "packing": data.packing, "max_samples": data.max_samples}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def cache_root(spec) -> Path:
    if spec.data.cache_dir:
        return Path(spec.data.cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "craken" / "data"


def read_cache(folder: Path) -> Built | None:
    import datasets

    info_file = folder / "info.json"
    if not info_file.is_file():
        return None
    info = json.loads(info_file.read_text())
    rows = datasets.load_from_disk(str(folder / "rows"))
    return Built(rows, info["format"], info["skipped"], info["samples"], cache="hit")


def write_cache(folder: Path, built: Built) -> None:
    """rows/ then info.json, in a temporary folder renamed into place: a half-written entry is never read."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    built.rows.save_to_disk(str(tmp / "rows"))
    (tmp / "info.json").write_text(json.dumps({"format": built.format, "skipped": built.skipped,
                                               "samples": built.samples}))
    try:
        tmp.rename(folder)
    except OSError:  # another machine sharing the cache folder was first
        shutil.rmtree(tmp, ignore_errors=True)
    built.cache = "written"


def cached_build(spec, tokenizer) -> Built:
    """The rows from the cache when this input was built before, else built (and cached when local)."""
    key = cache_key(spec, tokenizer)
    folder = cache_root(spec) / key if key else None
    if folder is not None:
        hit = read_cache(folder)
        if hit is not None:
            return hit
    built = build(spec, tokenizer)
    if folder is not None and len(built.rows):
        folder.parent.mkdir(parents=True, exist_ok=True)
        write_cache(folder, built)
        reread = read_cache(folder)  # memory-mapped from disk, as every other process reads it
        if reread is not None:
            built.rows = reread.rows
    return built


def prepared(spec, tokenizer, accelerator) -> Built:
    """The rows, built by each machine's first process while the others wait, then read from the cache."""
    start = time.time()
    problem = None
    with accelerator.local_main_process_first():
        # raised after the context: a first process leaving it by an exception would skip the barrier
        # the others wait at; they meet the same problem on their own turn
        try:
            built = cached_build(spec, tokenizer)
        except DataError as exc:
            problem = exc
    if problem is not None:
        raise problem
    if built.cache == "hit":
        built.seconds = time.time() - start
    return built


class StreamPacker:
    """Batched map over an encoded stream: the kept samples of each batch of records -> rows of seq_len
    (the same packing as the cached path, one batch of records at a time)."""

    def __init__(self, fmt: str, seq_len: int, pad: int, packing: bool):
        self.fmt, self.seq_len, self.pad, self.packing = fmt, seq_len, pad, packing

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        keep = [i for i, skip in enumerate(batch["skip"]) if formats.kept(skip)]
        lengths = np.array([len(batch["input_ids"][i]) for i in keep], dtype=np.int64)
        offsets = np.r_[0, np.cumsum(lengths)]
        flat = np.fromiter((t for i in keep for t in batch["input_ids"][i]), dtype=np.int32, count=int(offsets[-1]))
        if self.fmt == "text":
            return {"input_ids": formats.pack_text(flat, self.seq_len)}
        labels = np.fromiter((t for i in keep for t in batch["labels"][i]), dtype=np.int32, count=int(offsets[-1]))
        return formats.pack_supervised(flat, labels, offsets, self.seq_len, self.pad, self.packing)


def stream_rows(spec, tokenizer):
    """`--streaming`: the rows as a datasets.IterableDataset, read, encoded and packed while training,
    shuffled in a buffer; accelerate gives each process its own shards of it (files, or the built-in
    set's 8 shards) when there are at least as many as processes, else every process reads all of it
    and keeps its own batches."""
    raw, fmt = load_records(spec, streaming=True)
    encoded = raw.map(encoder_for(spec, tokenizer, fmt), batched=True, batch_size=1000,
                      remove_columns=list(raw.column_names or []))
    packer = StreamPacker(fmt, spec.data.seq_len, pad_id(tokenizer), spec.data.packing)
    columns = ["input_ids", "skip"] + (["labels"] if fmt in formats.SUPERVISED else [])
    rows = encoded.map(packer, batched=True, batch_size=1000, remove_columns=columns)
    return rows.shuffle(seed=spec.train.seed, buffer_size=10_000), fmt


# --- where the eval rows come from ------------------------------------------------------------------

# a data set's validation split under the names datasets gives one (its SPLIT_KEYWORDS: a folder's files
# named valid or dev are its 'validation' split, eval its 'test'), validation names before test names
VALIDATION_SPLITS = ("validation", "valid", "val", "dev", "test", "eval")


@dataclass(frozen=True)
class EvalSource:
    """The eval rows: a split of the data (all of it, no training row held out), or a share of the training
    rows (`fraction`; 0: none); `maybe` when the split names of a hub data set were not looked up, `cached`
    when they were read from datasets' cache."""
    split: str | None
    fraction: float
    maybe: bool = False
    files: tuple[str, ...] = ()  # a folder's files of that split (datasets names dev.jsonl 'validation')
    cap: int | None = None  # data.max_samples: a split is read up to that many records, as the training split is
    cached: bool = False  # a hub data set's split names as an earlier download left them in datasets' cache

    def describe(self) -> str:
        share = f"{self.fraction:.0%} of the training rows" if self.fraction > 0 else "none"
        if self.split is not None:
            more = f" and {len(self.files) - 1} more" if len(self.files) > 1 else ""
            return (f"the {self.split} split" + (f" ({self.files[0]}{more})" if self.files else "")
                    + (" (split names from datasets' cache)" if self.cached else "")
                    + (f", its first {self.cap} records at most (data.max_samples)" if self.cap else ""))
        if self.cached:
            return f"{share} (no validation split among the names in datasets' cache)"
        if self.maybe:  # the workers look the names up; unreadable there (offline, gated): the share
            return (f"the data set's first split named {', '.join(VALIDATION_SPLITS[:-1])} or {VALIDATION_SPLITS[-1]} "
                    f"if the workers can read its split names (data.eval_split auto), else {share}")
        return share


def prepared_hub_infos(name: str) -> list[Path]:
    """The dataset_info.json of each version of hub data set `name` that datasets prepared in its cache
    (NAMESPACE___NAME/CONFIG/VERSION/HASH, the folders datasets itself reads offline)."""
    try:
        from datasets import config
        from datasets.naming import camelcase_to_snakecase
    except ImportError:
        return []
    parts = name.split("/")
    folder = Path(config.HF_DATASETS_CACHE).expanduser() / "___".join([*parts[:-1], camelcase_to_snakecase(parts[-1])])
    return list(folder.glob("*/*/*/dataset_info.json"))


def cached_hub_splits(name: str) -> list[str] | None:
    """A hub data set's split names from datasets' cache, where an earlier download prepared it (the
    dataset_info.json under NAMESPACE___NAME/CONFIG/VERSION/HASH, the folders datasets itself reads offline);
    None when nothing is cached, or its cached versions disagree."""
    found = set()
    for info in prepared_hub_infos(name):
        try:
            splits = json.loads(info.read_text()).get("splits")
        except (OSError, ValueError, AttributeError):  # unreadable, or not an object
            continue
        if isinstance(splits, dict):
            found.add(tuple(splits))
    return list(found.pop()) if len(found) == 1 else None


def data_splits(spec, look_up: bool = True) -> list[str] | None:
    """The split names of the run's data set ([] for a single file, a saved Dataset or the built-in data); None
    when unknown (a hub data set not looked up and not in datasets' cache, or whose names cannot be read: its
    loading then says why)."""
    data = spec.data
    if builtin.is_builtin(data.dataset):
        return []
    path = Path(data.dataset).expanduser()
    if is_saved_dataset(path):
        try:
            names = json.loads((path / "dataset_dict.json").read_text()).get("splits")
        except (OSError, ValueError):  # a saved Dataset (state.json), without splits
            return []
        return [str(n) for n in names] if isinstance(names, list) else []
    if path.is_file():
        return []
    if path.exists():
        return list(folder_splits(path))
    if not look_up:
        return cached_hub_splits(data.dataset) if data.dataset.count("/") <= 1 else None
    try:
        import datasets

        return list(datasets.get_dataset_split_names(data.dataset))
    except Exception:  # offline, gated, a script: load_dataset names the problem when it reads the data
        return None


def eval_source(spec, look_up: bool = True) -> EvalSource:
    """Where the run's eval rows come from (data.eval_split); a DataError when the split named is not there."""
    data = spec.data
    fraction = EvalSource(None, data.eval_fraction)
    if data.streaming:
        return EvalSource(None, 0.0)
    if data.eval_split == "none":
        return fraction
    splits = data_splits(spec, look_up)
    cached = not look_up and splits is not None and not builtin.is_builtin(data.dataset) \
        and not Path(data.dataset).expanduser().exists()
    if data.eval_split == "auto":
        if splits is None:  # not looked up (the CLI): said as such; unreadable: the fraction, as said then
            return EvalSource(None, data.eval_fraction, maybe=not look_up)
        found = next((name for name in VALIDATION_SPLITS if name in splits and name != data.split), None)
        if not found:
            return EvalSource(None, data.eval_fraction, cached=cached)
        return EvalSource(found, 0.0, files=split_files(spec, found), cap=data.max_samples, cached=cached)
    if splits is not None and data.eval_split not in splits and not cached:  # a stale cache: the workers decide
        held = f"has the splits {', '.join(splits)}" if splits else "has no splits (a single file, a saved Dataset)"
        raise DataError(f"--set data.eval_split={data.eval_split}: {data.dataset} {held}: set data.eval_split to "
                        "another of them, or to none (data.eval_fraction of the training rows)")
    return EvalSource(data.eval_split, 0.0, files=split_files(spec, data.eval_split), cap=data.max_samples)


def split_files(spec, split: str) -> tuple[str, ...]:
    """The file names of a local folder's split, relative to it (none for other data)."""
    path = Path(spec.data.dataset).expanduser()
    if not path.is_dir() or is_saved_dataset(path):
        return ()
    return tuple(os.path.relpath(f, path) for f in folder_splits(path).get(split, []))


def held_out_fraction(spec) -> float:
    """The share of the training rows held out for evaluation (0 beside an eval split), without looking up a
    hub data set's splits; a missing eval split counts as none (the pre-launch check names it)."""
    try:
        return eval_source(spec, look_up=False).fraction
    except DataError:
        return spec.data.eval_fraction


def eval_spec(spec, split: str, fmt: str):
    """The run's spec reading `split` as the data, in the format its training split resolved to."""
    return spec.model_copy(update={"data": spec.data.model_copy(update={"split": split, "format": fmt})})


def prepared_eval(spec, tokenizer, accelerator, source: EvalSource, fmt: str) -> Built | None:
    """The eval split's rows, built like the training rows (cached under their own key); None when `source`
    is a share of the training rows."""
    if source.split is None:
        return None
    return prepared(eval_spec(spec, source.split, fmt), tokenizer, accelerator)


def train_eval_split(blocks, eval_fraction: float, seed: int):
    """(train, eval) block sets; eval is None when eval_fraction is 0. Indices only: nothing is written."""
    import numpy as np

    if eval_fraction <= 0 or len(blocks) < 2:
        return blocks, None
    n_eval = max(1, int(len(blocks) * eval_fraction))
    order = np.random.default_rng(seed).permutation(len(blocks))
    return blocks.select(np.sort(order[n_eval:])), blocks.select(np.sort(order[:n_eval]))


def print_report(built: Built) -> None:
    print(f"craken: {built.report()}", file=sys.stderr, flush=True)
