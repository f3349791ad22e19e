"""Per-GPU memory of every ZeRO strategy, and the choice: the fastest one that fits.

Pure: `plan(model_info, spec, hardware) -> Plan`; no torch, no I/O. `craken plan` prints it and
`craken train --auto` applies `Plan.choice`. docs/planner.md derives every term and compares the
prediction with memory measured on GPUs.

The memory model follows what the two engines allocate (DeepSpeed 0.19.8 read from its source):

* no ZeRO ("zero0": craken's plain engine, no DeepSpeed): fp32 weights (the fp32 masters), fp32 gradients
  and torch AdamW's two fp32 moments; autocast's 16-bit copies of the weights; DDP's buckets with
  more than one process.
* stage 1 + bf16 with fp32 gradient accumulation (craken's default on one GPU; bf16_optimizer.py): 16-bit
  params, fp32 gradients of the whole model beside the 16-bit ones (added into them after the
  backward; the 16-bit ones live until the next backward), fp32 master + moments partitioned; the
  engine all-reduces the fp32 gradients through a flat copy of each parameter group (one group
  holds nearly all parameters, more than its 5e8-element bucket, so the copy is whole).
* stage 1/2 (stage_1_and_2.py): 16-bit params unpartitioned; a 16-bit gradient partition
  (stage 1 with overlap_comm reduces in hooks on the accumulation boundary, so only with
  grad_accum > 1 does it keep every 16-bit gradient); at the step a flat 16-bit copy of the partition
  and its fp32 copy, partly in blocks the freed activations left; fp32 master + moments partitioned;
  two reduce buckets (overlap_comm).
* stage 3 (stage3.py): everything partitioned; the largest layer gathered (params and grads);
  a 16-bit gradient partition buffer, one reduce bucket, the prefetch bucket.

`model_state_bytes` (params + grads + optimizer) is counted the way DeepSpeed's own
`estimate_zero2/3_model_states_mem_needs` counts it (tests hold the two within 1%); what DeepSpeed
allocates beyond that count is in `other` (buffers, context, allocator margin).

Activations per layer and token follow Korthikanti et al. (2022), "Reducing Activation
Recomputation in Large Transformer Models", re-derived for the modules transformers runs: SDPA
(flash/memory-efficient kernels save q, k, v, the output and a log-sum-exp, never the s x s scores),
grouped-query attention (k and v at kv_heads x head_dim), RMSNorm's fp32 upcast, the gated MLP, and
what the families differ in (ModelInfo: fused q/k/v with rotary, four norms per layer, GELU MLPs,
residual dropout); the loss term is the 16-bit logits and the fp32 upcast's buffers, times the
vocabulary (`loss_bytes`: the largest single term of small models with 128k-256k vocabularies).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..config.spec import STAGE3_DEFAULTS, extra_setting, fp8_layout_problems, fp32_grad_accum_on
from ..train import fp8
from ..train import loss as vocab_loss
from .hardware import Hardware
from .modelinfo import ModelInfo

GiB = 1024**3

# Constants marked "fitted" are fitted by `benchmarks/planner_bench.py --fit` on the training rows only;
# docs/planner.md gives the rows, the held-out errors and the history of each value.
SAFETY_MARGIN = 0.10  # a strategy fits when predicted x (1 + margin) <= GPU memory
CUDA_CONTEXT_GIB = 0.55  # CUDA context, kernels and cuBLAS workspace: outside torch's reserved memory
NCCL_GIB = 0.5  # NCCL communicator buffers with more than one process
DS_ALLREDUCE_BUCKET = 500_000_000  # engine.MEMORY_OPT_ALLREDUCE_SIZE, stage 0 gradient all-reduce
# Fitted: freed activation blocks that later, differently sized requests cannot reuse (share of activations).
FRAGMENTATION = {0: 0.06, 1: 0.06, 2: 0.06, 3: 0.06}
# Fitted: compiled layers free blocks of inductor's own sizes, and more of them stay reserved.
COMPILED_FRAGMENTATION = 0.05
# Fitted: stage 3 on several GPUs gathers and reduce-scatters between activation allocations.
STAGE3_MULTI_GPU_SLACK = 0.24
# Fitted: share of the freed layer activations that ZeRO-1/2's step buffers reuse (eager layers only:
# compiled layers free blocks of inductor's sizes, which the step's flat buffers do not fit).
STEP_REUSE_OF_ACTIVATIONS = 0.25
# Fitted: fp32 bytes per logit at the eager loss's peak (transformers' loss) beside the 16-bit logits: the
# upcast's log-softmax output, and in its backward the incoming and the outgoing gradient (12 derived; the
# fit finds fewer: those buffers are partly freed before the next is made).
UPCAST_LOSS_FP32_BYTES = 10
# Fitted: bytes per logit beside the 16-bit logits with the loss compiled (modeling.compile_regions): the
# upcast, log-softmax and NLL fuse, and the backward writes the 16-bit gradient only (2 derived).
COMPILED_LOSS_FP32_BYTES = 2
# Fitted: intermediate-sized 16-bit tensors a compiled layer's MLP keeps for the backward (gate and up: 2
# derived; the product, when the partitioner saves it rather than recomputing it: 3).
COMPILED_MLP_SAVED = 3
# Fitted: share of autocast's 16-bit weight copies (weight_copy_bytes) held at the peak, plain engine
# only (DeepSpeed trains a 16-bit module); compiled layers keep fewer (the partitioner may recompute the
# cast of an fp32 weight in the backward rather than save it).
EAGER_WEIGHT_COPY_SHARE = 0.5
COMPILED_WEIGHT_COPY_SHARE = 0.75
CPU_PER_PROCESS_GIB = 3.0  # Python, torch, CUDA host allocations and the data loader of one process
ACTIVATION_CHECKPOINTING_SPEED = 0.75  # about 1/3 more compute for the recomputed forward

# Relative speed of each strategy (tokens/s per GPU against no ZeRO), one table per GPU count: only the
# order matters for the choice (measured figures: docs/planner.md, "The choice"). "offload_optimizer"
# caps the stage's figure, "offload_param" multiplies it.
SPEED_1GPU = {"zero0": 1.0, "zero1": 0.96, "zero2": 0.95, "zero3": 0.69, "offload_optimizer": 0.40,
              "offload_param": 0.97}
SPEED_NGPU = {"zero0": 1.0, "zero1": 0.98, "zero2": 0.98, "zero3": 0.51, "offload_optimizer": 0.28,
              "offload_param": 0.5}
NVME_SPEED = 0.5  # on top of CPU offload
COMPILE_MIN_PARAMS = 100_000_000  # smaller models: compilation costs more time than it saves
# Fitted (with the compiled terms, on its one training row, the 1.1B fp8 run): compiled layers whose Linears
# all convert to torchao float8 keep this share of the bf16 layers' reserved activations (the backward's
# inputs kept as float8 casts); a layer converted in part saves that part of the difference. docs/planner.md,
# "FP8", gives its rows and errors.
FP8_ACTIVATION_SHARE = 0.775


def strategy_name(stage: int, offload_optimizer: str = "none", offload_param: str = "none",
                  activation_checkpointing: bool = False, compiled: bool = False) -> str:
    """The one name of a strategy, in `craken plan`, `--auto`'s notes and metrics.jsonl: "zero0" is
    no ZeRO (craken's plain engine), e.g. "zero3+offload_optimizer_cpu+offload_param_cpu+ac"."""
    out = f"zero{stage}"
    if offload_optimizer != "none":
        out += f"+offload_optimizer_{offload_optimizer}"
    if offload_param != "none":
        out += f"+offload_param_{offload_param}"
    if activation_checkpointing:
        out += "+ac"
    if compiled:
        out += "+compile"
    return out


@dataclass(frozen=True)
class Candidate:
    """One strategy: ZeRO stage, where optimizer states and parameters live, checkpointing."""

    stage: int
    offload_optimizer: str = "none"  # none | cpu | nvme
    offload_param: str = "none"
    activation_checkpointing: bool = False

    @property
    def name(self) -> str:
        return strategy_name(self.stage, self.offload_optimizer, self.offload_param, self.activation_checkpointing)

    def speed(self, world: int) -> float:
        table = SPEED_1GPU if world == 1 else SPEED_NGPU
        relative = table[f"zero{self.stage}"]
        if self.offload_optimizer != "none":
            nvme = NVME_SPEED if self.offload_optimizer == "nvme" else 1
            relative = min(relative, table["offload_optimizer"]) * nvme
        if self.offload_param != "none":
            relative *= table["offload_param"] * (NVME_SPEED if self.offload_param == "nvme" else 1)
        if self.activation_checkpointing:
            relative *= ACTIVATION_CHECKPOINTING_SPEED
        return relative


@dataclass
class Strategy:
    """Predicted memory of one candidate at one micro-batch, per GPU (GiB) and per machine (CPU)."""

    name: str
    stage: int
    offload_optimizer: str
    offload_param: str
    activation_checkpointing: bool
    micro_batch: int
    grad_accum: int
    params_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float  # layer activations + logits/loss
    other_gib: float  # DeepSpeed buffers, CUDA context, NCCL, allocator slack
    total_gib: float  # what the GPU must hold: everything above
    reserved_gib: float  # the part torch's allocator reserves (total - context - NCCL): compare with
    # torch.cuda.max_memory_reserved()
    cpu_memory_gib: float  # per machine
    nvme_gib: float  # per machine
    fits: bool
    speed: float  # relative tokens/s per GPU (no ZeRO = 1)
    why_not: str | None = None  # why it does not fit (GPU, CPU or disk)
    detail: dict = field(default_factory=dict)  # every term in GiB, for docs and debugging

    def settings(self) -> dict[str, object]:
        """Dotted spec path -> value: what `craken train --auto` writes into the spec for this strategy."""
        return {"zero.stage": self.stage, "offload.optimizer.device": self.offload_optimizer,
                "offload.param.device": self.offload_param,
                "model.activation_checkpointing": self.activation_checkpointing,
                "batch.micro_batch": self.micro_batch, "batch.grad_accum": self.grad_accum}

    def to_dict(self) -> dict:
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, float):
                out[k] = round(v, 3)
        out["detail"] = {k: round(v, 3) for k, v in self.detail.items()}
        return out


