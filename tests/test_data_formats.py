"""Data formats (train/formats.py) and the cached build (train/data.py), on the built-in tokenizer with a
chat template given here (the built-in one has none), real datasets and a real tiny Llama."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from craken_cli.config.spec import RunSpec
from craken_cli.train import builtin, data, formats

TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")

CHAT = [
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "count 1 by 2"},
                  {"role": "assistant", "content": "1 3 5 7"}, {"role": "user", "content": "reverse 4 5"},
                  {"role": "assistant", "content": "5 4"}]},
    {"messages": [{"role": "user", "content": "repeat red"}, {"role": "assistant", "content": "red | red"}]},
]


@pytest.fixture(scope="module")
def tok():
    return builtin.build_tokenizer()


def spec_for(path, **data_fields) -> RunSpec:
    return RunSpec.model_validate({"data": {"dataset": str(path), "eval_fraction": 0, **data_fields}})


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def trained_text(tok, ids, labels) -> str:
    return tok.decode([i for i, label in zip(ids, labels) if label != formats.IGNORE])


def test_formats_are_detected_from_the_columns_and_a_mismatch_names_the_flag():
    assert formats.detect(["messages", "id"], "text") == "chat"
    assert formats.detect(["instruction", "input", "output"], "text") == "alpaca"
    assert formats.detect(["prompt", "completion"], "text") == "prompt_completion"
    assert formats.detect(["body"], "body") == "text"
    assert formats.detect(["question"], "text") is None
    assert "--text-column or --data-format" in formats.format_problem("auto", ["question"], "text", "x.jsonl")
    assert "(columns: c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, ... (50 in all))" in formats.format_problem(
        "auto", [f"c{i}" for i in range(50)], "text", "x.csv")
    problem = formats.format_problem("alpaca", ["prompt", "completion"], "text", "x.jsonl")
    assert "instruction, output" in problem and "set --data-format" in problem
    assert formats.format_problem("alpaca", ["instruction", "output"], "text", "x") is None  # input is optional


def test_chat_labels_cover_only_the_assistant_turns(tok):
    out = formats.Encoder(tok, "chat", 128, chat_template=TEMPLATE)({"messages": [CHAT[0]["messages"]]})
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert out["skip"] == [""]
    assert tok.decode(ids).startswith("<|system|>be brief")
    # each assistant turn and its end-of-turn token trains; no system or user token does
    assert trained_text(tok, ids, labels) == f"1 3 5 7{builtin.EOS}5 4{builtin.EOS}"


def test_alpaca_and_prompt_completion_train_on_the_response_and_eos(tok):
    alpaca = formats.Encoder(tok, "alpaca", 256)({"instruction": ["count 2 by 2"], "input": ["from 2"],
                                                   "output": ["2 4 6"]})
    ids, labels = alpaca["input_ids"][0], alpaca["labels"][0]
    assert "### Instruction:\ncount 2 by 2" in tok.decode(ids) and "### Input:\nfrom 2" in tok.decode(ids)
    assert trained_text(tok, ids, labels) == f"2 4 6{builtin.EOS}"
    pc = formats.Encoder(tok, "prompt_completion", 64)({"prompt": ["reverse 1 2 :"], "completion": [" 2 1"]})
    assert trained_text(tok, pc["input_ids"][0], pc["labels"][0]) == f" 2 1{builtin.EOS}"


def test_bad_records_are_skipped_with_their_reason(tok):
    chat = formats.Encoder(tok, "chat", 64, chat_template=TEMPLATE)({"messages": [
        [{"role": "bot", "content": "hi"}], [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}],
        [{"role": "user", "content": "a"}], [{"role": "user", "content": 3}]]})
    assert chat["skip"] == ["unknown role 'bot'", "empty response", "no assistant turn", "a turn without string content"]
    assert chat["input_ids"] == [[]] * 4
    text = formats.Encoder(tok, "text", 64)({"text": ["count 1 by 1", None, 7]})
    assert text["skip"] == ["", "non-string text", "non-string text"]


def test_overlong_samples_are_truncated_or_dropped(tok):
    record = {"prompt": ["count 1 by 1 :"], "completion": [" " + " ".join(map(str, range(1, 60)))]}
    cut = formats.Encoder(tok, "prompt_completion", 32, overlong="truncate")(record)
    assert len(cut["input_ids"][0]) == 32 and cut["skip"] == ["longer than seq_len (truncated, kept)"]
    dropped = formats.Encoder(tok, "prompt_completion", 32, overlong="drop")(record)
    assert dropped["input_ids"] == [[]] and dropped["skip"] == ["longer than seq_len (dropped)"]
    no_room = formats.Encoder(tok, "prompt_completion", 4)({"prompt": ["count 1 by 1 : 1 2 3 4"], "completion": ["5"]})
    assert no_room["skip"] == ["prompt fills seq_len: no response token left"]


def test_packed_rows_restart_positions_and_never_train_across_samples():
    values = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9], dtype=np.int32)
    labels = np.array([-100, 2, 3, -100, 5, -100, -100, 8, 9], dtype=np.int32)
    offsets = np.array([0, 3, 5, 9])
    packed = formats.pack_supervised(values, labels, offsets, 6, 0, packing=True)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    assert packed["labels"].tolist() == [[-100, 2, 3, -100, 5, -100], [-100, -100, 8, 9, -100, -100]]
    padded = formats.pack_supervised(values, labels, offsets, 6, 0, packing=False)
    assert padded["input_ids"].shape == (3, 6) and padded["input_ids"][1].tolist() == [4, 5, 0, 0, 0, 0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_sample_sees_only_itself(tok, attn):
    """The logits of two samples packed in one row equal those of each sample run alone: transformers'
    masks read the restarting position ids, so the second sample does not attend to the first. Only
    without a KV cache (transformers skips the packed mask with one): training loads models with
    use_cache off (train/modeling.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(builtin.model_config(tok), attn_implementation=attn).eval()
    a, b = [5, 9, 11, 30, 2], [7, 8, 40]
    packed = formats.pack_supervised(np.array(a + b, dtype=np.int32), np.array(a + b, dtype=np.int32),
                                     np.array([0, 5, 8]), 10, 0)
    with torch.no_grad():
        row = model(input_ids=torch.tensor(packed["input_ids"], dtype=torch.long),
                    position_ids=torch.tensor(packed["position_ids"], dtype=torch.long), use_cache=False).logits[0]
        alone_b = model(input_ids=torch.tensor([b])).logits[0]
        alone_a = model(input_ids=torch.tensor([a])).logits[0]
    torch.testing.assert_close(row[:5], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(row[5:8], alone_b, atol=1e-5, rtol=1e-5)


def test_chat_file_builds_masked_rows_and_the_second_build_is_a_cache_hit(tmp_path, tok):
    tok.chat_template = TEMPLATE
    try:
        path = write_jsonl(tmp_path / "chat.jsonl", CHAT * 20 + [{"messages": [{"role": "oracle", "content": "x"}]}])
        spec = spec_for(path, seq_len=128, cache_dir=str(tmp_path / "cache"))
        first = data.cached_build(spec, tok)
        assert first.format == "chat" and first.cache == "written" and first.samples == 40
        assert first.skipped == {"unknown role 'oracle'": 1}
        row = first.rows.with_format("numpy")[0]
        assert set(row) == {"input_ids", "labels", "position_ids"} and row["position_ids"][0] == 0
        trained = trained_text(tok, row["input_ids"], row["labels"])
        assert "count" not in trained and "be brief" not in trained and "1 3 5 7" in trained
        second = data.cached_build(spec, tok)
        assert second.cache == "hit" and second.report().count("cache hit") == 1
        assert second.rows["input_ids"] == first.rows["input_ids"]
        os.utime(path, ns=(1, 1))  # the data file changed: a new entry
        assert data.cached_build(spec, tok).cache == "written"
        other = spec_for(path, seq_len=64, cache_dir=str(tmp_path / "cache"))
        assert data.cache_key(other, tok) != data.cache_key(spec, tok)
    finally:
        tok.chat_template = None


def test_chat_without_a_template_names_the_flag(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    with pytest.raises(data.DataError, match="--chat-template"):
        data.build(spec_for(path), tok)
    template_file = tmp_path / "template.jinja"
    template_file.write_text(TEMPLATE)
    built = data.build(spec_for(path, chat_template=str(template_file), seq_len=256), tok)
    assert built.samples == 2 and len(built.rows) == 1


def test_text_blocks_are_the_joined_tokens_cut_to_seq_len(tmp_path, tok):
    lines = builtin.pattern_lines(300)
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in lines])
    built = data.build(spec_for(path, seq_len=32), tok)
    flat = [i for ids in tok(lines, add_special_tokens=False)["input_ids"] for i in ids + [tok.eos_token_id]]
    assert built.format == "text" and len(built.rows) == len(flat) // 32
    assert built.rows["input_ids"][1] == flat[32:64]


def test_corrupt_jsonl_line_and_mixed_folders_are_named(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": broken\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl line 3: not valid JSON"):
        data.load_raw(spec_for(path))
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": "a"}])
    (folder / "b.csv").write_text("text\nb\n")
    with pytest.raises(data.DataError, match=r"the folder mixes \.csv, \.jsonl files"):
        data.load_raw(spec_for(folder))


def test_streaming_rows_are_packed_and_masked_like_the_cached_ones(tmp_path, tok):
    records = [{"prompt": f"count {i} by 1 :", "completion": " " + " ".join(str(i + k) for k in range(6))}
               for i in range(300)]
    path = write_jsonl(tmp_path / "pc.jsonl", records + [{"prompt": "a", "completion": ""}])
    spec = spec_for(path, seq_len=64, streaming=True)
    rows, fmt = data.stream_rows(spec, tok)
    assert fmt == "prompt_completion"
    seen = list(rows)
    cached = data.build(spec_for(path, seq_len=64), tok)
    assert len(seen) >= len(cached.rows) and all(len(r["input_ids"]) == 64 for r in seen)
    for row in seen[:20]:
        ids, labels, pos = (np.asarray(row[k]) for k in ("input_ids", "labels", "position_ids"))
        assert (labels[pos == 0] == formats.IGNORE).all()  # no token trained to predict the next sample
        trained = trained_text(tok, ids, labels)
        assert "count" not in trained and trained.endswith(builtin.EOS)


# --- the chat and file shapes users bring -------------------------------------------------------------

# Llama 3.1's test of a tool-call turn: `'tool_calls' in message`, which a None value passes
TOOL_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{% if 'tool_calls' in m %}{% for c in m.tool_calls %}"
                 "call {{ c.function.name }}{% endfor %}{% endif %}{{ m.content }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
NO_SYSTEM_TEMPLATE = ("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}"
                      "{% endif %}" + TEMPLATE)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def parts(text):
    return [{"type": "text", "text": text}]


CHAT_SHAPES = {
    # a `name` on one turn: Arrow gives every turn of the file a name, None where it had none
    "openai-name": [{"messages": [{"role": "system", "content": "be brief", "name": "rules"}, user("count 1 by 2"),
                                  assistant("1 3 5")]},
                    {"messages": [user("reverse 4 5"), assistant("5 4")]}],
    "openai-tool-calls": [{"messages": [user("count 2 by 2"),
                                        {"role": "assistant", "content": None, "tool_calls": [
                                            {"type": "function", "function": {"name": "count", "arguments": "{}"}}]},
                                        {"role": "tool", "content": "2 4 6"}, assistant("2 4 6")]},
                          {"messages": [user("reverse 4 5"), assistant("5 4")]}],
    "content-parts": [{"messages": [user(parts("count 1 by 2")), assistant(parts("1 3 5"))]},
                      {"messages": [user("reverse 4 5"), assistant("5 4")]}],
    "sharegpt": [{"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "count 1 by 2"},
                                    {"from": "gpt", "value": "1 3 5"}]},
                 {"conversations": [{"from": "human", "value": "reverse 4 5"}, {"from": "gpt", "value": "5 4"}]}],
}
CHAT_ANSWERS = {"openai-name": ["1 3 5", "5 4"], "openai-tool-calls": ["call count", "2 4 6", "5 4"],
                "content-parts": ["1 3 5", "5 4"], "sharegpt": ["1 3 5", "5 4"]}


