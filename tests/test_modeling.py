"""Model loading for training: the KV cache is off and regional compilation compiles once."""

import pytest

torch = pytest.importorskip("torch")


def _builtin_model():
    from craken_cli.config.spec import RunSpec
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
    assert modeling.compile_regions(model, tuning=True, backend="eager") == model.config.num_hidden_layers >= 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
    assert loss.item() == pytest.approx(eager, rel=1e-5)
    assert all(p.grad is not None for p in model.model.layers[-1].parameters())
    torch._dynamo.reset()


def _spec(name="builtin:tiny", **sections):
    from craken_cli.config.spec import RunSpec

    return RunSpec.model_validate({"model": {"name_or_path": name}, **sections})


def test_models_from_scratch_are_initialised_on_the_gpu_unless_zero3(tmp_path):
    """Random init of 1.1 B weights costs ~40 s on two CPU cores; on the GPU it is near free."""
    from craken_cli.train import modeling

    gpu = torch.device("cuda", 1)
    assert modeling.init_device(_spec(), gpu) == gpu
    assert modeling.init_device(_spec(zero={"stage": 2}), gpu) == gpu
    config_only = tmp_path / "shape"
    config_only.mkdir()
    (config_only / "config.json").write_text("{}")
    assert modeling.init_device(_spec(str(config_only)), gpu) == gpu
    # Not here: CPU processes, ZeRO-3 (zero.Init partitions while building; parameter offload, the
    # only offload that keeps weights off the GPU, is ZeRO-3's), weights to load.
    assert modeling.init_device(_spec(), torch.device("cpu")) is None
    assert modeling.init_device(_spec(), None) is None
    assert modeling.init_device(_spec(zero={"stage": 3}), gpu) is None
    # optimizer offload keeps the 16-bit weights on the GPU all along: they may be built there
    assert modeling.init_device(_spec(zero={"stage": 2}, offload={"optimizer": {"device": "cpu"}}), gpu) == gpu
    all_offload = {"optimizer": {"device": "cpu"}, "param": {"device": "cpu"}}
    assert modeling.init_device(_spec(zero={"stage": 3}, offload=all_offload), gpu) is None
    (config_only / "model.safetensors").write_bytes(b"")
    assert modeling.init_device(_spec(str(config_only)), gpu) is None


def test_load_model_builds_scratch_weights_on_the_given_device():
    from craken_cli.train import modeling

    spec = _spec()
    tokenizer = modeling.load_tokenizer(spec)
    on_meta = modeling.load_model(spec, tokenizer, torch.device("meta"))
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}
    assert {p.dtype for p in on_meta.parameters()} == {torch.float32}  # the plain engine's fp32 weights
    assert {p.device.type for p in modeling.load_model(spec, tokenizer).parameters()} == {"cpu"}
    # Under ZeRO-1/2 the GPU copy is built in DeepSpeed's 16-bit dtype: 2 bytes per parameter, never
    # more than the run itself holds (an fp32 copy of 4 would not fit beside ZeRO-2 on many GPUs).
    zero2 = _spec(zero={"stage": 2}, precision="bf16", cluster={"use_cpu": False})
    assert modeling.init_dtype(zero2) == torch.bfloat16
    assert {p.dtype for p in modeling.load_model(zero2, tokenizer, torch.device("meta")).parameters()} == {torch.bfloat16}
    assert modeling.init_dtype(_spec(zero={"stage": 2}, precision="fp32", cluster={"use_cpu": False})) is None


def test_compile_tuning_is_on_under_fp8_unless_set():
    """Tuned kernels gained 1.039x under fp8 and 1.006x in bf16 at 3B for 1-2 minutes more of a first
    compile (benchmarks/results/2026-12-03-fp8-tuning), so unset means fp8 only; a setting wins."""
    from craken_cli.train import modeling

    assert modeling.compile_tuning_on(_spec(precision="fp8"))
    assert not modeling.compile_tuning_on(_spec(precision="bf16"))
    assert modeling.compile_tuning_on(_spec(precision="bf16", model={"name_or_path": "builtin:tiny",
                                                                     "compile_tuning": True}))
    assert not modeling.compile_tuning_on(_spec(precision="fp8", model={"name_or_path": "builtin:tiny",
                                                                       "compile_tuning": False}))
