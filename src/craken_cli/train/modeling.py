"""Model and tokenizer loading: a hub id, a local folder, or the built-in tiny model.

Weights are random for the built-in model and for a folder holding only config.json (built from
the config, on the GPU where `init_device` allows) and loaded with `from_pretrained` otherwise.
Under ZeRO-3 Accelerate has registered the DeepSpeed config with transformers before this runs, so
both paths build the model already partitioned (zero.Init).

The dtype a model is built in is the engine's, never the checkpoint's (`train_dtype`): transformers
5 keeps a checkpoint's or config's dtype (bf16 for almost every hub model), and the plain engine
would then train bf16 weights with bf16 Adam states, losing every update below 1/256 of a weight.
What `final/` is saved in is the checkpoint's own dtype (`saved_dtype`).
"""

from __future__ import annotations

from pathlib import Path

from . import builtin


def load_tokenizer(spec):
    name = spec.model.tokenizer or spec.model.name_or_path
    if builtin.is_builtin(name):
        return builtin.build_tokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=spec.model.trust_remote_code)
    if tok.pad_token is None and tok.eos_token is not None:  # a tokenizer without EOS: data.encoder_for says
        tok.pad_token = tok.eos_token
    return tok


def init_device(spec, device):
    """Where a model trained from scratch is built: on the process's GPU when that is safe, else None.

    Random initialisation of a 1.1 B model takes about 40 s on two CPU cores (normal_ on every
    weight), then the weights are copied to the GPU anyway; on the GPU it takes well under a second.
    Not under ZeRO-3 (zero.Init partitions the model as it is built; parameter offload, which asks to
    keep the weights off the GPU, exists only there). Under ZeRO-1/2 the model is built in DeepSpeed's
    16-bit dtype (`init_dtype`), which DeepSpeed would cast it to anyway: 2 bytes per parameter, which
    the run keeps on every GPU for its whole life, with optimizer offload too (only the fp32 master
    weights and Adam states go to the CPU). Loaded weights keep transformers' own loading path.
    """
    if device is None or device.type != "cuda":
        return None
    if not trains_from_scratch(spec.model.name_or_path) or spec.zero.stage >= 3:
        return None
    return device


def init_dtype(spec):
    """The dtype a model trained from scratch is built in on the GPU: DeepSpeed's 16-bit dtype under
    ZeRO-1/2 (its engine casts the module before making the fp32 master copy), fp32 otherwise (the
    plain engine trains fp32 weights under autocast)."""
    import torch

    if spec.uses_deepspeed and spec.base_precision in ("bf16", "fp16"):
        return torch.bfloat16 if spec.base_precision == "bf16" else torch.float16
    return None


def train_dtype(spec, device=None):
    """The dtype the model is built or loaded in. fp32 (the master weights the plain engine trains under
    autocast, and DeepSpeed's fp32 runs), except under DeepSpeed mixed precision: its engine casts the
    module to 16-bit itself and keeps the fp32 master copy in its optimizer, so a loaded model comes
    in 16-bit, and random weights are built in 16-bit where they are built on the GPU (`init_device`).
    Random weights built on the CPU stay fp32 whatever the config says, as they always were."""
    import torch

    sixteen = init_dtype(spec)
    if sixteen is not None and (device is not None or not trains_from_scratch(spec.model.name_or_path)):
        return sixteen
    return torch.float32


def saved_dtype(spec):
    """The dtype `final/` is written in: the checkpoint's own (its config's `dtype`) for loaded weights
    and for a config-only folder that names one; the training precision's for random weights otherwise."""
    import torch

    named = None
    if not builtin.is_builtin(spec.model.name_or_path):
        from transformers import AutoConfig

        named = getattr(AutoConfig.from_pretrained(spec.model.name_or_path,
                                                   trust_remote_code=spec.model.trust_remote_code), "dtype", None)
    if isinstance(named, str):
        named = getattr(torch, named, None)
    if isinstance(named, torch.dtype) and named.is_floating_point:
        return named
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.base_precision, torch.float32)


def trains_from_scratch(name: str) -> bool:
    return builtin.is_builtin(name) or has_no_weights(name)


