"""The embedded default: a tiny Llama, a tokenizer trained on the spot, and a generated data set.

Nothing is downloaded. The data is a small pattern language (counting with a stride, repeating
and reversing short lists) that a tiny model learns within a minute on a CPU, so the loss falls
visibly. Everything is deterministic: every process builds the same tokenizer and the same data.
"""

from __future__ import annotations

import random

from ..config.spec import BUILTIN_DATA, BUILTIN_MODEL  # noqa: F401  (their one definition; read here too)
EOS = "<|endoftext|>"
VOCAB_SIZE = 384

# The built-in model's shape. Llama-style: RMSNorm, rotary positions, SwiGLU, grouped-query attention.
TINY_CONFIG = dict(
    hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True, vocab_size=VOCAB_SIZE,
)


def is_builtin(name: str | None) -> bool:
    return bool(name) and name.startswith("builtin:")


def pattern_lines(count: int, seed: int = 1234) -> list[str]:
    """`count` lines of the pattern language, e.g. 'count 7 by 3 : 7 10 13 16 19 22 25 28'."""
    rng = random.Random(seed)
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird"]
    lines = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.5:
            start, step = rng.randint(0, 50), rng.randint(1, 5)
            nums = " ".join(str(start + i * step) for i in range(rng.randint(6, 12)))
            lines.append(f"count {start} by {step} : {nums}")
        elif kind < 0.75:
            seq = rng.sample(words, rng.randint(2, 4))
            lines.append(f"repeat {' '.join(seq)} : " + " | ".join([" ".join(seq)] * rng.randint(2, 4)))
        else:
            seq = [str(rng.randint(0, 99)) for _ in range(rng.randint(3, 7))]
            lines.append(f"reverse {' '.join(seq)} : {' '.join(reversed(seq))}")
    return lines


def dataset_records(count: int = 4000, seed: int = 1234) -> dict[str, list[str]]:
    return {"text": pattern_lines(count, seed)}


def build_tokenizer():
    """A byte-level BPE tokenizer trained on the pattern language (well under a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(pattern_lines(2000, seed=7), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   model_max_length=TINY_CONFIG["max_position_embeddings"])


def model_config(tokenizer=None):
    from transformers import LlamaConfig

    cfg = dict(TINY_CONFIG)
    if tokenizer is not None:
        cfg["vocab_size"] = len(tokenizer)
        cfg["eos_token_id"] = cfg["bos_token_id"] = tokenizer.eos_token_id
    return LlamaConfig(**cfg)
