"""Text -> packed blocks of `seq_len` tokens, split into train and eval.

Loading is the real one: `datasets.load_dataset` on a hub id, or on local json/jsonl/csv/parquet/
txt files; the built-in pattern language is generated in memory. Texts are tokenized with a
batched `map`, joined with EOS and cut into equal blocks (no padding, every token trains).
"""

from __future__ import annotations

from pathlib import Path

from . import builtin

PACK_ROWS = 2000  # tokenized texts joined and cut together; each group's remainder short of a block is dropped


def builtin_lines(seq_len: int) -> int:
    """Lines of the built-in data set: enough for about 64 blocks, so long sequences still get several batches."""
    return max(4000, seq_len * 64 // 16)


# file suffix -> datasets builder
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def local_data_files(path: Path) -> tuple[str, list[str]]:
    """(builder, files) for a local file or a folder of files of one format."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in LOCAL_FORMATS)
    formats = {LOCAL_FORMATS.get(p.suffix) for p in files}
    if not files or None in formats or len(formats) != 1:
        raise ValueError(f"{path}: expected {', '.join(LOCAL_FORMATS)} files of one format")
    return formats.pop(), [str(p) for p in files]


def load_raw(spec):
    """The raw text data set (a `datasets.Dataset`) with a `text` column."""
    import datasets

    d = spec.data
    if builtin.is_builtin(d.dataset):
        raw = datasets.Dataset.from_dict(builtin.dataset_records(builtin_lines(d.seq_len), seed=spec.train.seed))
        column = "text"
    else:
        path = Path(d.dataset).expanduser()
        if path.exists():
            builder, files = local_data_files(path)
            raw = datasets.load_dataset(builder, data_files=files, split="train")
        else:
            raw = datasets.load_dataset(d.dataset, split=d.split)
        column = d.text_column
    if d.max_samples is not None:
        raw = raw.select(range(min(d.max_samples, len(raw))))
    if column not in raw.column_names:
        raise ValueError(f"column '{column}' not in the data set (columns: {raw.column_names}): set --text-column")
    raw = raw.select_columns([column])
    return raw.rename_column(column, "text") if column != "text" else raw


def pack(raw, tokenizer, seq_len: int, num_proc: int | None = None):
    """Tokenize and cut into blocks of seq_len; returns a Dataset with `input_ids`."""
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [x + [eos] if eos is not None else x for x in ids]}

    def group(batch):
        flat = [t for seq in batch["ids"] for t in seq]
        usable = len(flat) // seq_len * seq_len
        return {"input_ids": [flat[i:i + seq_len] for i in range(0, usable, seq_len)]}

    tokenized = raw.map(tokenize, batched=True, remove_columns=["text"], num_proc=num_proc,
                        desc="tokenizing")
    return tokenized.map(group, batched=True, batch_size=PACK_ROWS, remove_columns=["ids"], num_proc=num_proc,
                         desc=f"packing into {seq_len}-token blocks")


def train_eval_split(blocks, eval_fraction: float, seed: int):
    """(train, eval) block sets; eval is None when eval_fraction is 0."""
    if eval_fraction <= 0 or len(blocks) < 2:
        return blocks, None
    n_eval = max(1, int(len(blocks) * eval_fraction))
    split = blocks.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return split["train"], split["test"]
