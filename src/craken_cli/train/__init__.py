"""The training side: runs inside each process that `accelerate launch` starts.

`loop.main(run.yaml)` is the entry point (`python -m craken_cli.train.loop`); `builtin` holds the
embedded default model, tokenizer and data; `data` and `modeling` load the real ones.
"""