@pytest.mark.parametrize("shape", list(CHAT_SHAPES))
def test_real_chat_shapes_train_exactly_the_assistant_turns(shape, tmp_path, tok):
    """Read from a file as the run reads it (so with Arrow's None-filled keys), packed one sample per row: the
    trained tokens decode to the assistant turns and their end-of-turn tokens, nothing else."""
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT_SHAPES[shape])
    built = data.build(spec_for(path, seq_len=128, packing=False, chat_template=TOOL_TEMPLATE), tok)
    assert built.format == "chat" and built.skipped == {} and built.samples == 2
    trained = "".join(trained_text(tok, r["input_ids"], r["labels"]) for r in built.rows.with_format("numpy"))
    assert trained == "".join(a + builtin.EOS for a in CHAT_ANSWERS[shape])


def test_a_conversation_the_template_or_the_text_refuses_is_a_counted_skip(tok):
    records = [[{"role": "system", "content": "s"}, user("a"), assistant("b")], [user("a"), assistant("b")],
               [user([{"type": "image_url", "image_url": {"url": "x.png"}}]), assistant("a cat")],
               [user("a"), assistant(None)]]
    out = formats.Encoder(tok, "chat", 64, chat_template=NO_SYSTEM_TEMPLATE)({"messages": records})
    assert out["skip"] == ["chat template refused the conversation (System role not supported)", "",
                           "a turn with non-text content parts (image, audio, ...)", "a turn without string content"]


