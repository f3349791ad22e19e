"""Parameter counts from config alone: the analytic count of each family must equal the count of
the same config built on the meta device by transformers (the ground truth for any architecture)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from craken_cli.errors import CrakenError
from craken_cli.plan.modelinfo import analytic_info, meta_info, model_info

SMALL = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300)

FAMILY_CONFIGS = {
    "llama": {"model_type": "llama", **SMALL},
    "llama-tied-bias-headdim": {"model_type": "llama", **SMALL, "tie_word_embeddings": True,
                                "attention_bias": True, "mlp_bias": True, "head_dim": 32},
    # a wide MLP: the largest layer is a projection, not the embedding
    "llama-wide-mlp": {"model_type": "llama", **SMALL, "intermediate_size": 2048, "vocab_size": 20},
    "mistral": {"model_type": "mistral", **SMALL},
    "qwen2": {"model_type": "qwen2", **SMALL},
    "qwen2-tied": {"model_type": "qwen2", **SMALL, "tie_word_embeddings": True},
    "qwen3": {"model_type": "qwen3", **SMALL, "head_dim": 16},
    "phi3": {"model_type": "phi3", **SMALL, "num_key_value_heads": 4, "pad_token_id": 0},
    "gemma2": {"model_type": "gemma2", **SMALL, "head_dim": 32},
    "gemma2-untied-bias": {"model_type": "gemma2", **SMALL, "head_dim": 16, "tie_word_embeddings": False,
                           "attention_bias": True},
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 3, "n_head": 4, "vocab_size": 300, "n_positions": 128},
    "gpt2-untied-inner": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 300,
                          "n_positions": 64, "n_inner": 100, "tie_word_embeddings": False},
    "gpt_neox": {"model_type": "gpt_neox", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "vocab_size": 300},
    "gpt_neox-tied-nobias": {"model_type": "gpt_neox", "hidden_size": 64, "intermediate_size": 256,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300,
                             "tie_word_embeddings": True, "attention_bias": False},
}


@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_analytic_count_equals_meta_device_count(name):
    cfg = FAMILY_CONFIGS[name]
    analytic, meta = analytic_info(cfg, name), meta_info(cfg, name)
    assert analytic is not None and analytic.counted_by == "analytic" and meta.counted_by == "meta"
    assert analytic.num_params == meta.num_params
    assert analytic.tied_embeddings == meta.tied_embeddings
    assert analytic.embedding_params == meta.embedding_params
    assert analytic.largest_layer_params == meta.largest_layer_params
    assert (analytic.num_layers, analytic.hidden_size, analytic.vocab_size) == (meta.num_layers, meta.hidden_size,
                                                                                meta.vocab_size)


def test_tied_embeddings_are_counted_once():
    untied = analytic_info({"model_type": "llama", **SMALL})
    tied = analytic_info({"model_type": "llama", **SMALL, "tie_word_embeddings": True})
    assert untied.num_params - tied.num_params == SMALL["vocab_size"] * SMALL["hidden_size"]


def test_llama2_7b_is_counted_exactly():
    # Llama-2-7b-hf's published count: 6,738,415,616 parameters.
    cfg = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}
    assert analytic_info(cfg).num_params == 6_738_415_616


def test_local_folder_and_unknown_family_through_meta(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(FAMILY_CONFIGS["qwen2"]))
    assert model_info(str(tmp_path)).num_params == analytic_info(FAMILY_CONFIGS["qwen2"]).num_params
    other = tmp_path / "phi"
    other.mkdir()
    cfg = {"model_type": "phi", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 200}
    (other / "config.json").write_text(json.dumps(cfg))
    info = model_info(str(other))
    assert info.counted_by == "meta" and info.num_params == meta_info(cfg).num_params > 0


def test_builtin_tiny_matches_the_training_model():
    from craken_cli.train import builtin

    info = model_info("builtin:tiny")
    assert info.counted_by == "analytic" and info.tied_embeddings
    meta = meta_info({"model_type": "llama", **builtin.TINY_CONFIG})
    assert info.num_params == meta.num_params


def test_missing_config_is_a_user_error(tmp_path):
    with pytest.raises(CrakenError, match="config.json"):
        model_info(str(tmp_path))


def test_analytic_families_do_not_import_torch(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(FAMILY_CONFIGS["llama"]))
    code = ("import sys; from craken_cli.plan.modelinfo import model_info; "
            f"print(model_info({str(tmp_path)!r}).num_params); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(analytic_info(FAMILY_CONFIGS["llama"]).num_params), "False"]


# Public config.json values of ten families (benchmarks/model_configs) and their published parameter counts.
PUBLISHED = {
    "llama-3.2-1b": 1_235_814_400, "llama-3.1-8b": 8_030_261_248, "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512, "mistral-7b": 7_241_732_096, "phi-3-mini": 3_821_079_552,
    "gemma-2-2b": 2_614_341_888, "smollm2-1.7b": 1_711_376_384, "gpt2-medium": 354_823_168,
    "pythia-1.4b": 1_414_647_808,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_configs_are_counted_exactly_without_torch_and_on_the_meta_device(name):
    from pathlib import Path

    cfg = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "model_configs" / f"{name}.json").read_text())
    analytic, meta = analytic_info(cfg, name), meta_info(cfg, name)
    assert analytic is not None, f"{cfg['model_type']} should be counted analytically"
    assert analytic.num_params == meta.num_params == PUBLISHED[name]
    assert (analytic.tied_embeddings, analytic.embedding_params, analytic.largest_layer_params) == (
        meta.tied_embeddings, meta.embedding_params, meta.largest_layer_params)
    assert (analytic.num_kv_heads, analytic.head_dim, analytic.vocab_size) == (meta.num_kv_heads, meta.head_dim,
                                                                               meta.vocab_size)


def test_doctor_counts_with_the_planner():
    from craken_cli import doctor

    gemma = {"model_type": "gemma2", "hidden_size": 2304, "num_hidden_layers": 26, "num_attention_heads": 8,
             "num_key_value_heads": 4, "head_dim": 256, "intermediate_size": 9216, "vocab_size": 256000}
    assert doctor.params_from_config(gemma) == analytic_info(gemma).num_params == 2_614_341_888