@dataclass
class Plan:
    strategies: list[Strategy]  # every candidate, fastest first, each at its largest fitting micro-batch
    choice: Strategy | None  # the fastest that fits; None when nothing fits
    requested: Strategy  # the spec's own settings, as they are
    rejected: list[str]  # for each faster candidate than the choice, why not
    world_size: int
    global_batch: int
    compiled: bool  # activations predicted for regional compilation (spec.model.compile)
    gpu_memory_gib: float
    usable_gib: float  # gpu memory / (1 + margin)
    model: ModelInfo

    def to_dict(self) -> dict:
        choice = None
        if self.choice is not None:
            choice = {**self.choice.to_dict(), "global_batch": self.global_batch, "rejected": self.rejected}
        return {
            "model": {"name": self.model.name, "params": self.model.num_params, "counted_by": self.model.counted_by},
            "world_size": self.world_size, "global_batch": self.global_batch, "compiled": self.compiled,
            "gpu_memory_gib": round(self.gpu_memory_gib, 3), "usable_gib": round(self.usable_gib, 3),
            "requested": self.requested.to_dict(),
            "strategies": [s.to_dict() for s in self.strategies], "choice": choice,
        }

    def settings(self) -> dict[str, object] | None:
        """Dotted spec path -> value for the choice (what `craken train --auto` writes into the spec)."""
        return None if self.choice is None else self.choice.settings()


# ---------------------------------------------------------------------------------------------
# memory terms (bytes)


def model_state_bytes(params: int, stage: int, world: int, *, offload_optimizer: bool = False,
                      offload_param: bool = False, largest_layer: int = 0, lp_bytes: int = 2,
                      grad_accum: int = 1, fp32_grads: bool = False) -> tuple[float, float, float]:
    """(params, grads, optimizer) bytes per GPU, counted as DeepSpeed's estimators count them.

    Mixed precision (lp_bytes 2) keeps fp32 master weights: 4 + 8 (Adam moments) bytes per
    parameter in the optimizer; the step turns the 16-bit gradient into an fp32 one (4 bytes).
    `fp32_grads` (stage 1, DeepSpeed's BF16 optimizer; its estimators do not know it) keeps the
    whole model's gradients in fp32 beside the 16-bit ones.
    """
    mixed = lp_bytes < 4
    master = 4 if mixed else 0
    fp32_grad = 4 if mixed else 0
    if stage == 0:
        # No ZeRO on GPUs runs without DeepSpeed (spec.uses_deepspeed): fp32 weights under autocast,
        # fp32 gradients, torch AdamW's two fp32 moments.
        return 4 * params, 4 * params, 8 * params
    if stage in (1, 2):
        if offload_optimizer:
            return lp_bytes * params, 0.0, 0.0
        if fp32_grads and stage == 1:
            return lp_bytes * params, (lp_bytes + 4.0) * params, (master + 8) * params / world
        lp_grads = lp_bytes * params if (stage == 1 and grad_accum > 1) else lp_bytes * params / world
        return lp_bytes * params, lp_grads + fp32_grad * params / world, (master + 8) * params / world
    live = lp_bytes * largest_layer  # the largest layer's gathered 16-bit params, and its grads
    own = live + (0 if offload_param else lp_bytes * params / world)
    if offload_optimizer:
        return own, live, 0.0
    return own, live + (4 if mixed else lp_bytes) * params / world, (master + 8) * params / world


