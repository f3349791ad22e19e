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