def test_truncation_that_cuts_every_assistant_token_is_a_counted_skip(tok):
    long_user = [user("count 1 by 1 " + " ".join(map(str, range(60)))), assistant("1 2")]
    late_answer = [user("a"), assistant("b"), user("count 1 by 1 " + " ".join(map(str, range(60)))), assistant("c")]
    out = formats.Encoder(tok, "chat", 32, chat_template=TEMPLATE)({"messages": [long_user, late_answer]})
    assert out["skip"] == ["prompt fills seq_len: no response token left", "longer than seq_len (truncated, kept)"]
    assert trained_text(tok, out["input_ids"][1], out["labels"][1]) == "b" + builtin.EOS  # the first answer trains


def write_saved(path, records, split=None):
    import datasets

    rows = datasets.Dataset.from_list(records)
    (datasets.DatasetDict({split: rows}) if split else rows).save_to_disk(str(path))
    return path


def write_gzip(path, records):
    import gzip

    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    return path


PAIRS = [{"prompt": "what is 1 + 1 =", "completion": "2"}, {"prompt": "say NA", "completion": "NA"}]
SHAPES = {
    "csv-numbers-and-NA": lambda d: (d / "d.csv").write_text("prompt,completion\nwhat is 1 + 1 =,2\nsay NA,NA\n")
    and d / "d.csv",
    "jsonl-bom-blank-lines": lambda d: (d / "d.jsonl").write_text(
        "\ufeff" + json.dumps(PAIRS[0]) + "\n\n" + json.dumps(PAIRS[1]) + "\n\n") and d / "d.jsonl",
    "csv-bom": lambda d: (d / "d.csv").write_text("\ufeffprompt,completion\nwhat is 1 + 1 =,2\nsay NA,NA\n")
    and d / "d.csv",
    "json-list": lambda d: (d / "d.json").write_text(json.dumps(PAIRS)) and d / "d.json",
    "parquet": lambda d: __import__("pandas").DataFrame(PAIRS).to_parquet(d / "d.parquet") or d / "d.parquet",
    "jsonl-gz": lambda d: write_gzip(d / "d.jsonl.gz", PAIRS),
    "save-to-disk": lambda d: write_saved(d / "saved", PAIRS),
    "save-to-disk-dict": lambda d: write_saved(d / "saved", PAIRS, split="train"),
    "folder-of-files": lambda d: (write_jsonl(d / "a.jsonl", PAIRS[:1]), write_jsonl(d / "b.jsonl", PAIRS[1:]))
    and d,
    "folder-of-splits": lambda d: (write_jsonl(d / "train.jsonl", PAIRS), write_jsonl(d / "test.jsonl", [
        {"prompt": "held out", "completion": "never trained"}])) and d,
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_local_shape_gives_the_same_records(shape, tmp_path):
    """The numbers and the "NA" of a CSV stay text; a BOM, blank lines and compression are read through;
    a folder of train/test files trains on its train split only; a save_to_disk folder is loaded as saved."""
    folder = tmp_path / "data"
    folder.mkdir()
    raw = data.load_raw(spec_for(SHAPES[shape](folder)))
    assert raw.to_list() == PAIRS


def test_other_splits_of_a_folder_or_saved_dict_are_chosen_by_data_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", PAIRS)
    write_jsonl(tmp_path / "validation.jsonl", PAIRS[:1])
    assert data.load_raw(spec_for(tmp_path, split="validation")).to_list() == PAIRS[:1]
    with pytest.raises(data.DataError, match="holds the splits train, validation: set --set data.split"):
        data.load_raw(spec_for(tmp_path, split="test"))
    saved = write_saved(tmp_path / "saved", PAIRS, split="dev")
    with pytest.raises(data.DataError, match=r"no split 'train' \(it has dev\)"):
        data.load_raw(spec_for(saved))
    assert data.load_raw(spec_for(saved, split="dev")).to_list() == PAIRS


def test_a_tokenizer_without_eos_is_refused_for_texts_and_responses_not_for_chat(tmp_path):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=builtin.build_tokenizer().backend_tokenizer)
    assert bare.eos_token_id is None and bare.pad_token_id is None
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "count 1 by 1 :", "completion": " 1 2"}])
    with pytest.raises(data.DataError, match="no EOS token.*--tokenizer"):
        data.build(spec_for(pc), bare)
    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    built = data.build(spec_for(chat, seq_len=128, chat_template=TEMPLATE.replace("{{ eos_token }}", "\n")), bare)
    assert built.samples == 2 and built.rows["input_ids"][0][-1] == 0  # padded with id 0, labels -100 there