def norm_bytes_per_token(model: ModelInfo, lp: int, resid: int | None = None) -> float:
    """What one normalization layer saves per token, with the output the next projection saves.

    RMSNorm: an fp32 copy of the input (kept by pow and mul), the normalized 16-bit value (kept by
    the weight multiply) and the output; in fp32 the "copy" is the input itself, so 4h + 2 lp h holds
    for both precisions. LayerNorm (GPT-2/NeoX): its input, in the residual stream's dtype (`resid`),
    and its output in the projection's dtype (autocast runs layer_norm in fp32 and the matmul saves its
    16-bit cast).
    """
    hidden = model.hidden_size
    return ((resid or lp) + lp) * hidden if model.family == "gpt" else 4 * hidden + 2 * lp * hidden


def layer_activation_bytes_per_token(model: ModelInfo, lp: int, compiled: bool = False,
                                     resid: int | None = None) -> float:
    """Bytes one decoder layer saves for the backward pass, per token (SDPA, no s^2 scores). `resid`: bytes
    per element of the residual stream (default lp; 4 on the no-ZeRO engine's fp32 weights under 16-bit
    autocast: the embedding and every residual add run in fp32 there, `residual_bytes`)."""
    hidden, inter = model.hidden_size, model.intermediate_size
    q_dim, kv_dim = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    # SDPA saves q, k, v and its output (which o_proj also saves: same storage) and an fp32 log-sum-exp.
    attn = lp * (2 * q_dim + 2 * kv_dim) + 4 * model.num_heads
    if model.fused_qkv and model.rotary:
        attn += lp * (q_dim + kv_dim)  # rotary makes new q and k; v stays a view of the fused output
    if compiled:
        # Inductor's partitioner keeps the matmul inputs it cannot cheaply recompute and recomputes the
        # pointwise rest (norms, SiLU) in the backward: the layer input and the residual after attention
        # (in the residual stream's dtype), SDPA's q, k, v, output and log-sum-exp, and the MLP's
        # intermediate-sized tensors (COMPILED_MLP_SAVED: gate and up derived, fitted).
        return 2 * (resid or lp) * hidden + attn + COMPILED_MLP_SAVED * lp * inter
    drop = 2 * hidden if model.dropout > 0 else 0  # two residual-dropout masks (1 byte each)
    norms = model.norms_per_layer * norm_bytes_per_token(model, lp, resid)
    if model.parallel_residual:  # both LayerNorms read the layer input: its storage is saved once
        norms -= (model.norms_per_layer - 1) * (resid or lp) * hidden
    autocast_fp32 = model.mlp_autocast_fp32 if (resid or lp) > lp else 0  # an fp32 residual means 16-bit autocast
    mlp = (model.mlp_saved - autocast_fp32) * lp * inter + autocast_fp32 * 4 * inter
    return norms + attn + mlp + drop


def loss_bytes(model: ModelInfo, tokens: int, lp: int, compiled: bool = False, loss: str = "upcast") -> float:
    """Logits and loss at their peak, for `tokens` tokens: the 16-bit logits and the fp32 loss buffers.

    `loss` names the loss implementation: "upcast" (transformers' cross-entropy on fp32 logits) or
    "chunked" (train/loss.py: one chunk of logits at a time, `chunked_loss_bytes`).
    """
    if loss == "chunked":
        return chunked_loss_bytes(model, tokens, lp, compiled)
    fp32 = COMPILED_LOSS_FP32_BYTES if compiled else UPCAST_LOSS_FP32_BYTES
    # Gemma-2's soft cap (logits / cap, tanh, * cap, eager in the model's forward): of its three 16-bit
    # tensors only tanh's output is saved for the backward (the scalar divide and multiply save nothing).
    per_logit = lp + fp32 + (lp if model.logit_softcap else 0)
    return per_logit * tokens * model.vocab_size


def chunked_loss_bytes(model: ModelInfo, tokens: int, lp: int, compiled: bool) -> float:
    """train/loss.py's chunked loss at the larger of its two peaks; no logits survive their chunk.

    In the loss's forward (the chunk loop): one chunk's logits and their gradient (compiled: the 16-bit
    matmul output and the 16-bit gradient, the upcast and softmax fused between them; eager: the fp32
    logits, log-sum-exp's and the softmax's fp32 temporaries and the 16-bit gradient, 12 + lp bytes), the
    chunk's 16-bit output-weight gradient before it is added into the fp32 sum, that sum, the 16-bit copy
    of the output weight, and the hidden states' gradient. At the start of the backward: the saved fp32
    sum and hidden-state gradient, each beside its copy scaled by the incoming gradient."""
    chunk = min(tokens, vocab_loss.chunk_tokens(model.vocab_size)) * model.vocab_size
    weight, hidden = model.vocab_size * model.hidden_size, tokens * model.hidden_size
    forward = chunk * (2 * lp if compiled else 12 + lp) + weight * (4 + 2 * lp) + hidden * lp
    backward = weight * 2 * 4 + hidden * 2 * lp
    return max(forward, backward)


def residual_bytes(stage: int, lp: int) -> int:
    """Bytes per element of the decoder's residual stream: fp32 on the no-ZeRO engine, whose fp32 master
    weights train under 16-bit autocast (the embedding lookup and the residual adds are not autocast);
    the module's own dtype under DeepSpeed (16-bit) and in fp32 runs."""
    return 4 if stage == 0 else lp


def activation_bytes(model: ModelInfo, micro_batch: int, seq_len: int, lp: int, checkpointing: bool,
                     compiled: bool = False, loss: str = "upcast",
                     fp8_recipe: str | None = None, resid: int | None = None) -> tuple[float, float]:
    """(decoder layers, logits + loss) bytes at the start of the backward pass, for one micro-batch."""
    tokens = micro_batch * seq_len
    per_layer = layer_activation_bytes_per_token(model, lp, compiled, resid) * tokens
    if fp8_recipe and compiled:
        per_layer *= 1 - (1 - FP8_ACTIVATION_SHARE) * fp8.converted_share(model, fp8_recipe)
    if checkpointing:
        # Each layer keeps only its input; one layer at a time is recomputed in the backward.
        layers = model.num_layers * (resid or lp) * model.hidden_size * tokens + per_layer
    else:
        layers = model.num_layers * per_layer
    final_norm = norm_bytes_per_token(model, lp, resid) * tokens
    return layers + final_norm, loss_bytes(model, tokens, lp, compiled and model.family != "gpt", loss)


