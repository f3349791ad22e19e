"""FP8 training (`precision: fp8`): torchao's float8 Linear in place of the model's large Linears.

    model = fp8.convert_model(model, spec)   # between the model's build and its compilation
    ...train...
    fp8.unconvert(model)                      # before the final save: plain nn.Linear again

torchao's `convert_to_float8_training` swaps `nn.Linear` modules for `Float8Linear`, which casts the
input, the weight and the output gradient to float8 in each matmul (dynamic scales: one per tensor
with the tensorwise recipe, one per row with rowwise) and keeps the weight itself as it was: the
parameters, their names and their dtype do not change, so optimizers, DeepSpeed ZeRO-1/2,
checkpoints and `save_pretrained` see the same model. Everything not converted (attention, norms,
the output layer) runs under bf16 autocast as in a bf16 run, and the master weights stay fp32.

Which Linears convert is decided by shape alone (`converts`), so the planner can count them without
torch: torchao's own filter guidance (`torchao.float8._auto_filter_for_recipe`, benchmarked on H100):
both dimensions divisible by 16 (the float8 GEMM's requirement), and none of the small GEMMs whose
scaling costs more than the float8 matmul saves. The output layer always stays bf16 (its logits set
the loss; torchao's and torchtitan's recipes leave it out too).

Nothing here imports torch or torchao at module level: `problems` and `converts` run in the CLI
before launch.
"""

from __future__ import annotations

import importlib.util

from ..errors import Refusal

MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell
RECIPES = ("tensorwise", "rowwise")
# tokens/s against bf16 with regional compilation, plain Accelerate, fp32 masters, one H200 (issue 19:
# 1.1B seq 2048 mb 16: 1.22x, 1.221x with fp8's tuned kernels; 2.4B seq 4096 mb 8: tensorwise 1.24x
# tuned, 1.19-1.23x untuned; rowwise 1.07x)
SPEED = {"tensorwise": 1.22, "rowwise": 1.07}
# What a converted matmul's share of the step gains, fitted so that `speed` gives SPEED at the 1.1B
# shape (77.7% of its matmul FLOPs convert); the 2.4B shape is then predicted 1.20x (measured 1.24x
# tuned) and rowwise 1.07x there (measured 1.07x).
GEMM_GAIN = {"tensorwise": 1.302, "rowwise": 1.103}
INSTALL_HINT = "pip install 'craken[fp8]'"


def torchao_installed() -> bool:
    return importlib.util.find_spec("torchao") is not None


def converts(out_features: int, in_features: int, recipe: str) -> bool:
    """Whether a Linear of this shape runs in float8 (torchao 0.18's `_auto_filter_for_recipe`)."""
    n, k = out_features, in_features
    if n % 16 or k % 16:
        return False
    if recipe == "rowwise":
        return not (n <= 2048 or k <= 1024 or (n <= 4096 and k <= 2048))
    return not (k <= 4096 and n <= 1024)


def layer_linears(model) -> list[tuple[int, int]]:
    """(out, in) features of a Llama-family decoder layer's Linears (`modelinfo.ModelInfo`)."""
    q, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    h, f = model.hidden_size, model.intermediate_size
    return [(q, h), (kv, h), (kv, h), (h, q), (f, h), (f, h), (h, f)]


def converted_share(model, recipe: str) -> float:
    """Share of a decoder layer's Linear weights (and FLOPs) that convert; 0 outside the Llama family,
    whose layers `layer_linears` does not describe."""
    if model.family != "llama":
        return 0.0
    linears = layer_linears(model)
    return sum(n * k for n, k in linears if converts(n, k, recipe)) / sum(n * k for n, k in linears)


def speed(model, seq_len: int, recipe: str) -> float:
    """Predicted tokens/s of FP8 against bf16 for `model`: the converted FLOPs' share runs GEMM_GAIN
    faster (Amdahl), the output layer and the attention scores (FLOPs counted as the loop's MFU counts
    them: 6 per weight and token, 12 L h s for the scores) as in bf16."""
    weights = converted_share(model, recipe)
    if not weights:
        return 1.0
    layer_flops = model.num_layers * sum(n * k for n, k in layer_linears(model))
    total = layer_flops + model.vocab_size * model.hidden_size + 2 * model.num_layers * model.hidden_size * seq_len
    share = weights * layer_flops / total
    return 1.0 / (1.0 - share + share / GEMM_GAIN[recipe])