# --- TRL's conversational prompt-completion, and the TRL types craken does not train -------------------------

def turn(role, content):
    return {"role": role, "content": content}


CONVERSATIONAL = [  # an assistant turn inside the prompt is context: only the completion trains
    {"prompt": [turn("system", "be brief"), turn("user", "count 1 by 2"), turn("assistant", "1 3 5"),
                turn("user", "reverse 4 5")],
     "completion": [turn("assistant", "5 4")]},
    {"prompt": [turn("user", "repeat red")], "completion": [turn("assistant", "red | red")]},
]


@pytest.mark.parametrize("asked", ["auto", "prompt_completion", "chat"])
def test_conversational_prompt_completion_trains_the_completion_through_the_template(asked, tmp_path, tok):
    path = write_jsonl(tmp_path / "pc.jsonl", CONVERSATIONAL)
    built = data.build(spec_for(path, format=asked, seq_len=256, chat_template=TEMPLATE, packing=False), tok)
    assert built.format == "chat" and built.samples == 2 and built.skipped == {}
    eos = builtin.EOS
    rows = [(r["input_ids"], r["labels"]) for r in built.rows]
    assert tok.decode(rows[0][0]).startswith(  # padded with EOS after
        f"<|system|>be brief{eos}<|user|>count 1 by 2{eos}<|assistant|>1 3 5{eos}<|user|>reverse 4 5{eos}"
        "<|assistant|>5 4")
    assert [trained_text(tok, ids, labels) for ids, labels in rows] == [f"5 4{eos}", f"red | red{eos}"]


