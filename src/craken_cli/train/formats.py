"""Records -> token samples, per data format, and samples -> rows of `seq_len` tokens.

Formats (`data.format`): 'text' (one text column; the texts are joined with EOS and cut into blocks,
every token trains), and three supervised ones whose loss covers only the response: 'prompt_completion'
(prompt, completion), 'alpaca' (instruction, input, output; the prompt is the Alpaca template) and
'chat' (`messages`: a list of {role, content} rendered with the tokenizer's chat template, or
ShareGPT's `conversations`: a list of {from, value}; the assistant turns train, labels are -100 on every
system/user/tool token). TRL's conversational prompt-completion records (prompt and completion each a list
of messages) are chat: prompt + completion rendered as one conversation, the completion's assistant turns
train (`resolve`). TRL's other types (prompt-only, preference, unpaired preference, stepwise supervision)
give no supervised target craken trains on and are refused by name (`trl_shape`). The assistant tokens
are found by rendering each conversation up to every assistant turn (with the generation prompt) and to
its end, so any template that renders a conversation's beginning the same way in both works; no
`{% generation %}` block is needed.

`encode` is a batched `datasets.map` function (picklable, so `num_proc` processes run it): one output
row per record, with `skip` naming why a record gives no sample (counted and reported, never raised).
`pack_text` / `pack_supervised` work on the Arrow columns as NumPy arrays (no Python list per token).
Packed supervised rows restart `position_ids` at 0 for every sample: transformers' masks
(masking_utils.find_packed_sequence_indices, used by sdpa, eager and flash_attention_2) then keep a
sample from attending to the one before it. The first label of every sample is -100 too
(DataCollatorWithFlattening's separator), so no token is trained to predict the next sample.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FORMATS = ("text", "prompt_completion", "alpaca", "chat")
SUPERVISED = ("prompt_completion", "alpaca", "chat")
ROLES = ("system", "developer", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool"}
CHAT_COLUMNS = ("messages", "conversations")  # OpenAI/HF {role, content}; ShareGPT {from, value}
IGNORE = -100  # the label transformers' loss skips

# columns each format reads, in detection order (the most specific first)
FORMAT_COLUMNS = {"chat": CHAT_COLUMNS, "alpaca": ("instruction", "output"),
                  "prompt_completion": ("prompt", "completion")}

ALPACA_PROMPT = ("Below is an instruction that describes a task{with_input}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")


# TRL's dataset types that hold no (prompt, response to train) pair: the columns that mark each, and why
TRL_SHAPES = {
    "preference": (("chosen", "rejected"), "pairs a chosen with a rejected response, for preference trainers "
                   "(DPO, ORPO, reward models); to fine-tune on the chosen responses, rename chosen to completion "
                   "(beside prompt) or to messages (implicit prompt) and drop rejected"),
    "stepwise supervision": (("completions", "labels"), "labels reasoning steps, for process reward models"),
    "unpaired preference": (("completion", "label"), "marks each completion desirable or not, for KTO; training on "
                            "every completion would teach the undesirable ones too: keep the rows whose label is "
                            "true and drop the label column"),
    "prompt-only": (("prompt",), "holds prompts without responses, for online trainers (GRPO, RLOO, PPO): "
                    "there is no target to train on"),
}
SUPPORTED = ("craken trains text, prompt/completion (text, or lists of chat messages), alpaca "
             "(instruction/output) and chat (messages or conversations) records")


def is_messages(value) -> bool:
    """A list of chat turns (TRL's conversational format): a non-empty list of objects."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def conversational_pair(record: dict | None) -> bool:
    """Whether a record's prompt and completion are lists of messages (TRL's conversational prompt-completion)."""
    return record is not None and is_messages(record.get("prompt")) and is_messages(record.get("completion"))


def is_bool_label(value) -> bool:
    """A boolean label: True/False, or the text a CSV cell holds it as ("True", "false"; CSV cells are read as
    text)."""
    return isinstance(value, bool) or (isinstance(value, str) and value.strip().lower() in ("true", "false"))


def trl_shape(columns: list[str], record: dict | None) -> str | None:
    """The TRL dataset type without a trainable pair these columns are, or None. An unpaired preference set is
    told from a prompt/completion set by its boolean `label` (as text in a CSV file); prompt-only by having no supported column."""
    if any(c in columns for c in CHAT_COLUMNS) or all(c in columns for c in FORMAT_COLUMNS["alpaca"]):
        return None  # a supported format is there (SFT sets often carry preference columns beside messages)
    if "completion" in columns and "prompt" in columns:
        label = record.get("label") if record is not None else None
        return "unpaired preference" if is_bool_label(label) else None
    for shape, (needed, _) in TRL_SHAPES.items():
        if shape != "unpaired preference" and all(c in columns for c in needed):
            return shape
    return None


def trl_message(shape: str, where: str) -> str:
    needed, why = TRL_SHAPES[shape]
    marked = f"the {needed[0]} column" if len(needed) == 1 else f"{', '.join(needed)} columns"
    return (f"--dataset {where}: these records are TRL's {shape} type ({marked}), which "
            f"{why}; {SUPPORTED}")


def resolve(fmt: str, columns: list[str], text_column: str, record: dict | None) -> str | None:
    """The format records train as: the one asked for, else the one the columns show; prompt/completion
    holding lists of messages is chat (rendered with the chat template), whether asked as prompt_completion,
    chat or auto."""
    found = fmt if fmt != "auto" else detect(columns, text_column)
    if found in ("prompt_completion", "chat") and not any(c in columns for c in CHAT_COLUMNS) \
            and conversational_pair(record):
        return "chat"
    return found


def detect(columns: list[str], text_column: str) -> str | None:
    """The format whose columns are all present (chat: one of its two, then alpaca, then prompt/completion,
    then the text column), or None."""
    if any(c in columns for c in CHAT_COLUMNS):
        return "chat"
    for fmt, needed in FORMAT_COLUMNS.items():
        if fmt != "chat" and all(c in columns for c in needed):
            return fmt
    return "text" if text_column in columns else None


def columns_of(fmt: str, text_column: str) -> tuple[str, ...]:
    """The columns a format reads (alpaca's `input` is optional)."""
    if fmt == "text":
        return (text_column,)
    if fmt == "chat":  # prompt/completion: TRL's conversational prompt-completion
        return CHAT_COLUMNS + FORMAT_COLUMNS["prompt_completion"]
    return ("instruction", "input", "output") if fmt == "alpaca" else FORMAT_COLUMNS[fmt]


def format_problem(fmt: str, columns: list[str], text_column: str, where: str,
                   record: dict | None = None) -> str | None:
    """What to change when the columns found do not fit the format asked for (or none fits `auto`), or are a
    TRL type craken does not train; `record` (the first, when known) tells chat messages from text."""
    found = ", ".join(c[:40] for c in columns[:10]) + (f", ... ({len(columns)} in all)" if len(columns) > 10 else "")
    found = found or "none"
    shape = trl_shape(columns, record)
    if shape == "unpaired preference" and fmt != "text":
        return trl_message(shape, where)
    problem = pair_problem(fmt, columns, record, where)
    if problem:
        return problem
    if fmt == "auto":
        if detect(columns, text_column) is None:
            if shape is not None:
                return trl_message(shape, where)
            return (f"--text-column {text_column!r} is not a column of {Path(where).name} (columns: {found}), and no "
                    "other format fits (messages or conversations: chat, instruction/output: alpaca, "
                    "prompt/completion): set --text-column or --data-format")
        return None
    needed = columns_of(fmt, text_column)
    missing = [c for c in needed if c not in columns and not (fmt == "alpaca" and c == "input")]
    if fmt == "chat":  # one of messages / conversations, or both of prompt / completion, is enough
        chat_missing = [c for c in CHAT_COLUMNS if c not in columns]
        pair_missing = [c for c in FORMAT_COLUMNS["prompt_completion"] if c not in columns]
        missing = [] if len(chat_missing) < len(CHAT_COLUMNS) or not pair_missing else \
            [" or ".join(chat_missing + ["prompt/completion"])]
    if missing and shape is not None:
        return trl_message(shape, where)
    if missing:
        flag = "--text-column" if fmt == "text" else "--data-format"
        return (f"--data-format {fmt} reads the column(s) {', '.join(missing)}, not in {where} (columns: {found}): "
                f"set {flag}")
    return None


def template_text(value: str | None) -> str | None:
    """`data.chat_template` as Jinja text: the file it names, else the value itself."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if "{" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    return value


def pair_problem(fmt: str, columns: list[str], record: dict | None, where: str) -> str | None:
    """A prompt/completion record (no chat column beside) whose halves are one messages and one text, or whose
    text halves --data-format chat was asked to read."""
    if record is None or not all(c in columns for c in FORMAT_COLUMNS["prompt_completion"]) \
            or any(c in columns for c in CHAT_COLUMNS):
        return None
    if fmt in ("auto", "prompt_completion", "chat") and is_messages(record["prompt"]) != is_messages(record["completion"]):
        return (f"--dataset {where}: one of prompt and completion is a list of chat messages, the other is not: "
                "make both text, or both lists of {role, content} messages")
    if fmt == "chat" and not conversational_pair(record):
        return (f"--data-format chat reads messages, conversations, or prompt/completion as lists of chat messages; "
                f"the prompt/completion of {where} are text: use --data-format prompt_completion (or auto)")
    return None


def no_template_message(tokenizer_name: str) -> str:
    return (f"--data-format chat: the tokenizer {tokenizer_name} has no chat template to render the messages with: "
            "give one with --chat-template (Jinja text or a file), or use a tokenizer that has one (--tokenizer)")


def no_eos_message(tokenizer_name: str, fmt: str) -> str:
    return (f"--data-format {fmt}: the tokenizer {tokenizer_name} has no EOS token, which ends every "
            f"{'text' if fmt == 'text' else 'response'} (without it the model never learns to stop): use a "
            "tokenizer that has one (--tokenizer), or chat data, whose template ends the turns")


def alpaca_prompt(instruction: str, input_text: str | None) -> str:
    if input_text:
        return ALPACA_PROMPT.format(with_input=", paired with an input that provides further context",
                                    instruction=instruction, input_block=f"### Input:\n{input_text}\n\n")
    return ALPACA_PROMPT.format(with_input="", instruction=instruction, input_block="")


class Encoder:
    """Batched map function: records of one format -> `input_ids`, `labels` (supervised) and `skip`."""

    def __init__(self, tokenizer, fmt: str, seq_len: int, overlong: str = "truncate", text_column: str = "text",
                 chat_template: str | None = None):
        self.tokenizer, self.fmt, self.seq_len, self.overlong = tokenizer, fmt, seq_len, overlong
        self.text_column, self.chat_template = text_column, chat_template
        self.eos = tokenizer.eos_token_id

    def __call__(self, batch: dict) -> dict:
        if self.fmt == "text":
            return self.encode_text(batch[self.text_column])
        if self.fmt == "chat" and not any(c in batch for c in CHAT_COLUMNS):
            pairs = [self.conversation_pair_segments(p, c) for p, c in zip(batch["prompt"], batch["completion"])]
        elif self.fmt == "chat":
            column = next(c for c in CHAT_COLUMNS if c in batch)
            pairs = [self.chat_segments(m) for m in batch[column]]
        elif self.fmt == "alpaca":
            inputs = batch.get("input") or [None] * len(batch["instruction"])
            pairs = [self.alpaca_segments(i, x, o) for i, x, o in zip(batch["instruction"], inputs, batch["output"])]
        else:
            pairs = [self.completion_segments(p, c) for p, c in zip(batch["prompt"], batch["completion"])]
        return self.encode_segments(pairs)

    def encode_text(self, texts: list) -> dict:
        keep = [isinstance(t, str) for t in texts]
        ids = self.token_ids([t for t, k in zip(texts, keep) if k])
        tail = [self.eos] if self.eos is not None else []
        it = iter(ids)
        out = [next(it) + tail if k else [] for k in keep]
        return {"input_ids": out, "skip": ["" if k else "non-string text" for k in keep]}

    # --- supervised: (segments [(text, trains)], skip reason) per record -----------------------------

    def completion_segments(self, prompt, completion):
        if not isinstance(prompt, str) or not isinstance(completion, str):
            return [], "non-string prompt or completion"
        if not completion.strip():
            return [], "empty response"
        return [(prompt, False), (completion, True)], ""

    def alpaca_segments(self, instruction, input_text, output):
        if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(input_text, (str, type(None))):
            return [], "non-string instruction, input or output"
        if not output.strip():
            return [], "empty response"
        return [(alpaca_prompt(instruction, input_text), False), (output, True)], ""

    def conversation_pair_segments(self, prompt, completion):
        """TRL's conversational prompt-completion: one conversation, whose completion's assistant turns train
        (an assistant turn inside the prompt is context, as the prompt of a text pair is)."""
        if not is_messages(prompt) or not is_messages(completion):
            return [], "prompt or completion not a list of messages"
        return self.chat_segments(prompt + completion, trained_from=len(prompt))

    def chat_segments(self, turns, trained_from: int = 0):
        """Segments of a conversation; the assistant turns from index `trained_from` on train."""
        messages, skip = chat_messages(turns)
        if skip:
            return [], skip
        if not any(m["role"] == "assistant" for m in messages[trained_from:]):
            return [], "no assistant turn in the completion"
        segments, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or i < trained_from:
                continue
            try:
                prefix = self.render(messages[:i], generation_prompt=True)
                full = self.render(messages[:i + 1], generation_prompt=False)
            except Exception as exc:  # templates raise what they like: raise_exception, a TypeError on a value
                return [], f"chat template refused the conversation ({first_line(exc)})"
            if not prefix.startswith(done) or not full.startswith(prefix):
                return [], "chat template renders a conversation's turns inconsistently"
            segments += [(prefix[len(done):], False), (full[len(prefix):], True)]
            done = full
        return segments, ""

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids without special tokens; through the Rust tokenizer's `encode_batch_fast` where there is
        one (no character offsets: about 20% less CPU than the tokenizer's __call__, same ids)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch_fast"):
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]

    def render(self, messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def encode_segments(self, pairs) -> dict:
        """Tokenize every segment of the batch at once; labels copy the training segments' tokens."""
        texts = [text for segments, _ in pairs for text, _ in segments]
        ids = iter(self.token_ids(texts) if texts else [])
        bos = [self.tokenizer.bos_token_id] if self.fmt != "chat" and self.adds_bos() else []
        out_ids, out_labels, skips = [], [], []
        for segments, skip in pairs:
            tokens, labels = list(bos), [IGNORE] * len(bos)
            for _, trains in segments:
                part = next(ids)
                tokens += part
                labels += part if trains else [IGNORE] * len(part)
            if segments and self.fmt != "chat" and self.eos is not None:  # chat templates end their own turns
                tokens.append(self.eos)
                labels.append(self.eos)
            tokens, labels, skip = self.fit(tokens, labels, skip)
            out_ids.append(tokens)
            out_labels.append(labels)
            skips.append(skip)
        return {"input_ids": out_ids, "labels": out_labels, "skip": skips}

    def adds_bos(self) -> bool:
        bos = self.tokenizer.bos_token_id
        return bos is not None and bos != self.eos and self.tokenizer("a")["input_ids"][:1] == [bos]

    def fit(self, tokens, labels, skip):
        """A sample within seq_len: truncated or dropped (`overlong`), and one with no trained token left out."""
        if skip:
            return [], [], skip
        if len(tokens) > self.seq_len:
            if self.overlong == "drop":
                return [], [], "longer than seq_len (dropped)"
            tokens, labels = tokens[:self.seq_len], labels[:self.seq_len]
            if all(x == IGNORE for x in labels[1:]):
                return [], [], "prompt fills seq_len: no response token left"
            return tokens, labels, "longer than seq_len (truncated, kept)"
        return tokens, labels, ""


def first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:80] if text else type(exc).__name__


