"""The training side: runs inside each process that `accelerate launch` starts.

`loop.main(run.yaml [--resume-from CKPT])` is the entry point (`python -m craken_cli.train.loop`) and
`loop.Trainer` the recipe; `engine` holds the two engines (plain Accelerate, DeepSpeed) behind one
interface, `schedule` the lr schedule both run; `builtin` holds the embedded default model, tokenizer
and data; `data` and `modeling` load the real ones; `checkpoint` saves and loads.
"""
