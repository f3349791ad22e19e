"""The large-vocabulary loss: the output layer and cross-entropy, a chunk of tokens at a time.

    loss.install(model, spec)   # before accelerator.prepare: "chunked", or "model" (its own loss, no logits)

A causal LM's own forward multiplies every hidden state by the output layer, keeps the whole
(tokens x vocabulary) logits for the backward and hands them to its loss, which upcasts them to fp32.
At Qwen2.5-0.5B's 151,936 entries and micro-batch 16 x 2048 tokens that is 10 GiB of 16-bit logits
before any fp32 copy, more than all its decoder layers keep, and most of a step's memory traffic.

`install` replaces the model's forward (of this one instance) for calls with labels: the decoder
runs as before, then `chunked_cross_entropy` takes `chunk_tokens(vocab)` hidden states at a time,
computes their logits, the fp32 log-sum-exp and the loss, and right away the gradient of the loss
with respect to those hidden states and to the output weight (softmax minus one-hot, scaled by
1/tokens): the same three matmuls a plain backward does, but no logits survive their chunk. The
backward then only scales the stored gradients by the incoming one. With regional compilation the
per-chunk step is compiled (the upcast, log-sum-exp and softmax fuse into the matmul's epilogue
kernels; no fp32 copy of a chunk's logits is written).

Where it applies (`applies`): the Llama, Mistral and Qwen2/Qwen3 families (plain `lm_head` over
`model`, no logit scaling or soft-capping), not under ZeRO-3 (whose output weight is a partitioned
placeholder outside the lm_head's own forward). `model.loss: auto` picks it at vocabularies of
`VOCAB_THRESHOLD` or more in eager runs, where the model's loss holds the fp32 upcast (about 14 bytes
per logit); compiled runs keep the model's loss, compiled by `modeling.compile_regions`, which holds
the 16-bit logits and their gradient only and measured faster than the chunked one (docs/performance.md).
Calls without labels (generation, the final check's logits) run the model's own forward.
"""

from __future__ import annotations

VOCAB_THRESHOLD = 100_000  # Llama-3 (128,256), Qwen2/3 (151,936), Gemma-style 256k; not 32k Llamas
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Logits per chunk: 1 GiB in 16 bits, about 3,500 tokens at a 152k vocabulary. Each chunk adds its
# output-weight gradient into the fp32 sum (vocab x hidden, 0.5 GiB at Qwen2.5-0.5B): fewer, larger
# chunks read and write that sum less often.
CHUNK_LOGITS = 2**29
IGNORE_INDEX = -100  # transformers' label of tokens without a loss


