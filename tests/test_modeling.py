"""Model loading for training: the KV cache is off and regional compilation compiles once."""

import pytest

torch = pytest.importorskip("torch")


def _builtin_model():
    from craken_cli.spec import RunSpec
    from craken_cli.train import modeling

    spec = RunSpec.model_validate({"model": {"name_or_path": "builtin:tiny"}})
    tokenizer = modeling.load_tokenizer(spec)
    return modeling.load_model(spec, tokenizer), tokenizer


def test_training_model_builds_no_kv_cache():
    model, _ = _builtin_model()
    assert model.config.use_cache is False
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    out = model(input_ids=ids, labels=ids)
    assert out.past_key_values is None


def test_decoder_layers_share_one_compiled_graph_and_match_eager():
    """With a KV cache each layer recompiled on its own cache slot until dynamo's limit (8), and the
    remaining layers ran eagerly; now a second layer, or a second step, must not recompile."""
    from craken_cli.train import modeling

    torch.manual_seed(0)
    model, _ = _builtin_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    eager = model(input_ids=ids, labels=ids).loss.item()
    torch._dynamo.reset()
    assert modeling.compile_regions(model, backend="eager") == model.config.num_hidden_layers >= 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
    assert loss.item() == pytest.approx(eager, rel=1e-5)
    assert all(p.grad is not None for p in model.model.layers[-1].parameters())
    torch._dynamo.reset()