def weight_copy_bytes(model: ModelInfo, lp: int, compiled: bool) -> float:
    """16-bit copies of fp32 weights that autocast makes in the forward and the backward needs: every
    projection and the output head (the input embedding is not cast), times the fitted share held."""
    share = COMPILED_WEIGHT_COPY_SHARE if compiled else EAGER_WEIGHT_COPY_SHARE
    input_embedding = 0 if model.tied_embeddings else model.vocab_size * model.hidden_size
    return share * lp * (model.num_params - input_embedding)


# ---------------------------------------------------------------------------------------------
# one estimate


@dataclass(frozen=True)
class SwapSettings:
    """DeepSpeed's NVMe swap settings that size its pinned host buffers. craken does not model them as
    fields; `deepspeed.extra` may set them. The defaults are DeepSpeed 0.19.8's: zero/offload_config.py
    (buffer_count, buffer_size, max_in_cpu), zero/config.py (sub_group_size), swap_tensor/constants.py
    (aio.intra_op_parallelism)."""

    optimizer_buffer_count: int = 4  # zero_optimization.offload_optimizer.buffer_count
    param_buffer_count: int = 5  # zero_optimization.offload_param.buffer_count
    param_buffer_size: int = 100_000_000  # zero_optimization.offload_param.buffer_size (elements)
    max_in_cpu: int = 1_000_000_000  # zero_optimization.offload_param.max_in_cpu (elements per process)
    sub_group_size: int = 1_000_000_000  # zero_optimization.sub_group_size (elements)
    intra_op_parallelism: int = 1  # aio.intra_op_parallelism
    pipeline_read: bool = False  # zero_optimization.offload_optimizer.pipeline_read
    pipeline_write: bool = False  # zero_optimization.offload_optimizer.pipeline_write

    @classmethod
    def from_extra(cls, extra: dict) -> SwapSettings:
        """The settings `deepspeed.extra` gives, each read as DeepSpeed reads it (config.spec.extra_setting:
        "4" is 4); absent, "auto" (which DeepSpeed reads as the default), or one DeepSpeed refuses
        (config.spec.extra_shape_problems names it when the spec is built) keeps DeepSpeed's default."""

        def section(node: dict, key: str) -> dict:
            value = node.get(key)
            return value if isinstance(value, dict) else {}

        zero = section(extra, "zero_optimization")
        optimizer, param = section(zero, "offload_optimizer"), section(zero, "offload_param")
        where = {"optimizer_buffer_count": (optimizer, "zero_optimization.offload_optimizer.buffer_count"),
                 "pipeline_read": (optimizer, "zero_optimization.offload_optimizer.pipeline_read"),
                 "pipeline_write": (optimizer, "zero_optimization.offload_optimizer.pipeline_write"),
                 "param_buffer_count": (param, "zero_optimization.offload_param.buffer_count"),
                 "param_buffer_size": (param, "zero_optimization.offload_param.buffer_size"),
                 "max_in_cpu": (param, "zero_optimization.offload_param.max_in_cpu"),
                 "sub_group_size": (zero, "zero_optimization.sub_group_size"),
                 "intra_op_parallelism": (section(extra, "aio"), "aio.intra_op_parallelism")}
        given = {}
        for name, (node, key) in where.items():
            leaf = key.rpartition(".")[2]
            try:
                value = extra_setting(node[leaf], key) if leaf in node else None
            except ValueError:
                value = None
            if value is not None:
                given[name] = value
        return cls(**given)

    @property
    def optimizer_buffers_needed(self) -> int:
        """The offload_optimizer.buffer_count below which DeepSpeed's NVMe optimizer swapper runs out of
        buffers at the first step: SWAP_BUFFERS_PER_SUB_GROUP for the sub-group being stepped, as many again
        for the next one pipeline_read reads ahead (swap_in_optimizer_state's async_parameter), and as many
        again for the previous one pipeline_write is still writing (freed only at the next
        swap_out_optimizer_state): swap_tensor/pipelined_optimizer_swapper.py, whose allocate() returns None
        ("ran out of swap buffers, try increasing 'buffer_count'"). Counted for three or more sub-groups:
        the sub-groups a model splits into are known only once it is loaded."""
        return SWAP_BUFFERS_PER_SUB_GROUP * (1 + self.pipeline_read + self.pipeline_write)


# The swap buffers one optimizer sub-group holds while DeepSpeed steps it: its fp32 weights, Adam's two
# moments (swap_tensor/optimizer_utils.py, OptimizerStateSwapInfo: the parameter, then the optimizer's
# state tensors) and its gradient (`required_buffer_count = num_tensors + 1` in _swap_in_optimizer_state of
# swap_tensor/pipelined_optimizer_swapper.py and swap_in_optimizer_state of partitioned_optimizer_swapper.py).
SWAP_BUFFERS_PER_SUB_GROUP = 4


AIO_ALIGNED_BYTES = 1024  # swap_tensor/utils.py: every swapped tensor is padded to this times intra_op_parallelism


@dataclass(frozen=True)
class Shape:
    """What the estimate needs from the spec and the hardware."""

    world: int
    gpus_per_machine: int
    seq_len: int
    lp: int  # bytes of a 16-bit (2) or fp32 (4) parameter
    compiled: bool  # the decoder layers and the loss run compiled (modeling.compile_regions)
    reduce_bucket: int
    overlap_comm: bool
    prefetch_bucket: int
    gpu_memory: float  # bytes
    cpu_memory: float | None  # bytes per machine; None: unknown, not checked
    nvme_free: float | None
    precision: str = "bf16"
    fp32_grad_accum: bool | None = False  # the spec's zero.fp32_grad_accum (None: craken decides)
    loss: str = "auto"  # the spec's model.loss: where train/loss.py's chunked loss applies (vocab_loss.applies)
    fp8_recipe: str | None = None  # torchao float8 recipe under precision fp8
    swap: SwapSettings = SwapSettings()  # DeepSpeed's NVMe swap settings (deepspeed.extra)
    grown_segments: bool = True  # the allocator grows segments (Hardware.grown_segments)