def load_model(spec, tokenizer, device=None):
    """The model to train; `device` (from `init_device`) is where random weights are initialised."""
    from contextlib import nullcontext

    import torch
    from transformers import AutoModelForCausalLM

    model_spec = spec.model
    where = torch.device(device) if device is not None else nullcontext()
    dtype = {"dtype": train_dtype(spec, device)}
    if builtin.is_builtin(model_spec.name_or_path):
        with where:
            model = AutoModelForCausalLM.from_config(builtin.model_config(tokenizer),
                                                     attn_implementation=model_spec.attn_implementation, **dtype)
    elif has_no_weights(model_spec.name_or_path):
        # A folder with only config.json: train from scratch (random weights), e.g. a new shape.
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_spec.name_or_path, trust_remote_code=model_spec.trust_remote_code)
        with where:
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation=model_spec.attn_implementation,
                                                     trust_remote_code=model_spec.trust_remote_code, **dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_spec.name_or_path, attn_implementation=model_spec.attn_implementation,
            trust_remote_code=model_spec.trust_remote_code, **dtype)
    # Training never reads a KV cache. Left on, transformers builds one in every forward, and each
    # compiled decoder layer then guards on its own cache slot: dynamo recompiles per layer, stops at
    # its recompile limit (8) and runs the remaining layers eagerly (measured on one H100: 50,137
    # instead of the compiled speed, with warnings about past_key_values).
    model.config.use_cache = False
    if model_spec.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def convert_model(model, spec):
    """The one step between building the model and compiling it where its modules may be swapped
    for the run's precision: torchao's float8 Linears under fp8 (train/fp8.py), and the loss
    (train/loss.py: the chunked loss of large vocabularies, or the model's own returning no logits).
    Nothing to convert for bf16/fp16/fp32: the engines' mixed precision needs the model as built.
    Returns (model, which loss trains: "chunked" or "model")."""
    from . import fp8
    from . import loss as vocab_loss

    model = fp8.convert_model(model, spec)
    return model, vocab_loss.install(model, spec)


def ready_for_training(model, spec):
    """The model as every craken run trains it, from the built one: converted (`convert_model`), then
    its decoder layers compiled (`compile_regions`, GPUs only). The training loop and
    benchmarks/planner_bench.py both call this, so a benchmark row measures what `craken train` runs.
    Returns (model, record): which loss trains (`loss_kind`; "loss" is the train lines' value), how many
    Linears float8 converted, how many layers compiled; the metrics start line writes the record."""
    from . import fp8

    model, loss_kind = convert_model(model, spec)
    tuning = compile_tuning_on(spec)
    compiled = compile_regions(model, tuning=tuning) if spec.model.compile and not spec.cluster.use_cpu else 0
    return model, {"loss_kind": loss_kind, "float8_linears": fp8.converted_count(model), "compiled_layers": compiled,
                   "compile_tuning": bool(compiled) and tuning}


def compile_tuning_on(spec) -> bool:
    """`model.compile_tuning`, unset meaning fp8: there the float8 scaling casts' fused reductions gain
    most from tuned block sizes (benchmarks/results/2026-12-03-fp8-tuning: 1.039x at 3B, bf16 1.006x)."""
    setting = spec.model.compile_tuning
    return spec.precision == "fp8" if setting is None else setting


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def has_no_weights(name: str) -> bool:
    """A local folder holding a config but no weights (random initialisation from the config)."""
    folder = Path(name).expanduser()
    return folder.is_dir() and (folder / "config.json").is_file() and not any(
        (folder / f).exists() for f in WEIGHT_FILES)


def compile_regions(model, tuning: bool = False, **compile_kwargs) -> int:
    """Regional compilation: torch.compile each decoder layer and the loss; returns how many layers.
    `tuning` turns on inductor's coordinate-descent tuning of each generated kernel's block sizes: the
    default heuristics leave the fused reductions of fp8's scaling casts and of the norms' backward well
    below the GPU's bandwidth (benchmarks/step_profile.py, docs/performance.md).

    The layers share one compiled graph (dynamo inlines the module, so layer 2 reuses layer 1's
    code); the loss (the fp32 upcast of the logits, log-softmax and NLL) compiles to a few fused
    kernels that keep no fp32 copy of the logits (docs/performance.md, "Levers"). The model still
    calls its own loss function, so DeepSpeed's hooks and every model family see nothing new.
    """
    import torch

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return 0
    if tuning and compile_kwargs.get("backend", "inductor") == "inductor":
        compile_kwargs["options"] = {**compile_kwargs.get("options", {}), "coordinate_descent_tuning": True}
    for layer in layers:
        layer.compile(**compile_kwargs)
    if hasattr(model, "loss_function"):
        model.loss_function = torch.compile(model.loss_function, dynamic=False, **compile_kwargs)
    return len(layers)
