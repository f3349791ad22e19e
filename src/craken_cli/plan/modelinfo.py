"""What the planner needs to know about a model, read from its config alone (no weights).

    info = model_info("path/to/folder")          # local folder with config.json
    info = model_info("meta-llama/Llama-2-7b-hf")  # hub id, through transformers.AutoConfig
    info = model_info("builtin:tiny")              # the built-in tiny Llama

Parameters are counted analytically for the Llama, Mistral, Qwen2/Qwen3, Phi-3, Gemma-2, GPT-2 and
GPT-NeoX families, straight from config.json and without importing torch (so `craken plan` stays fast);
tied input/output embeddings are counted once, as DeepSpeed counts them (by storage). Any other
architecture is built on the meta device (`AutoModelForCausalLM.from_config` under
`torch.device("meta")`: shapes only, no memory) and counted from the real module tree.
tests/test_modelinfo.py checks the analytic counts against that meta-device count per family.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import CrakenError

# Family defaults: what transformers' config class assumes when config.json omits a key.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, tie_word_embeddings=False,
                  attention_bias=False, mlp_bias=False, head_dim=None),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, head_dim=None),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False, head_dim=None),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False, head_dim=128,
                  attention_bias=False),
    "phi3": dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, tie_word_embeddings=False, head_dim=None,
                 resid_pdrop=0.0),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True, head_dim=256,
                   final_logit_softcapping=30.0, attention_bias=False),
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                 tie_word_embeddings=True, resid_pdrop=0.1, attn_pdrop=0.1, embd_pdrop=0.1),
    "gpt_neox": dict(vocab_size=50432, hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
                     intermediate_size=24576, tie_word_embeddings=False, attention_bias=True,
                     hidden_dropout=0.0, attention_dropout=0.0),
}
ANALYTIC_FAMILIES = tuple(_DEFAULTS)


@dataclass(frozen=True)
class ModelInfo:
    """The shape of a causal LM, as far as memory planning is concerned."""

    name: str
    model_type: str
    family: str  # "llama" (Llama/Mistral/Qwen: RMSNorm + gated MLP), "gpt" (LayerNorm + GELU MLP), "other"
    num_params: int  # unique parameters (tied embeddings once)
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    largest_layer_params: int  # largest module's own parameters (DeepSpeed's ZeRO-3 "largest layer")
    embedding_params: int  # input + output embeddings (output counted only when untied)
    dropout: float = 0.0  # residual dropout, which stores a mask per element in training
    counted_by: str = "analytic"  # or "meta"
    # What the activations depend on beyond the sizes (memory.layer_activation_bytes_per_token):
    norms_per_layer: int = 2  # Gemma-2 also normalizes after attention and after the MLP: 4
    fused_qkv: bool = False  # one q/k/v projection whose output stays saved (its v is a view of it)
    rotary: bool = True  # rotary positions make new q and k (GPT-2's learned positions do not)
    parallel_residual: bool = False  # GPT-NeoX: attention and MLP read the same input (both norms save it once)
    mlp_saved: int = 4  # intermediate-sized tensors the MLP saves per token (gated 4, GELU 2, GPT-2's tanh GELU 5)
    # Of those, the ones 16-bit autocast keeps in fp32: gelu_new's torch.pow is on autocast's fp32 list, so
    # pow's input copy, tanh's output and 1 + tanh are fp32, 3 of 5 (found by benchmarks/saved_tensors.py).
    mlp_autocast_fp32: int = 0
    logit_softcap: bool = False  # Gemma-2's tanh cap on the logits: one more vocabulary-sized tensor (tanh's)

    @property
    def non_embedding_params(self) -> int:
        return self.num_params - self.embedding_params

    def to_dict(self) -> dict:
        return asdict(self)


def _get(cfg: dict, key: str, family: str):
    value = cfg.get(key)
    return _DEFAULTS[family].get(key) if value is None else value


def _llama_like(cfg: dict, model_type: str, name: str) -> ModelInfo:
    family = model_type
    h, layers = _get(cfg, "hidden_size", family), _get(cfg, "num_hidden_layers", family)
    heads = _get(cfg, "num_attention_heads", family)
    kv = _get(cfg, "num_key_value_heads", family) or heads
    hd = _get(cfg, "head_dim", family) or h // heads
    inter, vocab = _get(cfg, "intermediate_size", family), _get(cfg, "vocab_size", family)
    tied = bool(_get(cfg, "tie_word_embeddings", family))
    # Qwen2 has biases on q/k/v only; Llama has them on all four projections with attention_bias.
    if family == "qwen2":
        qkv_bias, o_bias, mlp_bias = True, False, False
    else:
        qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        mlp_bias = bool(cfg.get("mlp_bias", False)) if family == "llama" else False
    q, k = heads * hd, kv * hd
    attn = h * q + 2 * h * k + q * h + (q + 2 * k if qkv_bias else 0) + (h if o_bias else 0)
    if family == "qwen3":
        attn += 2 * hd  # q_norm and k_norm over head_dim
    mlp = 3 * h * inter + ((2 * inter + h) if mlp_bias else 0)
    norms = 4 if family == "gemma2" else 2
    per_layer = attn + mlp + norms * h
    embed = vocab * h
    total = embed + layers * per_layer + h + (0 if tied else embed)
    # Phi-3 fuses q/k/v into one projection and gate/up into another.
    largest = max(embed, h * (q + 2 * k), 2 * h * inter) if family == "phi3" else max(embed, h * inter, h * q)
    return ModelInfo(name, model_type, "llama", total, layers, h, heads, kv, hd, inter, vocab, tied, largest,
                     embed if tied else 2 * embed, dropout=float(cfg.get("resid_pdrop") or 0.0),
                     norms_per_layer=norms, fused_qkv=family == "phi3",
                     logit_softcap=bool(_get(cfg, "final_logit_softcapping", family)) if family == "gemma2" else False)


def _gpt2(cfg: dict, name: str) -> ModelInfo:
    family = "gpt2"
    h, layers, heads = _get(cfg, "n_embd", family), _get(cfg, "n_layer", family), _get(cfg, "n_head", family)
    inner = _get(cfg, "n_inner", family) or 4 * h
    vocab, pos = _get(cfg, "vocab_size", family), _get(cfg, "n_positions", family)
    tied = bool(_get(cfg, "tie_word_embeddings", family))
    per_layer = 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + 2 * h + (h * inner + inner) + (inner * h + h)
    embed = vocab * h
    total = embed + pos * h + layers * per_layer + 2 * h + (0 if tied else embed)
    largest = max(embed, h * inner + inner, 3 * h * h + 3 * h)
    # "gelu_new" (GPT-2's default) is written out of pointwise ops, each saving its own tensor.
    activation = cfg.get("activation_function", "gelu_new")
    tanh_gelu = activation in ("gelu_new", "gelu_fast")
    return ModelInfo(name, "gpt2", "gpt", total, layers, h, heads, heads, h // heads, inner, vocab, tied, largest,
                     embed if tied else 2 * embed, dropout=float(_get(cfg, "resid_pdrop", family)), fused_qkv=True,
                     rotary=False, mlp_saved=5 if tanh_gelu else 2,
                     mlp_autocast_fp32=3 if activation == "gelu_new" else 0)


def _gpt_neox(cfg: dict, name: str) -> ModelInfo:
    family = "gpt_neox"
    h, layers = _get(cfg, "hidden_size", family), _get(cfg, "num_hidden_layers", family)
    heads, inter = _get(cfg, "num_attention_heads", family), _get(cfg, "intermediate_size", family)
    vocab = _get(cfg, "vocab_size", family)
    tied = bool(_get(cfg, "tie_word_embeddings", family))
    bias = bool(_get(cfg, "attention_bias", family))
    attn = h * 3 * h + h * h + ((3 * h + h) if bias else 0)
    per_layer = 4 * h + attn + (h * inter + inter) + (inter * h + h)
    embed = vocab * h
    total = embed + layers * per_layer + 2 * h + (0 if tied else embed)
    largest = max(embed, h * inter + inter, 3 * h * h + (3 * h if bias else 0))
    return ModelInfo(name, "gpt_neox", "gpt", total, layers, h, heads, heads, h // heads, inter, vocab, tied,
                     largest, embed if tied else 2 * embed, dropout=float(_get(cfg, "hidden_dropout", family)),
                     fused_qkv=True, mlp_saved=2, parallel_residual=bool(cfg.get("use_parallel_residual", True)))


def analytic_info(cfg: dict, name: str = "model") -> ModelInfo | None:
    """ModelInfo from a config dict for the analytic families; None for any other model_type."""
    model_type = cfg.get("model_type")
    if model_type in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2"):
        return _llama_like(cfg, model_type, name)
    if model_type == "gpt2":
        return _gpt2(cfg, name)
    if model_type == "gpt_neox":
        return _gpt_neox(cfg, name)
    return None


def config_params(cfg: dict) -> int | None:
    """Parameters from a config dict without torch: exact for the analytic families, else an estimate
    (+-10%) for any decoder-only transformer (MoE experts included); None when the sizes are missing.
    `craken doctor` sizes offload and checkpoints with it."""
    info = analytic_info(cfg) if cfg.get("model_type") else None
    if info is not None:
        return info.num_params
    cfg = dict(cfg.get("text_config") or cfg)
    hidden = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model")
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers")
    vocab = cfg.get("vocab_size")
    if not (hidden and layers and vocab):
        return None
    heads = cfg.get("num_attention_heads") or cfg.get("n_head") or 1
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    inter = cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * hidden
    gated = "n_embd" not in cfg  # GPT-2's MLP has two matrices, Llama-style ones three
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 1
    moe_inter = cfg.get("moe_intermediate_size") or inter
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = (3 if gated else 2) * hidden * (moe_inter if experts > 1 else inter) * experts
    embed = vocab * hidden * (1 if cfg.get("tie_word_embeddings", True) else 2)
    return int(layers * (attn + mlp + 2 * hidden) + embed + hidden)


def meta_info(cfg: dict, name: str = "model", trust_remote_code: bool = False) -> ModelInfo:
    """Count by building the model on the meta device (shapes only): works for any architecture."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**cfg) if "model_type" in cfg else AutoConfig.from_dict(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    unique = {id(p): p.numel() for p in model.parameters()}
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = getattr(text, "hidden_size", None) or getattr(text, "n_embd", 0)
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 1)
    kv = getattr(text, "num_key_value_heads", None) or heads
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", 0)
    inter = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * h
    vocab = getattr(text, "vocab_size", 0)
    emb_in = model.get_input_embeddings()
    emb_out = model.get_output_embeddings()
    tied = emb_out is not None and emb_out.weight is emb_in.weight
    embed = emb_in.weight.numel() + (0 if tied or emb_out is None else emb_out.weight.numel())
    hd = getattr(text, "head_dim", None) or (h // heads if heads else 0)
    return ModelInfo(name, config.model_type, "other", sum(unique.values()), layers, h, heads, kv, hd, inter,
                     vocab, tied, largest, embed, counted_by="meta")


def read_config(name_or_path: str, trust_remote_code: bool = False) -> dict:
    """The model's config as a dict: built-in, local folder (config.json) or hub id (AutoConfig)."""
    if name_or_path.startswith("builtin:"):
        return builtin_config(name_or_path)
    path = Path(name_or_path)
    if path.is_dir() or path.suffix == ".json":
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise CrakenError(f"{path} has no config.json: pass a folder saved with save_pretrained, or a hub id",
                              title="cannot read the model")
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as exc:  # not JSON, or not text at all
            raise CrakenError(f"{file} is not valid JSON ({exc}): fix it, or re-save the model with save_pretrained",
                              title="cannot read the model") from None
        if not isinstance(config, dict):
            raise CrakenError(f"{file} holds no JSON object: re-save the model with save_pretrained",
                              title="cannot read the model")
        return config
    from ..launch.preflight import missing_model_folder, names_local_folder

    if names_local_folder(name_or_path):
        raise CrakenError(missing_model_folder(name_or_path), title="cannot read the model")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code).to_dict()
    except (OSError, ValueError) as exc:
        raise CrakenError(f"no config for {name_or_path!r} ({str(exc).splitlines()[0]}): pass a local folder "
                          "with config.json, or check the hub id and your network", title="cannot read the model") \
            from None


