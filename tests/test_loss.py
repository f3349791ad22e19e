"""The chunked large-vocabulary loss (train/loss.py): where it applies, the same loss and gradients as
the model's own on tiny Llama, Mistral and Qwen2 models with a 120k vocabulary, and the logits it
never keeps (what the autograd graph saves for the backward, counted)."""

from __future__ import annotations

import copy
import types

import pytest
import torch

from craken_cli.train import loss as vocab_loss

VOCAB = 120_000


def spec(setting="auto", stage=0, compile=False):
    return types.SimpleNamespace(model=types.SimpleNamespace(loss=setting, compile=compile),
                                 zero=types.SimpleNamespace(stage=stage), cluster=types.SimpleNamespace(use_cpu=True))


@pytest.mark.parametrize("setting, model_type, vocab, stage, compiled, expected", [
    ("auto", "qwen2", 151_936, 0, False, True),
    ("auto", "llama", 128_256, 2, False, True),
    ("auto", "qwen2", 151_936, 0, True, False),  # compiled, the model's own loss is leaner and faster
    ("auto", "llama", 32_000, 0, False, False),  # small vocabularies keep the model's loss
    ("chunked", "llama", 32_000, 0, True, True),
    ("model", "qwen2", 151_936, 0, False, False),
    ("auto", "qwen2", 151_936, 3, False, False),  # ZeRO-3: the output weight is a partitioned placeholder
    ("auto", "gpt2", 200_000, 0, False, False),  # other families: their own loss
])
def test_where_it_applies(setting, model_type, vocab, stage, compiled, expected):
    assert vocab_loss.applies(setting, model_type, vocab, stage, compiled) is expected


def test_chunks_are_whole_tiles_of_about_a_gibibyte():
    assert vocab_loss.chunk_tokens(151_936) == 3328
    assert vocab_loss.chunk_tokens(32_000) == 16640
    assert vocab_loss.chunk_tokens(10**9) == 256


def tiny(model_type: str, tied: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               tie_word_embeddings=tied, use_cache=False)
    return AutoModelForCausalLM.from_config(cfg)


def batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 48), generator=gen)
    labels = ids.clone()
    labels[0, :7] = vocab_loss.IGNORE_INDEX  # a masked prompt
    return ids, labels


@pytest.mark.parametrize("model_type, tied", [("llama", False), ("mistral", False), ("qwen2", True)])
def test_loss_and_gradients_equal_the_models_own(model_type, tied, monkeypatch):
    monkeypatch.setattr(vocab_loss, "chunk_tokens", lambda vocab: 20)  # 96 tokens: 5 chunks, the last short
    model = tiny(model_type, tied)
    reference = copy.deepcopy(model)
    assert vocab_loss.install(model, spec()) == "chunked"
    ids, labels = batch()
    own = reference(input_ids=ids, labels=labels).loss
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    assert torch.allclose(out.loss, own, rtol=1e-5), (out.loss, own)
    out.loss.backward()
    own.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        scale = q.grad.abs().max()
        assert (p.grad - q.grad).abs().max() <= 1e-4 * scale, name
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_under_bf16_autocast_it_matches_the_models_loss():
    model = tiny("llama", False)
    reference = copy.deepcopy(model)
    vocab_loss.install(model, spec())
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, own = model(input_ids=ids, labels=labels).loss, reference(input_ids=ids, labels=labels).loss
    assert abs(ours.item() - own.item()) <= 0.01 * own.item()
    ours.backward()
    own.backward()
    assert model.lm_head.weight.grad.dtype == torch.float32  # the fp32 master weight's own dtype
    cos = torch.nn.functional.cosine_similarity(model.lm_head.weight.grad.flatten(),
                                                reference.lm_head.weight.grad.flatten(), dim=0)
    assert cos > 0.99


def test_evaluation_without_gradients_and_calls_without_labels():
    model = tiny("qwen2", True)
    reference = copy.deepcopy(model)
    vocab_loss.install(model, spec())
    ids, labels = batch()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, labels=labels).loss, reference(input_ids=ids, labels=labels).loss,
                              rtol=1e-5)
        logits = model(input_ids=ids).logits  # generation and the final check: the model's own forward
        assert logits.shape == (2, 48, VOCAB) and torch.allclose(logits, reference(input_ids=ids).logits)


def test_other_families_and_settings_keep_the_models_loss_without_logits():
    """Where the chunked loss does not apply the model's own loss trains, and a call with labels returns
    no logits: Accelerate's mixed-precision wrapper of the plain engine then has no 16-bit tensor to copy
    into fp32 (convert_outputs_to_fp32, 4 bytes per logit). Calls without labels keep their logits."""
    from accelerate.utils import convert_outputs_to_fp32
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)).to(torch.bfloat16).eval()
    reference = copy.deepcopy(gpt)
    assert vocab_loss.install(gpt, spec()) == "model"
    ids, labels = batch()
    wrapped = convert_outputs_to_fp32(gpt.forward)  # what Accelerate's prepare puts around the forward
    out = wrapped(input_ids=ids, labels=labels)
    assert out.logits is None and list(out.keys()) == ["loss"]
    assert torch.equal(out.loss, convert_outputs_to_fp32(reference.forward)(input_ids=ids, labels=labels).loss)
    assert torch.equal(gpt(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert vocab_loss.install(tiny("llama", False), spec("model")) == "model"
    assert vocab_loss.install(tiny("llama", False), spec(stage=3)) == "model"


def saved_bytes(model, ids, labels) -> int:
    """Bytes of every tensor the autograd graph keeps for the backward (what the loss step holds)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=labels).loss.backward()
    return sum(seen.values())


def test_it_never_keeps_the_logits():
    """The model's own loss keeps (tokens x vocabulary) fp32 log-probabilities for the backward (and,
    from 16-bit logits, those too); the chunked loss keeps the gradients of the hidden states and of the
    output weight only."""
    model = tiny("llama", False)
    reference = copy.deepcopy(model)
    vocab_loss.install(model, spec())
    ids, labels = batch()
    tokens = ids.numel()
    logits_bytes = tokens * VOCAB * 4
    own, ours = saved_bytes(reference, ids, labels), saved_bytes(model, ids, labels)
    print(f"saved for the backward: model's loss {own / 2**20:.1f} MiB, chunked {ours / 2**20:.1f} MiB")
    assert own >= logits_bytes  # log-softmax's output (fp32 logits are their own fp32 copy here)
    gradients = VOCAB * 32 * 4 + tokens * 32 * 4  # d loss / d weight, d loss / d hidden states
    assert ours <= own - logits_bytes + gradients, (own, ours)
    assert ours < own / 2, (own, ours)