def problems(precision: str, use_cpu: bool, gpus) -> list[Refusal]:
    """Why this machine's processors cannot train `precision: fp8` (empty when they can, or for other
    precisions); `craken plan` asks this of hypothetical GPUs too."""
    if precision != "fp8":
        return []
    need = f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}"
    out = []
    if use_cpu or not gpus:
        out.append(Refusal(f"precision fp8 needs NVIDIA GPUs of compute capability {need} or newer (Ada, Hopper, "
                           "Blackwell); this run uses CPU processes", "use --precision bf16"))
    else:
        old = [g for g in gpus if not g.fp8]
        if old:
            first = old[0]
            out.append(Refusal(f"precision fp8 needs compute capability {need} or newer; {first.name} has "
                               f"{first.capability[0]}.{first.capability[1]} (no float8 tensor cores)",
                               "use --precision bf16"))
    return out


def install_problems(precision: str) -> list[str]:
    """What a launch of `precision: fp8` needs installed here (checked before launch, not by `plan`)."""
    if precision == "fp8" and not torchao_installed():
        return [f"precision fp8 trains through torchao, which is not installed: {INSTALL_HINT}"]
    return []


def recommendation(precision: str, gpus, choice, model, seq_len: int) -> list[str]:
    """--auto's note where FP8 would be at least 5% faster than the bf16 it keeps (it never changes
    numerics); `choice` is the planner's strategy, `model` its ModelInfo."""
    from ..config.spec import fp8_layout_problems

    if precision != "bf16" or not gpus or not all(g.fp8 for g in gpus) or choice is None:
        return []
    gain = speed(model, seq_len, "tensorwise")
    if gain < 1.05 or fp8_layout_problems(choice.stage, choice.offload_optimizer, choice.offload_param):
        return []
    return [f"--auto keeps precision bf16 as set; float8 matmuls (--precision fp8, {INSTALL_HINT}) are predicted "
            f"{gain:.2f}x as fast for this model (1.22x measured at 1.1B on one H200), with other numerics"]


def _quiet_import():
    """torchao.float8, without the deprecation note torch logs for each enum torchao registers with
    pytree (a note about torchao's code, not the run, on every process: noise.KNOWN)."""
    from ..noise import quiet_logger

    quiet_logger("torch.utils._pytree")
    import torchao.float8 as float8

    return float8


def conversion_filter(model, recipe: str):
    """torchao's `module_filter_fn` for `model`: converts by shape, never the output layer."""
    import torch

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    def keep_fn(module, fqn: str) -> bool:
        if not isinstance(module, torch.nn.Linear) or module is output or fqn.split(".")[-1] == "lm_head":
            return False
        return converts(module.out_features, module.in_features, recipe)

    return keep_fn


def plan_conversion(model, recipe: str) -> tuple[list[str], list[str]]:
    """(Linears that convert, Linears that stay bf16), by name."""
    import torch

    keep_fn = conversion_filter(model, recipe)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return [n for n, m in linears if keep_fn(m, n)], [n for n, m in linears if not keep_fn(m, n)]


def convert_model(model, spec):
    """`model` with its large Linears swapped for torchao's Float8Linear (in place), when the run's
    precision is fp8; unchanged otherwise."""
    if spec.precision != "fp8":
        return model
    float8 = _quiet_import()
    config = float8.Float8LinearConfig.from_recipe_name(spec.fp8.recipe)
    converted, _ = plan_conversion(model, spec.fp8.recipe)
    if not converted:
        raise SystemExit("craken: precision fp8, but no Linear of this model is large enough for float8 matmuls "
                         "(both sides divisible by 16, as torchao's filter asks): train it with --precision bf16")
    return float8.convert_to_float8_training(model, module_filter_fn=conversion_filter(model, spec.fp8.recipe),
                                             config=config)


def converted_count(model) -> int:
    """How many of the model's Linears are torchao Float8Linears."""
    return sum(type(m).__name__ == "Float8Linear" for m in model.modules())


def is_converted(model) -> bool:
    return converted_count(model) > 0


def unconvert(model):
    """Swap every Float8Linear back for an `nn.Linear` holding the same parameters (in place): the
    model then computes in bf16 as a reload of its saved weights does, and saves as a plain HF model."""
    import torch

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ != "Float8Linear":
                continue
            plain = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                    device="meta")
            plain.weight = child.weight
            plain.bias = child.bias
            plain.train(child.training)
            setattr(parent, name, plain)
    return model


def probe(device: str = "cuda") -> str | None:
    """One float8 matmul through torchao on `device`; None when it ran, else why not."""
    try:
        import torch

        float8 = _quiet_import()
        layer = torch.nn.Sequential(torch.nn.Linear(64, 64, device=device))
        float8.convert_to_float8_training(layer)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            out = layer(torch.randn(32, 64, device=device))
        out.float().sum().backward()
        if not bool(torch.isfinite(out).all()):
            return "the float8 matmul gave non-finite values"
    except Exception as exc:  # any failure is the answer: the probe reports it, the caller decides
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None