def test_a_conversational_record_whose_completion_has_no_assistant_turn_is_a_counted_skip(tok):
    encoder = formats.Encoder(tok, "chat", 128, chat_template=TEMPLATE)
    out = encoder({"prompt": [[turn("user", "a"), turn("assistant", "x")], [turn("user", "a")]],
                   "completion": [[turn("user", "b")], "text"]})
    assert out["skip"] == ["no assistant turn in the completion", "prompt or completion not a list of messages"]


TRL_TYPES = {  # TRL's dataset types without a (prompt, response) pair, standard and conversational
    "preference": {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    "preference-implicit-prompt": {"chosen": [turn("user", "sky?"), turn("assistant", "blue")],
                                   "rejected": [turn("user", "sky?"), turn("assistant", "green")]},
    "unpaired preference": {"prompt": [turn("user", "sky?")], "completion": [turn("assistant", "green")],
                            "label": False},
    "prompt-only": {"prompt": [turn("user", "sky?")]},
    "stepwise supervision": {"prompt": "1+1?", "completions": ["1+1 is 2", "so 2"], "labels": [True, True]},
}


@pytest.mark.parametrize("name", list(TRL_TYPES))
@pytest.mark.parametrize("asked", ["auto", "prompt_completion", "chat"])
def test_trl_types_without_a_response_to_train_are_refused_by_name(name, asked, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [TRL_TYPES[name]])
    with pytest.raises(data.DataError) as caught:
        data.load_records(spec_for(path, format=asked))
    message = str(caught.value)
    assert f"TRL's {name.split('-implicit')[0]} type" in message and "craken trains text, prompt/completion" in message


CSV_TRL_TYPES = {  # the standard (text) forms as CSV holds them: every cell text, the booleans "True"/"False"
    "preference": "prompt,chosen,rejected\nThe sky is, blue., green.\n",
    "preference-implicit-prompt": "chosen,rejected\nthe sky is blue,the sky is green\n",
    "unpaired preference": "prompt,completion,label\nThe sky is, green.,False\nThe sky is, blue.,True\n",
    "prompt-only": "prompt\nThe sky is\n",
    "stepwise supervision": 'prompt,completions,labels\n1+1?,"[\'1+1 is 2\', \'so 2\']","[True, True]"\n',
}


@pytest.mark.parametrize("name", list(CSV_TRL_TYPES))
@pytest.mark.parametrize("asked", ["auto", "prompt_completion", "chat"])
def test_trl_types_from_csv_are_refused_as_from_json(name, asked, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(CSV_TRL_TYPES[name])
    with pytest.raises(data.DataError) as caught:
        data.load_records(spec_for(path, format=asked))
    message = str(caught.value)
    assert f"TRL's {name.split('-implicit')[0]} type" in message and "craken trains text, prompt/completion" in message


def test_a_csv_label_column_that_is_not_boolean_is_a_prompt_completion_set(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion,label\nThe sky is, blue.,weather\n")
    assert data.load_records(spec_for(path))[1] == "prompt_completion"


def test_a_supported_column_beside_trl_columns_trains_and_mixed_kinds_are_refused():
    ultrafeedback = {"prompt": "sky?", "chosen": [turn("user", "sky?")], "messages": [turn("user", "sky?")]}
    assert formats.format_problem("auto", list(ultrafeedback), "text", "d", ultrafeedback) is None
    assert formats.format_problem("auto", ["prompt", "text"], "text", "d", {"prompt": "a", "text": "b"}) is None
    mixed = {"prompt": [turn("user", "a")], "completion": "b"}
    assert "make both text, or both lists" in formats.format_problem("auto", list(mixed), "text", "d", mixed)
    text_pair = {"prompt": "a", "completion": "b"}
    assert "use --data-format prompt_completion" in formats.format_problem("chat", list(text_pair), "text", "d",
                                                                           text_pair)


# --- eval rows from the data's own validation split ------------------------------------------------------------

def test_the_eval_rows_come_from_the_validation_split_when_the_data_has_one(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", PAIRS)
    write_jsonl(folder / "dev.jsonl", PAIRS[:1])  # datasets' name for it: validation
    assert data.eval_source(spec_for(folder)) == data.EvalSource("validation", 0.0, files=("dev.jsonl",))
    assert data.eval_source(spec_for(folder)).describe() == "the validation split (dev.jsonl)"
    assert data.eval_source(spec_for(folder, eval_split="none", eval_fraction=0.1)) == data.EvalSource(None, 0.1)
    with pytest.raises(data.DataError, match="has the splits train, validation: set data.eval_split"):
        data.eval_source(spec_for(folder, eval_split="test"))
    saved = write_saved(tmp_path / "saved", PAIRS, split="train")
    assert data.eval_source(spec_for(saved, eval_fraction=0.1)) == data.EvalSource(None, 0.1)
    import datasets
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS), "validation": datasets.Dataset.from_list(PAIRS),
                          "test": datasets.Dataset.from_list(PAIRS[:1])}).save_to_disk(str(tmp_path / "dict"))
    assert data.eval_source(spec_for(tmp_path / "dict")).split == "validation"
    # training on the validation split: auto takes the next one, test
    assert data.eval_source(spec_for(tmp_path / "dict", split="validation")).split == "test"
    single = write_jsonl(tmp_path / "one.jsonl", PAIRS)
    assert data.eval_source(spec_for(single, eval_fraction=0.2)).describe() == "20% of the training rows"
    with pytest.raises(data.DataError, match="has no splits"):
        data.eval_source(spec_for(single, eval_split="validation"))
    assert data.eval_source(spec_for("org/hub-set"), look_up=False).maybe


def write_cached_info(cache, folder, splits, version="0.0.0"):
    """A dataset_info.json where datasets' cache keeps a prepared hub data set's (NAME/CONFIG/VERSION/HASH)."""
    info = cache / folder / "default" / version / "abc123" / "dataset_info.json"
    info.parent.mkdir(parents=True)
    info.write_text(json.dumps({"splits": {name: {"name": name, "num_examples": 1} for name in splits}}))


def test_a_hub_sets_eval_split_is_named_from_datasets_cache_without_a_download(tmp_path, monkeypatch):
    from datasets import config

    monkeypatch.setattr(config, "HF_DATASETS_CACHE", tmp_path)
    unknown = data.eval_source(spec_for("org/hub-set", eval_fraction=0.05), look_up=False)
    assert unknown.maybe and unknown.describe() == (
        "the data set's first split named validation, valid, val, dev, test or eval if the workers can read its "
        "split names (data.eval_split auto), else 5% of the training rows")
    write_cached_info(tmp_path, "org___hub_set", ["train", "test"])  # datasets' folder name for org/HubSet
    source = data.eval_source(spec_for("org/HubSet"), look_up=False)
    assert source == data.EvalSource("test", 0.0, cached=True)
    assert source.describe() == "the test split (split names from datasets' cache)"
    write_cached_info(tmp_path, "org___only_train", ["train"])
    assert data.eval_source(spec_for("org/only_train", eval_fraction=0.1), look_up=False).describe() == \
        "10% of the training rows (no validation split among the names in datasets' cache)"
    write_cached_info(tmp_path, "org___hub_set", ["train", "validation"], version="1.0.0")  # versions disagree
    assert data.eval_source(spec_for("org/HubSet"), look_up=False).maybe


def test_max_samples_caps_the_training_split_and_the_eval_split_each(tmp_path, tok):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", PAIRS * 5)
    write_jsonl(folder / "dev.jsonl", PAIRS * 3)
    spec = spec_for(folder, max_samples=4, packing=False)
    source = data.eval_source(spec)
    assert source.describe() == "the validation split (dev.jsonl), its first 4 records at most (data.max_samples)"
    assert data.build(spec, tok).samples == 4
    assert data.build(data.eval_spec(spec, source.split, "prompt_completion"), tok).samples == 4
    whole = spec_for(folder, max_samples=100, packing=False)
    assert data.build(data.eval_spec(whole, "validation", "prompt_completion"), tok).samples == len(PAIRS) * 3
    # without an eval split the share is held out of the capped training rows; the cap says nothing there
    assert data.eval_source(spec_for(folder, max_samples=4, eval_split="none", eval_fraction=0.25)).describe() \
        == "25% of the training rows"


def test_the_eval_split_is_built_under_its_own_cache_key_and_the_training_rows_stay_whole(tmp_path, tok):
    import contextlib
    import types

    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", CONVERSATIONAL * 4)
    write_jsonl(folder / "validation.jsonl", CONVERSATIONAL[1:])
    spec = spec_for(folder, chat_template=TEMPLATE, seq_len=256, packing=False, eval_fraction=0.25,
                    cache_dir=str(tmp_path / "cache"))
    accelerator = types.SimpleNamespace(local_main_process_first=contextlib.nullcontext)
    built = data.prepared(spec, tok, accelerator)
    source = data.eval_source(spec)
    evaluated = data.prepared_eval(spec, tok, accelerator, source, built.format)
    assert (len(built.rows), built.format, len(evaluated.rows), evaluated.format) == (8, "chat", 1, "chat")
    assert trained_text(tok, evaluated.rows[0]["input_ids"], evaluated.rows[0]["labels"]) == "red | red" + builtin.EOS
    assert data.held_out_fraction(spec) == 0.0  # no training row held out beside the validation split
    keys = {data.cache_key(s, tok) for s in (spec, data.eval_spec(spec, "validation", "chat"),
                                              spec_for(folder, chat_template=TEMPLATE, seq_len=256, packing=False,
                                                       eval_fraction=0.25, eval_split="none"))}
    assert len(keys) == 2  # the eval split its own entry; the training rows' entry whatever eval_split says
    assert data.prepared_eval(spec_for(folder, eval_split="none"), tok, accelerator,
                              data.EvalSource(None, 0.05), "chat") is None


def test_eval_split_naming_the_training_split_or_under_streaming_is_a_configuration_problem():
    with pytest.raises(ValueError, match=r"data.eval_split train is the training split \(data.split\)"):
        RunSpec.model_validate({"data": {"eval_split": "train"}})
    with pytest.raises(ValueError, match="a --streaming run does not evaluate"):
        RunSpec.model_validate({"data": {"eval_split": "dev", "streaming": True}})


def test_a_compressed_file_cut_short_keeps_the_workers_message(tmp_path):
    """After datasets fails, the worker looks for the bad line; a .jsonl.gz cut short raised gzip's EOFError
    from inside that search, a traceback instead of the 'cannot be read' message."""
    import gzip

    from craken_cli.train.data import corrupt_json_line

    whole = gzip.compress(b"".join(b'{"text": "row %d"}\n' % i for i in range(2000)))
    cut = tmp_path / "rows.jsonl.gz"
    cut.write_bytes(whole[:len(whole) // 2])
    assert corrupt_json_line([str(cut)]) is None
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"text": "a"}\nnot json\n'))
    assert corrupt_json_line([str(bad)]).startswith(f"{bad} line 2: not valid JSON")