def chat_turn(m) -> tuple[dict | None, str]:
    """One turn as chat templates read it, or why it cannot be one. Keys without a value are dropped:
    Arrow gives every turn of a file each key any turn has (`name`, `tool_calls`, ...) as None, and
    templates test `'tool_calls' in message`. ShareGPT's from/value become role/content; a content list of
    text parts becomes its joined text; an assistant turn of tool calls alone gets an empty content."""
    if not isinstance(m, dict):
        return None, "a turn that is not an object"
    turn = {k: v for k, v in m.items() if v is not None}
    if "role" not in turn and "from" in turn:
        role = turn.pop("from")
        turn["role"] = SHAREGPT_ROLES.get(role, role)
        if "value" in turn:
            turn["content"] = turn.pop("value")
    if turn.get("role") not in ROLES:
        return None, f"unknown role {turn.get('role')!r}"
    content = turn.get("content", "" if turn.get("tool_calls") else None)
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            return None, "a turn with non-text content parts (image, audio, ...)"
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        return None, "a turn without string content"
    return {**turn, "content": content}, ""


def chat_messages(turns) -> tuple[list[dict], str]:
    """A conversation's turns made template-ready (`chat_turn`), or the reason it trains nothing."""
    if not isinstance(turns, list) or not turns:
        return [], "messages is not a list of turns"
    messages = []
    for m in turns:
        turn, skip = chat_turn(m)
        if skip:
            return [], skip
        messages.append(turn)
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        return [], "no assistant turn"
    if any(not m["content"].strip() and not m.get("tool_calls") for m in assistant):
        return [], "empty response"
    return messages, ""


