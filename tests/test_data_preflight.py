"""Bad data caught before launch (preflight.data_problems through the real CLI): exit 2, one message
naming what to change, no traceback, nothing written."""

from __future__ import annotations

import json

import pytest

TEXTS = (json.dumps({"text": "count 1 by 1 : 1 2 3 4 5 6 7 8 9 " * 40}) + "\n") * 20  # rows enough for 2 processes
CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})

CASES = {
    "unknown-format-columns": ({"d.jsonl": '{"question": "a"}\n'}, [], ["--text-column 'text' is not a column",
                                                                        "question", "--data-format"]),
    "format-columns-missing": ({"d.jsonl": '{"text": "a"}\n'}, ["--data-format", "alpaca"],
                               ["--data-format alpaca", "instruction, output", "columns: text"]),
    "unknown-format-value": ({"d.jsonl": '{"text": "a"}\n'}, ["--data-format", "sharegpt"], ["sharegpt"]),
    "corrupt-line": ({"d.jsonl": '{"text": "a"}\n{"text": "b"}\n{"text": "c"\n'}, [],
                     ["d.jsonl: line 3 is not valid JSON", "fix or remove that line"]),
    "mixed-folder": ({"d/a.jsonl": '{"text": "a"}\n', "d/b.csv": "text\nb\n"}, [],
                     ["mixes .csv, .jsonl", "keep one format"]),
    "non-string-text": ({"d.jsonl": '{"text": 3}\n'}, [], ["line 1: 'text' is 3, not a string"]),
    "chat-without-template": ({"d.jsonl": CHAT + "\n"}, [], ["no chat template", "--chat-template"]),
    "chat-template-file-missing": ({"d.jsonl": CHAT + "\n"}, ["--chat-template", "tmpl.jinja"],
                                   ["--chat-template tmpl.jinja", "no such file"]),
    # datasets reads one JSON object of columns as one record, whose values are lists: nothing would train
    "json-object-of-columns": ({"d.json": json.dumps({"text": ["a", "b"]})}, [],
                               ["one JSON object of columns", "write a list of records", ".jsonl"]),
    "split-not-in-folder": ({"d/train.jsonl": '{"text": "a"}\n', "d/test.jsonl": '{"text": "b"}\n'},
                            ["--set", "data.split=validation"], ["holds the splits train, test", "data.split"]),
    "compressed-unknown-suffix": ({"d.gz": "x"}, [], ["unsupported file type '.gz'", ".jsonl"]),
    "trl-preference": ({"d.jsonl": json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"}, [],
                       ["TRL's preference type", "rename chosen to completion", "craken trains text"]),
    "trl-unpaired-preference": ({"d.jsonl": json.dumps({"prompt": "a", "completion": "b", "label": False}) + "\n"},
                                [], ["TRL's unpaired preference type", "label is true"]),
    "trl-conversational-prompt-only": ({"d.jsonl": json.dumps({"prompt": [{"role": "user", "content": "a"}]}) + "\n"},
                                       [], ["TRL's prompt-only type", "no target to train on"]),
    # CSV cells are text: the same refusals as from JSON, an unpaired set told by its "True"/"False" labels
    "trl-preference-csv": ({"d.csv": "prompt,chosen,rejected\na,b,c\n"}, [],
                           ["TRL's preference type", "rename chosen to completion", "craken trains text"]),
    "trl-unpaired-preference-csv": ({"d.csv": "prompt,completion,label\na,b,False\n"}, [],
                                    ["TRL's unpaired preference type", "label is true"]),
    "trl-prompt-only-csv": ({"d.csv": "prompt\na\n"}, [], ["TRL's prompt-only type", "no target to train on"]),
    "trl-stepwise-csv": ({"d.csv": 'prompt,completions,labels\na,"[\'b\']",[True]\n'}, [],
                         ["TRL's stepwise supervision type", "process reward models"]),
    # the conversational prompt/completion is chat: rendered with a template, which the built-in tokenizer lacks
    "trl-conversational-pair-without-template": (
        {"d.jsonl": json.dumps({"prompt": [{"role": "user", "content": "a"}],
                                "completion": [{"role": "assistant", "content": "b"}]}) + "\n"},
        [], ["no chat template", "--chat-template"]),
    "eval-split-not-in-folder": ({"d/train.jsonl": TEXTS, "d/dev.jsonl": '{"text": "b"}\n'},
                                 ["--set", "data.eval_split=test"],
                                 ["data.eval_split=test", "has the splits train, validation", "or to none"]),
    "eval-split-of-another-format": ({"d/train.jsonl": TEXTS, "d/validation.jsonl": '{"body": "b"}\n'},
                                     [], ["the eval split 'validation'", "format text", "data.eval_split to none"]),
}


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_data_is_refused_before_launch(name, craken, workdir):
    files, flags, needles = CASES[name]
    for rel, text in files.items():
        (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (workdir / rel).write_text(text)
    dataset = "d" if any(rel.startswith("d/") for rel in files) else next(iter(files))
    before = files_under(workdir)
    result = craken("train", "--num-processes", "2", "--dataset", dataset, *flags)
    assert result.code == 2, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.err, result.err
    assert files_under(workdir) == before


def test_a_chat_set_with_a_template_given_passes_preflight(tmp_path):
    from craken_cli.launch import preflight
    from craken_cli.config.spec import RunSpec

    data = tmp_path / "chat.jsonl"
    data.write_text(CHAT + "\n")
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    spec = RunSpec.model_validate({"data": {"dataset": str(data), "chat_template": str(template), "eval_fraction": 0},
                                   "batch": {"micro_batch": 1}})
    assert preflight.data_problems(spec) == []
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    spec = RunSpec.model_validate({"data": {"dataset": str(data), "eval_fraction": 0}, "batch": {"micro_batch": 1},
                                   "model": {"tokenizer": str(tokenizer)}})
    assert preflight.data_problems(spec) == []


LINE_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")  # turns end without an EOS token


def bare_tokenizer(folder):
    """The built-in tokenizer's vocabulary saved without any special token (no EOS, no pad)."""
    from transformers import PreTrainedTokenizerFast

    from craken_cli.train import builtin

    PreTrainedTokenizerFast(tokenizer_object=builtin.build_tokenizer().backend_tokenizer).save_pretrained(folder)
    return folder


def test_a_tokenizer_without_eos_is_refused_before_launch_for_responses_only(tmp_path):
    from craken_cli.config.spec import RunSpec
    from craken_cli.launch import preflight

    tokenizer = str(bare_tokenizer(tmp_path / "tok"))
    pc = tmp_path / "pc.jsonl"
    pc.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    spec = RunSpec.model_validate({"data": {"dataset": str(pc), "eval_fraction": 0}, "model": {"tokenizer": tokenizer}})
    (problem,) = preflight.data_problems(spec)
    assert "no EOS token" in problem and "--tokenizer" in problem
    chat = tmp_path / "chat.jsonl"
    chat.write_text(CHAT + "\n")
    spec = RunSpec.model_validate({"data": {"dataset": str(chat), "eval_fraction": 0, "chat_template": LINE_TEMPLATE},
                                   "model": {"tokenizer": tokenizer}, "batch": {"micro_batch": 1}})
    assert preflight.data_problems(spec) == []


def test_bom_compressed_and_saved_data_pass_preflight(tmp_path):
    """What the workers read (tests/test_data_formats.py) the preflight reads too: a BOM is no column name,
    a .jsonl.gz is JSON lines, a save_to_disk folder is its records, not its metadata files."""
    import gzip

    import datasets

    from craken_cli.config.spec import RunSpec
    from craken_cli.launch import preflight

    (tmp_path / "bom.csv").write_text("\ufefftext\ncount 1 by 1 : 1 2 3\n")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"text": "count 1 by 1 : 1 2 3"}) + "\n")
    datasets.Dataset.from_list([{"question": "a"}]).save_to_disk(str(tmp_path / "saved"))
    for name in ("bom.csv", "d.jsonl.gz"):
        spec = RunSpec.model_validate({"data": {"dataset": str(tmp_path / name), "eval_fraction": 0, "seq_len": 4},
                                       "batch": {"micro_batch": 1}})
        assert preflight.data_problems(spec) == [], name
    spec = RunSpec.model_validate({"data": {"dataset": str(tmp_path / "saved"), "eval_fraction": 0}})
    (problem,) = preflight.data_problems(spec)
    assert "--text-column 'text' is not a column" in problem and "(columns: question)" in problem


