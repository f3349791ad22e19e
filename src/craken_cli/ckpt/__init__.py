"""Checkpoints after the fact: `craken ckpt`, `--resume`, and `--force`'s clearing of a run folder."""
