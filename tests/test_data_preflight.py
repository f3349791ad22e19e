"""Bad data caught before launch (preflight.data_problems through the real CLI): exit 2, one message
naming what to change, no traceback, nothing written."""

from __future__ import annotations

import json

import pytest

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
}


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_data_is_refused_before_launch(name, craken, workdir):
    files, flags, needles = CASES[name]
    for rel, text in files.items():
        (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (workdir / rel).write_text(text)
    dataset = "d" if any(rel.startswith("d/") for rel in files) else "d.jsonl"
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