def builtin_config(name: str) -> dict:
    """The built-in model's config dict (train/builtin.py owns its shape)."""
    from ..train import builtin

    if name != builtin.BUILTIN_MODEL:
        raise CrakenError(f"unknown built-in model {name!r}: use {builtin.BUILTIN_MODEL}", title="cannot read the model")
    # The built-in tokenizer's vocabulary sets vocab_size at run time; VOCAB_SIZE is its target size.
    return {"model_type": "llama", **builtin.TINY_CONFIG}


def model_info(name_or_path: str, trust_remote_code: bool = False) -> ModelInfo:
    """Read only the config; count analytically where the family is known, else on the meta device."""
    cfg = read_config(name_or_path, trust_remote_code)
    info = analytic_info(cfg, name_or_path)
    if info is None:
        if "model_type" not in cfg:
            raise CrakenError(f"{name_or_path}: config has no model_type", title="cannot read the model")
        try:
            info = meta_info(cfg, name_or_path, trust_remote_code)
        except (ValueError, KeyError, TypeError) as exc:  # an unknown model_type, or not a causal LM
            first = str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__
            raise CrakenError(f"{name_or_path}: transformers cannot build a causal LM of model_type "
                              f"{cfg.get('model_type')!r} ({first}): check config.json, or upgrade transformers",
                              title="cannot read the model") from None
    return info