def nvme_swap_bytes(partition: float, world: int, offload_optimizer: str, offload_param: str, lp: int,
                    swap: SwapSettings) -> float:
    """Host bytes one process holds for NVMe offload beside the swapped states, as DeepSpeed 0.19.8 allocates
    them (`partition`: the parameters one process owns, params / world):

    * optimizer to NVMe: SwapBufferManager's pool of offload_optimizer.buffer_count pinned fp32 buffers, each
      the largest sub-group's partition rounded up to the aio alignment (swap_tensor/optimizer_utils.py,
      OptimizerSwapper.__init__; largest_numel from zero/stage3.py _configure_tensor_swapping). Counted as
      the whole partition up to sub_group_size: the weight-decay group holds nearly all parameters (the
      no-decay one only norms and biases), and a sub-group that closes on reaching sub_group_size passes it
      by at most one parameter's partition. pipeline_read/pipeline_write change no size: PipelinedOptimizerSwapper takes its
      buffers from the same pool (swap_tensor/pipelined_optimizer_swapper.py), it only needs more of them.
    * parameters to NVMe: the param swapper's one pinned tensor of offload_param.buffer_count x buffer_size
      16-bit elements, buffer_size aligned (swap_tensor/partitioned_param_swapper.py, _configure_aio); the
      first max_in_cpu partition elements stay in a pinned CPU flat buffer (zero/stage3.py
      _create_param_groups_fp16_flat_cpu_memory); past max_in_cpu, a pinned buffer for swapping the
      partitions back out, sized by the full (unpartitioned) numel of the largest sub-group's parameters
      (zero/stage3.py, reserve_partitioned_swap_space(t.ds_numel ...))."""
    def aligned(numel: float, element: int) -> float:
        step = AIO_ALIGNED_BYTES * swap.intra_op_parallelism // element
        return -(-numel // step) * step

    largest_sub_group = min(partition, swap.sub_group_size)
    out = 0.0
    if offload_optimizer == "nvme":
        out += swap.optimizer_buffer_count * aligned(largest_sub_group, 4) * 4  # master weights and grads: fp32
    if offload_param == "nvme":
        out += swap.param_buffer_count * aligned(swap.param_buffer_size, lp) * lp
        out += min(partition, swap.max_in_cpu) * lp
        if partition > swap.max_in_cpu:
            out += aligned(world * largest_sub_group, lp) * lp
    return out


def offload_host_bytes(params: int, world: int, gpus_per_machine: int, offload_optimizer: str = "none",
                       offload_param: str = "none", lp: int = 2,
                       swap: SwapSettings = SwapSettings()) -> tuple[float, float]:
    """(CPU RAM, NVMe) bytes per machine that offloaded states take: for optimizer offload the fp32 master
    weights (with 16-bit training), Adam's two moments and fp32 gradients, and a 16-bit copy (at stage 3 the
    gradient partition, zero/stage3.py grad_partitions_flat_buffer, on the CPU whether the states go to the
    CPU or to NVMe); the 16-bit weights for parameter offload; NVMe's host buffers (`nvme_swap_bytes`).
    `craken doctor` checks RAM with it too."""
    partition = params / max(1, world)  # parameters whose states one process holds
    share = gpus_per_machine * partition  # and one machine
    cpu = nvme = 0.0
    states = ((4 if lp < 4 else 0) + 8 + 4) * share
    if offload_optimizer == "cpu":
        cpu += states + lp * share
    elif offload_optimizer == "nvme":
        nvme += states
        cpu += lp * share
    if offload_param == "cpu":
        cpu += lp * share
    elif offload_param == "nvme":
        nvme += lp * share
    cpu += gpus_per_machine * nvme_swap_bytes(partition, world, offload_optimizer, offload_param, lp, swap)
    return cpu, nvme


def engine_buffers(model: ModelInfo, cand: Candidate, shape: Shape, layers: float, acts: float, fp32_grads: bool
                   ) -> dict[str, float]:
    """What the engine allocates beyond model states and activations (bytes), by strategy."""
    num_params, world, lp = model.num_params, shape.world, shape.lp
    buffers: dict[str, float] = {}
    if cand.stage == 0:
        if world > 1:
            buffers["ddp_buckets"] = min(num_params, DS_ALLREDUCE_BUCKET) * lp
        if lp < 4:
            buffers["autocast_weight_copies"] = weight_copy_bytes(model, lp, shape.compiled)
    elif fp32_grads:
        # engine.buffered_allreduce_fallback flattens the fp32 gradients (also on one GPU); its bucket
        # closes after the tensor that passes 5e8 elements, here the whole flat group of the weights
        buffers["allreduce_flat_copy"] = 4.0 * num_params
    elif cand.stage in (1, 2):
        buffers["reduce_buckets"] = (2 if shape.overlap_comm else 1) * shape.reduce_bucket * lp
        if cand.offload_optimizer == "none":
            buffers["step_flat_grad_copy"] = lp * num_params / world  # flatten(averaged_gradients) before the fp32 cast
            # The step's buffers (that flat copy and the fp32 gradient partition counted under grads)
            # are allocated after the backward freed the activations, and the caching allocator
            # serves part of them from those freed blocks, so the peak is less than the sum.
            step_buffers = (lp + (4 if lp < 4 else 0)) * num_params / world
            if not shape.compiled:
                buffers["step_reuses_freed_activations"] = -min(step_buffers, STEP_REUSE_OF_ACTIVATIONS * layers)
        else:
            buffers["offload_grad_staging"] = lp * model.largest_layer_params
    else:
        buffers["reduce_bucket"] = shape.reduce_bucket * lp
        buffers["prefetch_bucket"] = shape.prefetch_bucket * lp
        if cand.offload_optimizer == "none":
            # grad_partitions_flat_buffer (on CPU with offload)
            buffers["grad_partition_16bit"] = lp * num_params / world
        if world > 1:
            buffers["gather_holes"] = STAGE3_MULTI_GPU_SLACK * acts
    slack = max(FRAGMENTATION[cand.stage], COMPILED_FRAGMENTATION) if shape.compiled else FRAGMENTATION[cand.stage]
    buffers["allocator_slack"] = slack * acts
    return buffers


# The detail key of that saving in `estimate` (craken plan says why it makes 'other' negative).
GRADIENTS_IN_FREED_BLOCKS = "gradients_replace_freed_activations"


def why_not_fits(total: float, cpu: float, nvme: float, micro_batch: int, shape: Shape) -> str | None:
    """Why an estimate does not fit (GPU, then CPU RAM, then NVMe), or None."""
    if total * (1 + SAFETY_MARGIN) > shape.gpu_memory:
        return (f"needs {total / GiB:.1f} GiB per GPU at micro-batch {micro_batch}, more than "
                f"{shape.gpu_memory / GiB / (1 + SAFETY_MARGIN):.1f} GiB usable "
                f"({shape.gpu_memory / GiB:.0f} GiB less the {SAFETY_MARGIN:.0%} safety margin)")
    if shape.cpu_memory is not None and cpu > shape.cpu_memory * 0.9:
        return f"needs {cpu / GiB:.0f} GiB of CPU RAM per machine, more than 90% of {shape.cpu_memory / GiB:.0f} GiB"
    if shape.nvme_free is not None and nvme > shape.nvme_free * 0.9:
        return f"needs {nvme / GiB:.0f} GiB on NVMe, more than 90% of the {shape.nvme_free / GiB:.0f} GiB free"
    return None


def estimate(model: ModelInfo, cand: Candidate, micro_batch: int, grad_accum: int, shape: Shape) -> Strategy:
    num_params, world, lp = model.num_params, shape.world, shape.lp
    off_opt, off_par = cand.offload_optimizer != "none", cand.offload_param != "none"
    fp32_grads = fp32_grad_accum_on(shape.fp32_grad_accum, cand.stage,
                                    "bf16" if shape.fp8_recipe else shape.precision, cand.offload_optimizer, world)
    params, grads, optim = model_state_bytes(num_params, cand.stage, world, offload_optimizer=off_opt,
                                             offload_param=off_par, largest_layer=model.largest_layer_params,
                                             lp_bytes=lp, grad_accum=grad_accum, fp32_grads=fp32_grads)
    chunked = vocab_loss.applies(shape.loss, model.model_type, model.vocab_size, cand.stage, shape.compiled)
    layers, logits = activation_bytes(model, micro_batch, shape.seq_len, lp, cand.activation_checkpointing,
                                      shape.compiled, "chunked" if chunked else "upcast", shape.fp8_recipe,
                                      residual_bytes(cand.stage, lp))
    acts = layers + logits
    buffers = engine_buffers(model, cand, shape, layers, acts, fp32_grads)
    if cand.stage == 0 and grad_accum == 1 and shape.grown_segments and world == 1:
        # The plain engine's gradients start from nothing at every step (zero_grad sets them to None), and
        # each layer's backward makes its gradients as it frees what that layer saved. Grown segments merge
        # the freed blocks and serve the gradients from them, so the peak is the larger of the backward's
        # start (activations, logits, weight copies) and its end (every gradient), not their sum. Fixed
        # segments keep the freed blocks apart (a layer's activations are smaller pieces than its fp32
        # gradients), and with accumulation the earlier micro-batches' gradients are held through each
        # backward: there both add up. Measured on one GPU only: with several, DDP's reducer copies each
        # gradient into its buckets as the backward goes, which no row has measured, so the sum stays.
        held = acts + buffers.get("autocast_weight_copies", 0.0)
        buffers[GRADIENTS_IN_FREED_BLOCKS] = -min(grads, held)
    reserved = params + grads + optim + acts + sum(buffers.values())
    buffers["cuda_context"] = CUDA_CONTEXT_GIB * GiB
    if world > 1:
        buffers["nccl"] = NCCL_GIB * GiB
    total = reserved + buffers["cuda_context"] + buffers.get("nccl", 0.0)
    other = total - params - grads - optim - acts
    cpu, nvme = offload_host_bytes(num_params, world, shape.gpus_per_machine, cand.offload_optimizer,
                                   cand.offload_param, lp, shape.swap)
    cpu += shape.gpus_per_machine * CPU_PER_PROCESS_GIB * GiB
    refused = fp8_layout_problems(cand.stage, cand.offload_optimizer, cand.offload_param) if shape.fp8_recipe else []
    why = refused[0].split(": use ")[0] if refused else why_not_fits(total, cpu, nvme, micro_batch, shape)
    detail = {"layer_activations": layers / GiB, "logits_loss": logits / GiB,
              **{k: v / GiB for k, v in buffers.items()}}
    speed = cand.speed(world) * (fp8.speed(model, shape.seq_len, shape.fp8_recipe) if shape.fp8_recipe else 1.0)
    return Strategy(cand.name, cand.stage, cand.offload_optimizer, cand.offload_param, cand.activation_checkpointing,
                    micro_batch, grad_accum, params / GiB, grads / GiB, optim / GiB, acts / GiB, other / GiB,
                    total / GiB, reserved / GiB, cpu / GiB, nvme / GiB, why is None, speed, why, detail)

# ---------------------------------------------------------------------------------------------
# the choice


def candidates(nvme: bool = False) -> list[Candidate]:
    """Every strategy worth predicting: offload where the stage allows it, each with and without AC."""
    base = [Candidate(0), Candidate(1), Candidate(2), Candidate(3),
            Candidate(1, "cpu"), Candidate(2, "cpu"), Candidate(3, "cpu"), Candidate(3, "cpu", "cpu")]
    if nvme:
        base += [Candidate(3, "nvme"), Candidate(3, "nvme", "nvme")]
    return [Candidate(b.stage, b.offload_optimizer, b.offload_param, ac) for b in base for ac in (False, True)]


def _micro_batches(per_gpu: int, requested: int, search: bool, cap: int | None = None) -> list[int]:
    """Micro-batches to try, largest first: divisors of the per-GPU batch (so accumulation is whole),
    none above `cap` (what the data set can fill on every process)."""
    if not search:
        return [requested]
    return sorted((m for m in range(1, per_gpu + 1) if per_gpu % m == 0 and (cap is None or m <= cap)),
                  reverse=True)


def compiles_by_default(model: ModelInfo, hardware: Hardware) -> bool:
    """Whether `craken train --auto` (and `craken plan`) turn on regional compilation when the user
    did not set it: Llama-family models (the decoder layers `compile_regions` finds, the activations
    the compiled term was derived for) on GPUs Triton supports (compute capability 7.0 or newer), and
    large enough for the 20-40 s of compilation to pay back (the built-in tiny model trains in seconds)."""
    return (model.family == "llama" and model.num_params >= COMPILE_MIN_PARAMS and hardware.gpu_count > 0
            and all(g.capability >= (7, 0) for g in hardware.gpus))


def compiled_where_measured(strategy: Strategy) -> bool:
    """Compilation is turned on by default only with the strategies craken has run compiled on GPUs
    (no ZeRO, ZeRO-1 and ZeRO-2 without offload, docs/performance.md); stage 3 gathers parameters in
    hooks inside each layer and offload moves the step to the CPU, neither measured compiled."""
    return strategy.stage <= 2 and strategy.offload_optimizer == "none" and strategy.offload_param == "none"


def with_compile(spec):
    """The spec with regional compilation on (what --auto and `craken plan` try first)."""
    return spec.model_copy(update={"model": spec.model.model_copy(update={"compile": True})})


def plan_by_default(model: ModelInfo, spec, hardware: Hardware, *, search_micro_batch: bool = True) -> Plan:
    """The plan of a spec whose compilation the user left open (`craken plan`): compiled where
    `compiles_by_default` and `compiled_where_measured` allow, eager otherwise."""
    if compiles_by_default(model, hardware):
        result = plan(model, with_compile(spec), hardware, search_micro_batch=search_micro_batch)
        if result.choice is not None and compiled_where_measured(result.choice):
            return result
    return plan(model, spec, hardware, search_micro_batch=search_micro_batch)


def shape_of(model: ModelInfo, spec, hardware: Hardware, world: int, gpu_memory: float) -> Shape:
    zero = spec.zero
    nvme_path = spec.offload.optimizer.nvme_path or spec.offload.param.nvme_path
    return Shape(
        world=world, gpus_per_machine=max(1, world // spec.cluster.num_machines), seq_len=spec.data.seq_len,
        lp=4 if spec.precision == "fp32" else 2,
        # modeling.compile_regions compiles `model.model.layers` and the loss; GPT-2/NeoX models keep
        # their layers elsewhere and run eagerly whatever the spec says.
        compiled=spec.model.compile and model.family != "gpt", reduce_bucket=zero.reduce_bucket_size,
        overlap_comm=zero.overlap_comm,
        prefetch_bucket=zero.stage3_prefetch_bucket_size or STAGE3_DEFAULTS["stage3_prefetch_bucket_size"],
        gpu_memory=gpu_memory, cpu_memory=hardware.ram_total or None,
        nvme_free=hardware.disk_free.get(nvme_path) if nvme_path else None,
        precision=spec.precision, fp32_grad_accum=zero.fp32_grad_accum, loss=spec.model.loss,
        fp8_recipe=spec.fp8.recipe if spec.precision == "fp8" else None,
        swap=SwapSettings.from_extra(spec.deepspeed.extra), grown_segments=hardware.grown_segments)


def plan(model: ModelInfo, spec, hardware: Hardware, *, search_micro_batch: bool = True,
         gpu_memory: float | None = None, out_of_memory_at: dict[str, int] | None = None,
         max_micro_batch: int | None = None) -> Plan:
    """Predict every strategy for `spec` (resolved: num_processes set) on `hardware`; choose.

    With `search_micro_batch`, each strategy gets the largest micro-batch that divides the per-GPU
    share of the global batch and fits; the accumulation makes up the rest. Otherwise the spec's
    micro-batch is kept. `gpu_memory` (bytes) overrides the smallest detected GPU's memory.
    `out_of_memory_at` (strategy name -> micro-batch) holds what already ran out of memory on the
    GPUs: those strategies get only smaller micro-batches (the OOM fallback of --auto).
    `max_micro_batch` caps the search at what the data set fills on every process (data_cap).
    """
    world = spec.cluster.num_processes or max(1, hardware.gpu_count) * spec.cluster.num_machines
    micro = spec.batch.micro_batch
    global_batch = spec.batch.global_batch or micro * spec.batch.accumulation(world) * world
    per_gpu = max(1, global_batch // world)
    if gpu_memory is None:
        gpu_memory = min((g.memory_total for g in hardware.gpus), default=0)
    shape = shape_of(model, spec, hardware, world, gpu_memory)
    tries = _micro_batches(per_gpu, micro, search_micro_batch, max_micro_batch)
    nvme_path = spec.offload.optimizer.nvme_path or spec.offload.param.nvme_path
    results = [_best_micro_batch(model, cand, tries, per_gpu, shape, out_of_memory_at or {})
               for cand in candidates(nvme=bool(nvme_path))]
    # Fastest first; at equal speed the larger micro-batch, then stage order (ZeRO-1 before ZeRO-2).
    results.sort(key=lambda s: (-s.speed, -s.micro_batch if s.fits else 0))
    choice = next((s for s in results if s.fits), None)
    rejected = []
    for s in results:
        if s is choice:
            break
        rejected.append(f"{s.name}: {s.why_not}")
    requested = estimate(model, Candidate(spec.zero.stage, spec.offload.optimizer.device,
                                          spec.offload.param.device, spec.model.activation_checkpointing),
                         micro, spec.batch.accumulation(world), shape)
    return Plan(results, choice, requested, rejected, world, global_batch, shape.compiled, gpu_memory / GiB,
                gpu_memory / GiB / (1 + SAFETY_MARGIN), model)


def other_numerics(spec, hardware: Hardware) -> str | None:
    """The precision `craken plan` shows beside the spec's own: fp8 beside bf16 on GPUs with float8
    tensor cores (compute capability >= 8.9), bf16 beside fp8; None for the others."""
    if spec.precision == "fp8":
        return "bf16"
    if spec.precision == "bf16" and hardware.gpus and all(g.fp8 for g in hardware.gpus):
        return "fp8"
    return None


def with_precision(spec, precision: str):
    return spec.model_copy(update={"precision": precision})


def _best_micro_batch(model: ModelInfo, cand: Candidate, tries: list[int], per_gpu: int, shape: Shape,
                      oom: dict[str, int]) -> Strategy:
    """The candidate at the largest micro-batch that fits (or at the smallest tried, not fitting)."""
    allowed = [mb for mb in tries if mb < oom.get(cand.name, mb + 1)]
    est = None
    for mb in allowed:
        est = estimate(model, cand, mb, max(1, per_gpu // mb), shape)
        if est.fits:
            return est
    if est is not None:
        return est
    smallest = oom.get(cand.name, min(tries, default=1))
    reason = (f"ran out of GPU memory at micro-batch {smallest}" if cand.name in oom
              else "no micro-batch the data set can fill")
    return replace(estimate(model, cand, smallest, max(1, per_gpu // smallest), shape), fits=False, why_not=reason)


# ---------------------------------------------------------------------------------------------
# what --auto may launch: settings the user fixed, the data's micro-batch cap, and the refusal


def compatible(result: Plan, fixed: dict[str, object]) -> list[Strategy]:
    """The strategies that fit and keep every setting the user fixed (dotted spec path -> value),
    fastest first. A fixed grad_accum is kept without comparing: the plan derives it from the same global batch."""
    return [s for s in result.strategies if s.fits and all(
        s.settings()[path] == value for path, value in fixed.items() if path != "batch.grad_accum")]


def train_blocks(blocks: int, eval_fraction: float) -> int:
    """Training blocks left after train/data.train_eval_split holds out its evaluation share."""
    if eval_fraction <= 0 or blocks < 2:
        return blocks
    return blocks - max(1, int(blocks * eval_fraction))


def data_cap(train: int, world: int) -> int:
    """The largest micro-batch every process can fill: the loader drops a last partial batch, and each
    of the `world` processes needs at least one micro-batch of its own."""
    return train // max(1, world)


def data_problem(train: int, world: int, seq_len: int, micro_batch: int | None = None) -> str | None:
    """Why the data set cannot feed this run (None when it can): one message naming what to change.
    `micro_batch` is the one the user fixed, if any."""
    cap = data_cap(train, world)
    if cap == 0:
        return (f"{train} training blocks of {seq_len} tokens are fewer than one micro-batch per process "
                f"({world} processes): add data, lower --seq-len, or use fewer processes (--num-processes)")
    if micro_batch is not None and micro_batch > cap:
        return (f"--micro-batch {micro_batch} needs {micro_batch * world} training blocks of {seq_len} tokens "
                f"({world} processes), the data set has {train}: use --micro-batch {cap} or less, add data, "
                "or lower --seq-len")
    return None


def _replaced(spec, section: str, **values):
    """The spec with fields of one section replaced (pydantic copies, nothing validated twice)."""
    return spec.model_copy(update={section: getattr(spec, section).model_copy(update=values)})


def _with_nvme(spec, path: str):
    offload = spec.offload
    return _replaced(spec, "offload", optimizer=offload.optimizer.model_copy(update={"nvme_path": path}),
                     param=offload.param.model_copy(update={"nvme_path": path}))


def _first_fit(model: ModelInfo, spec, hardware: Hardware, fixed: dict, **kwargs) -> Strategy | None:
    found = compatible(plan(model, spec, hardware, **kwargs), fixed)
    return found[0] if found else None


def _more_gpus(model: ModelInfo, spec, hardware: Hardware, fixed: dict, **kwargs) -> str | None:
    gpu = min(hardware.gpus, key=lambda g: g.memory_total)
    for count in (2, 4, 8, 16, 32, 64):
        machines = max(1, count // 8)
        more = replace(hardware, gpus=tuple(replace(gpu, index=i) for i in range(count // machines)))
        grown = _replaced(spec, "cluster", num_processes=count, num_machines=machines)
        if _first_fit(model, grown, more, fixed, **kwargs):
            flags = f"--num-processes {count}" + (f" --num-machines {machines}" if machines > 1 else "")
            return f"{count} GPUs of {gpu.memory_total / GiB:.0f} GiB: {flags}"
    return None


def _offload_room(model: ModelInfo, spec, hardware: Hardware, fixed: dict, **kwargs) -> list[str]:
    out = []
    found = _first_fit(model, spec, replace(hardware, ram_total=1 << 60), fixed, **kwargs)
    if found is not None and hardware.ram_total and found.offload_optimizer == "cpu":
        flags = "--offload-optimizer cpu" + (" --offload-param cpu" if found.offload_param == "cpu" else "")
        out.append(f"{found.cpu_memory_gib / 0.9:.1f} GiB of CPU RAM per machine (this one has "
                   f"{hardware.ram_total / GiB:.1f} GiB) for {flags}")
    disk = replace(hardware, disk_free={"/nvme": 1 << 60})
    found = _first_fit(model, _with_nvme(spec, "/nvme"), disk, fixed, **kwargs)
    if found is not None and "nvme" in (found.offload_optimizer, found.offload_param):
        flags = " ".join(f"--offload-{what} nvme" for what, device in (("optimizer", found.offload_optimizer),
                                                                        ("param", found.offload_param))
                         if device == "nvme")
        out.append(f"NVMe offload: {flags} --nvme-path DIR on a local disk with {found.nvme_gib / 0.9:.0f} GiB free")
    return out


def smallest_changes(model: ModelInfo, spec, hardware: Hardware, fixed: dict[str, object], **kwargs) -> list[str]:
    """Each smallest change that would make a strategy fit, named as flags: more GPUs of this memory,
    CPU RAM or NVMe for offload, a shorter sequence, activation checkpointing or a smaller micro-batch
    where the user fixed them. Pure: each answer is the plan of a changed spec or hypothetical hardware;
    `kwargs` are plan()'s (search_micro_batch, max_micro_batch)."""
    out = [change for change in [_more_gpus(model, spec, hardware, fixed, **kwargs)] if change]
    out += _offload_room(model, spec, hardware, fixed, **kwargs)
    seq = spec.data.seq_len // 2
    while seq >= 128 and not _first_fit(model, _replaced(spec, "data", seq_len=seq), hardware, fixed, **kwargs):
        seq //= 2
    if seq >= 128:
        out.append(f"a shorter sequence: --seq-len {seq}")
    if fixed.get("model.activation_checkpointing") is False:
        loose = {p: v for p, v in fixed.items() if p != "model.activation_checkpointing"}
        found = _first_fit(model, spec, hardware, loose, **kwargs)
        if found is not None and found.activation_checkpointing:
            out.append(f"activation checkpointing: --activation-checkpointing ({found.name})")
    if "batch.micro_batch" in fixed:
        loose = {p: v for p, v in fixed.items() if p not in ("batch.micro_batch", "batch.grad_accum")}
        found = _first_fit(model, spec, hardware, loose, max_micro_batch=kwargs.get("max_micro_batch"))
        if found is not None:
            out.append(f"a smaller micro-batch: --micro-batch {found.micro_batch} ({found.name})")
    return out


def refusal(model: ModelInfo, result: Plan, changes: list[str], fixed: dict[str, object]) -> str:
    """The one message of `--auto` when nothing compatible with the user's settings is predicted to fit."""
    closest = min(result.strategies, key=lambda s: s.total_gib)
    kept = ", ".join(f"{path}={value}" for path, value in fixed.items())
    head = (f"no strategy for {model.name} ({model.num_params / 1e9:.2f} B parameters) is predicted to fit "
            f"{result.gpu_memory_gib:.0f} GiB per GPU{f' with the settings you fixed ({kept})' if kept else ''}; "
            f"the one needing the least GPU memory, {closest.name}, {closest.why_not}. Nothing was launched")
    if not changes:
        return head + "; see `craken plan` for every strategy"
    return head + ". Any one of these would fit:\n" + "\n".join(f"    {change}" for change in changes)