def kept(skip: str) -> bool:
    """Whether a record with this skip note gives a sample (a truncated one does, and is still counted)."""
    return skip == "" or skip.endswith("(truncated, kept)")


# --- packing on NumPy arrays --------------------------------------------------------------------------

def list_column(table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets) of an Arrow list<int> column, without a Python object per token."""
    import pyarrow as pa

    column = table.column(name)
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(array, pa.ChunkedArray):  # an empty chunked column
        array = pa.array([], type=pa.list_(pa.int32()))
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy(zero_copy_only=False)
    return values[offsets[0]:offsets[-1]], offsets - offsets[0]


def pack_text(values: np.ndarray, seq_len: int) -> np.ndarray:
    """The joined tokens cut into whole blocks of seq_len (the remainder short of a block dropped)."""
    usable = len(values) // seq_len * seq_len
    return values[:usable].reshape(-1, seq_len)


def row_of_samples(lengths: np.ndarray, seq_len: int, packing: bool) -> np.ndarray:
    """Row index of each sample: next-fit in order when packing (a loop per sample, not per token),
    else one row each."""
    if not packing:
        return np.arange(len(lengths))
    rows = np.empty(len(lengths), dtype=np.int64)
    row, used = 0, 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > seq_len and used:
            row, used = row + 1, 0
        rows[i] = row
        used += n
    return rows


def pack_supervised(values: np.ndarray, labels: np.ndarray, offsets: np.ndarray, seq_len: int, pad_id: int,
                    packing: bool = True) -> dict[str, np.ndarray]:
    """Samples (flat tokens, flat labels, offsets) -> rows of seq_len: `input_ids`, `labels` (-100 on the
    padding and on each sample's first token) and `position_ids` (0 at each sample's start, and at the
    padding's, which so counts as a sample of its own)."""
    lengths = np.diff(offsets)
    rows = row_of_samples(lengths, seq_len, packing)
    n_rows = int(rows[-1]) + 1 if len(rows) else 0
    sample_of_token = np.repeat(np.arange(len(lengths)), lengths)
    row_of_token = rows[sample_of_token]
    row_start = np.zeros(n_rows, dtype=np.int64)  # flat index of each row's first token
    first_sample = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]) if len(rows) else np.array([], dtype=np.int64)
    row_start[rows[first_sample]] = offsets[first_sample]
    col = np.arange(len(values)) - row_start[row_of_token]
    position = np.arange(len(values)) - offsets[sample_of_token]
    ids = np.full((n_rows, seq_len), pad_id, dtype=np.int32)
    out_labels = np.full((n_rows, seq_len), IGNORE, dtype=np.int32)
    pos = np.tile(np.arange(seq_len, dtype=np.int32), (n_rows, 1))
    ids[row_of_token, col] = values
    first_token = labels.astype(np.int32, copy=True)
    first_token[offsets[:-1][lengths > 0]] = IGNORE
    out_labels[row_of_token, col] = first_token
    pos[row_of_token, col] = position
    used = np.bincount(row_of_token, minlength=n_rows)  # the padding of each row restarts at 0
    pad = np.arange(seq_len)[None, :] >= used[:, None]
    pos[pad] = (np.arange(seq_len)[None, :] - used[:, None])[pad]
    return {"input_ids": ids, "labels": out_labels, "position_ids": pos}