def test_a_conversational_parquet_file_is_told_from_its_first_row(tmp_path):
    """Parquet's schema alone does not show whether prompt holds text or messages: the first row does."""
    import pandas

    from craken_cli.config.spec import RunSpec
    from craken_cli.launch import preflight

    path = tmp_path / "d.parquet"
    pandas.DataFrame([{"prompt": [{"role": "user", "content": "a"}],
                       "completion": [{"role": "assistant", "content": "b"}]}]).to_parquet(path)
    (problem,) = preflight.data_problems(RunSpec.model_validate({"data": {"dataset": str(path)}}))
    assert "no chat template" in problem


def test_the_summary_says_where_the_eval_rows_come_from(tmp_path):
    from craken_cli.config.spec import RunSpec
    from craken_cli.report.summary import summary_lines
    from craken_cli.train.data import eval_source

    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "valid.jsonl").write_text('{"text": "b"}\n')
    spec = RunSpec.model_validate({"data": {"dataset": str(tmp_path)}, "cluster": {"num_processes": 1}})
    lines = summary_lines(spec, {}, "runs/x", None, eval_from=eval_source(spec).describe())
    assert "  eval rows   the validation split (valid.jsonl)" in lines
    spec = RunSpec.model_validate({"data": {"dataset": str(tmp_path), "eval_split": "none"},
                                   "cluster": {"num_processes": 1}})
    assert "  eval rows   5% of the training rows" in summary_lines(spec, {}, "runs/x", None,
                                                                 eval_from=eval_source(spec).describe())


def test_a_damaged_compressed_file_is_one_message(tmp_path):
    """lzma's and zlib's own errors are no OSError: they escaped the check as a traceback."""
    from craken_cli.config.spec import RunSpec
    from craken_cli.launch.preflight import data_problems

    data = tmp_path / "rows.jsonl.xz"
    data.write_bytes(b"not xz at all")
    (problem,) = data_problems(RunSpec.model_validate({"data": {"dataset": str(data)}}))
    assert problem.startswith(f"--dataset {data}: cannot be read (LZMAError") and problem.endswith("fix the file")