def applies(setting: str, model_type: str, vocab_size: int, zero_stage: int, compiled: bool = False) -> bool:
    """Whether a run trains with the chunked loss (pure: the planner and the loop both ask). `auto` picks it
    for large vocabularies in eager runs only: compiled, the model's own loss fuses the fp32 upcast away
    (16-bit logits and their 16-bit gradient, about 4 bytes per logit, measured) and ran faster on one
    H200 than the chunked one at the micro-batch each fit (Qwen2.5-0.5B 1.05x, Llama-3.2-1B 1.10x)."""
    if setting == "model" or model_type not in FAMILIES or zero_stage >= 3:
        return False
    return setting == "chunked" or (vocab_size >= VOCAB_THRESHOLD and not compiled)


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk: about CHUNK_LOGITS logits, a multiple of 256 (matmul tiles), at least 256."""
    return max(256, (CHUNK_LOGITS // max(1, vocab_size)) // 256 * 256)


def _chunk_grads(hidden, weight, labels, scale):
    """One chunk: (loss sum, d loss / d hidden, d loss / d weight), the gradients already scaled."""
    import torch

    logits = (hidden @ weight.t()).float()
    lse = torch.logsumexp(logits, dim=-1)
    valid = labels != IGNORE_INDEX
    target = torch.where(valid, labels, 0)
    loss_sum = ((lse - logits.gather(1, target[:, None]).squeeze(1)) * valid).sum()
    grad = torch.exp(logits - lse[:, None])  # softmax
    grad.scatter_add_(1, target[:, None], torch.full_like(lse[:, None], -1.0))  # minus the one-hot target
    grad = (grad * (valid * scale)[:, None]).to(hidden.dtype)
    return loss_sum, grad @ weight, grad.t() @ hidden


def _chunk_loss(hidden, weight, labels):
    """One chunk without gradients (evaluation): the loss sum only."""
    import torch

    logits = (hidden @ weight.t()).float()
    valid = labels != IGNORE_INDEX
    target = torch.where(valid, labels, 0)
    picked = logits.gather(1, target[:, None]).squeeze(1)
    return ((torch.logsumexp(logits, dim=-1) - picked) * valid).sum()


_FUNCTION = None


def _autograd_function():
    """The autograd Function, built on first use so that importing this module needs no torch."""
    global _FUNCTION
    if _FUNCTION is not None:
        return _FUNCTION
    import torch

    class ChunkedLinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, labels, chunk, scale, step):
            compute = hidden.dtype
            cast_weight = weight.to(compute)
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                part = slice(start, start + chunk)
                loss_sum, g_hidden, g_weight = step(hidden[part], cast_weight, labels[part], scale)
                total += loss_sum
                grad_hidden[part] = g_hidden
                grad_weight += g_weight
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.weight_dtype = weight.dtype
            return total * scale

        @staticmethod
        def backward(ctx, grad_output):
            grad_hidden, grad_weight = ctx.saved_tensors
            return (grad_hidden * grad_output.to(grad_hidden.dtype),
                    (grad_weight * grad_output).to(ctx.weight_dtype), None, None, None, None)

    _FUNCTION = ChunkedLinearCrossEntropy
    return _FUNCTION


def chunked_cross_entropy(hidden, weight, labels, *, chunk: int | None = None, num_items=None, compiled=None):
    """Mean cross-entropy of `hidden @ weight.T` against `labels` (already shifted; IGNORE_INDEX skipped),
    `chunk` rows at a time. hidden: (tokens, h) in the matmul's dtype; weight: (vocab, h), any dtype;
    `num_items`: the divisor (default: the labelled tokens, as transformers' mean). `compiled`: the
    (grad step, loss step) pair to use instead of the eager ones."""
    import torch

    chunk = chunk or chunk_tokens(weight.shape[0])
    count = (labels != IGNORE_INDEX).sum() if num_items is None else torch.as_tensor(num_items)
    scale = 1.0 / count.to(device=hidden.device, dtype=torch.float32).clamp(min=1)
    grad_step, loss_step = compiled or (_chunk_grads, _chunk_loss)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _autograd_function().apply(hidden, weight, labels, chunk, scale, grad_step)
    cast_weight = weight.to(hidden.dtype)
    total = sum(loss_step(hidden[start:start + chunk], cast_weight, labels[start:start + chunk])
                for start in range(0, hidden.shape[0], chunk))
    return total * scale


def shifted_labels(labels):
    """Each position's next token (transformers' causal shift), IGNORE_INDEX after the last, flattened."""
    import torch

    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)


def matmul_dtype(tensor):
    """The dtype the output layer's matmul runs in: autocast's where it is on (fp32 hidden states of a
    plain run with fp32 weights), else the hidden states' own."""
    import torch

    device = tensor.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return tensor.dtype


def install(model, spec) -> str:
    """Give `model` (a transformers causal LM, before wrapping) the chunked loss where `applies`, else
    its own loss returned without logits (`loss_only`); returns which loss trains: "chunked" or "model"."""
    import types

    compiles = spec.model.compile and not spec.cluster.use_cpu  # as modeling.ready_for_training compiles
    if not applies(spec.model.loss, getattr(model.config, "model_type", ""), model.config.vocab_size,
                   spec.zero.stage, compiles):
        loss_only(model)
        return "model"
    if not (hasattr(model, "model") and hasattr(model, "lm_head")) or getattr(model.lm_head, "bias", None) is not None:
        loss_only(model)
        return "model"
    compiled = None
    if compiles:
        import torch

        compiled = (torch.compile(_chunk_grads, dynamic=False), torch.compile(_chunk_loss, dynamic=False))
    own_forward = model.forward

    def forward(self, input_ids=None, labels=None, logits_to_keep=0, **kwargs):
        if labels is None:
            return own_forward(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        num_items = kwargs.pop("num_items_in_batch", None)
        out = self.model(input_ids=input_ids, **kwargs)
        hidden = out.last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1]).to(matmul_dtype(hidden))
        loss = chunked_cross_entropy(flat, self.lm_head.weight, shifted_labels(labels).to(hidden.device),
                                     num_items=num_items, compiled=compiled)
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=out.past_key_values)

    model.forward = types.MethodType(forward, model)
    return "chunked"


def loss_only(model) -> None:
    """Calls with labels return the model's own loss and no logits (calls without labels are unchanged).

    Nothing reads a training step's logits, and Accelerate's mixed-precision wrapper of the plain
    engine (`convert_outputs_to_fp32`) turns every 16-bit tensor of the forward's output into an fp32
    copy: 4 bytes per logit at the end of the forward, 37 GiB at Qwen2.5-0.5B's micro-batch 32 x 2048,
    on top of what the loss holds for its backward (issue 16's out-of-memory row asked for exactly that).
    """
    import types

    own_forward = model.forward

    def forward(self, *args, labels=None, **kwargs):
        out = own_forward(*args, labels=labels, **kwargs)
        if labels is None:
            return out
        return type(out)(loss=out.loss)

    model.forward = types.MethodType(forward, model)
