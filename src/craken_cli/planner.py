"""Per-GPU memory of every ZeRO strategy, and the choice: the fastest one that fits.

Pure: `plan(model_info, spec, hardware) -> Plan`; no torch, no I/O. `craken plan` prints it and
`craken train --auto` applies `Plan.choice`. docs/planner.md derives every term and compares the
prediction with memory measured on GPUs.

The memory model follows what DeepSpeed 0.19.8 allocates (read from its source):

* stage 0 + bf16/fp16 (no ZeRO; DeepSpeed's FP16_Optimizer): 16-bit params and grads, fp32 master
  weights and two fp32 Adam moments, and at the step a flat fp32 copy of all gradients;
  the gradients are all-reduced through a 16-bit bucket of up to 5e8 elements.
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
the loss's fp32 upcast of the logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from .hardware import Hardware
from .modelinfo import ModelInfo
from .spec import fp8_layout_problems, fp32_grad_accum_on
from .train import fp8
from .train import loss as vocab_loss

GiB = 1024**3

SAFETY_MARGIN = 0.10  # a strategy fits when predicted x (1 + margin) <= GPU memory
CUDA_CONTEXT_GIB = 0.55  # CUDA context, kernels and cuBLAS workspace: outside torch's reserved memory
NCCL_GIB = 0.5  # NCCL communicator buffers with more than one process
DS_ALLREDUCE_BUCKET = 500_000_000  # engine.MEMORY_OPT_ALLREDUCE_SIZE, stage 0 gradient all-reduce
# The caching allocator keeps freed activation blocks that later, differently sized requests cannot
# reuse: share of activations + logits held as slack. Stage 3 was 0.22, fitted on the hand-written
# ZeRO-3 row of gpu-baseline.md (1.1B, mb 4); craken's own ZeRO-3 at mb 16 (1 x H200, 2026-12-01:
# 91.38 GiB, no offload; 78.16 with all offload) was then over-predicted by 18% and 12%, and 0.10 keeps
# every recorded row within 10% (docs/planner.md).
FRAGMENTATION = {0: 0.10, 1: 0.10, 2: 0.10, 3: 0.10}
# Compiled layers: inductor's backward recomputes the pointwise ops into buffers of its own sizes, and
# more of the freed blocks stay reserved. Fitted on craken's compiled no-ZeRO runs of the 1.1B model
# (H100 mb 8: 37.41 GiB; H200 mb 16: 55.43 GiB; with 0.10 they were under-predicted by 7.7% and 6.6%).
COMPILED_FRAGMENTATION = 0.25
# Stage 3 on several GPUs all-gathers each layer's parameters (forward and backward) and
# reduce-scatters its gradients between activation allocations; the holes stay reserved. Baseline:
# +4.3 GiB at 2 GPUs over 1 GPU with 17.7 GiB of activations. Extra slack share, world size > 1.
STAGE3_MULTI_GPU_SLACK = 0.24
# Share of the layer activations (freed at the end of the backward) that ZeRO-1/2's step buffers
# reuse instead of reserving new memory. Fitted on craken's own eager ZeRO-1/2 runs (planner_bench,
# 1 x H100, 160M/1.1B/2.7B, seq 1024/2048: the plain sum over-predicted them by 2.5-16%); docs/planner.md.
# Compiled layers free blocks of inductor's sizes, which the step's flat buffers do not reuse: the
# compiled ZeRO-1/2 runs (1.1B, mb 16, 1 x H200) were 12.1% under-predicted with the reuse, 2.7% without.
STEP_REUSE_OF_ACTIVATIONS = 0.35
CPU_PER_PROCESS_GIB = 3.0  # Python, torch, CUDA host allocations and the data loader of one process
ACTIVATION_CHECKPOINTING_SPEED = 0.75  # about 1/3 more compute for the recomputed forward

# Relative speed of each strategy (tokens/s per GPU against no ZeRO), one table per GPU count: only the
# order matters for the choice, the numbers are shown so the order can be checked. "offload_optimizer"
# caps the stage's figure, "offload_param" multiplies it.
# One GPU: craken train --auto, 1.1B, 1 x H200, 2026-12-01 (docs/performance.md): ZeRO-1 (fp32
# accumulation) 0.956-0.967 and ZeRO-2 0.947-0.956 of no ZeRO within a call; ZeRO-3 (eager, mb 16) 53,061
# tokens/s against 75,701-78,283 for no ZeRO in the other calls of that day; ZeRO-2 + optimizer CPU
# offload 30,838 at mb 16 (the CPU's Adam step is a fixed cost per optimizer step, so fewer tokens per
# step do worse: hand-written at mb 4, 11,759, 0.23); parameter offload on top (ZeRO-3, same call) 29,973.
# Several GPUs: gpu-baseline.md; they share the host's cores and PCIe, and craken's offload has not run
# there, so the baseline's one-GPU offload figure (0.28) and an estimated halving stay.
SPEED_1GPU = {"zero0": 1.0, "zero1": 0.96, "zero2": 0.95, "zero3": 0.69, "offload_optimizer": 0.40,
              "offload_param": 0.97}
SPEED_NGPU = {"zero0": 1.0, "zero1": 0.98, "zero2": 0.98, "zero3": 0.51, "offload_optimizer": 0.28,
              "offload_param": 0.5}
NVME_SPEED = 0.5  # on top of CPU offload
COMPILE_MIN_PARAMS = 100_000_000  # smaller models: compilation costs more time than it saves
# Compiled layers whose Linears all convert to torchao float8 keep this share of the bf16 layers'
# activations (the inputs the backward needs are kept as float8 casts); a layer converted in part saves
# that part of the difference. Issue 19's one-H200 lab (plain Accelerate, compiled): peak reserved
# 75.06 -> 62.70 GiB at 1.1B mb 16 seq 2048, 125.95 -> 99.32 GiB at 2.4B mb 8 seq 4096, 0.36 and 0.42 of
# this model's compiled activations + slack taken away; the smaller saving is kept. Not yet measured
# through craken (benchmarks/fp8_bench.py prints predicted against measured).
FP8_ACTIVATION_SHARE = 0.64


@dataclass(frozen=True)
class Candidate:
    """One strategy: ZeRO stage, where optimizer states and parameters live, checkpointing."""

    stage: int
    offload_optimizer: str = "none"  # none | cpu | nvme
    offload_param: str = "none"
    activation_checkpointing: bool = False

    @property
    def name(self) -> str:
        out = f"zero{self.stage}"
        if self.offload_optimizer != "none":
            out += f"+offload_optimizer_{self.offload_optimizer}"
        if self.offload_param != "none":
            out += f"+offload_param_{self.offload_param}"
        if self.activation_checkpointing:
            out += "+ac"
        return out

    def speed(self, world: int) -> float:
        table = SPEED_1GPU if world == 1 else SPEED_NGPU
        s = table[f"zero{self.stage}"]
        if self.offload_optimizer != "none":
            s = min(s, table["offload_optimizer"]) * (NVME_SPEED if self.offload_optimizer == "nvme" else 1)
        if self.offload_param != "none":
            s *= table["offload_param"] * (NVME_SPEED if self.offload_param == "nvme" else 1)
        if self.activation_checkpointing:
            s *= ACTIVATION_CHECKPOINTING_SPEED
        return s


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
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 3)
        d["detail"] = {k: round(v, 3) for k, v in self.detail.items()}
        return d


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
    P, N = params, world
    mixed = lp_bytes < 4
    master = 4 if mixed else 0
    fp32_grad = 4 if mixed else 0
    if stage == 0:
        # No ZeRO on GPUs runs without DeepSpeed (spec.uses_deepspeed): fp32 weights under autocast,
        # fp32 gradients, torch AdamW's two fp32 moments.
        return 4 * P, 4 * P, 8 * P
    if stage in (1, 2):
        if offload_optimizer:
            return lp_bytes * P, 0.0, 0.0
        if fp32_grads and stage == 1:
            return lp_bytes * P, (lp_bytes + 4.0) * P, (master + 8) * P / N
        lp_grads = lp_bytes * P if (stage == 1 and grad_accum > 1) else lp_bytes * P / N
        return lp_bytes * P, lp_grads + fp32_grad * P / N, (master + 8) * P / N
    live = lp_bytes * largest_layer  # the largest layer's gathered 16-bit params, and its grads
    p = live + (0 if offload_param else lp_bytes * P / N)
    if offload_optimizer:
        return p, live, 0.0
    return p, live + (4 if mixed else lp_bytes) * P / N, (master + 8) * P / N


def layer_activation_bytes_per_token(m: ModelInfo, lp: int, compiled: bool = False) -> float:
    """Bytes one decoder layer saves for the backward pass, per token (SDPA, no s^2 scores)."""
    h, f = m.hidden_size, m.intermediate_size
    q_dim, kv_dim = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    # SDPA saves q, k, v and its output (which o_proj also saves: same storage) and an fp32 log-sum-exp.
    attn = lp * (2 * q_dim + 2 * kv_dim) + 4 * m.num_heads
    if m.family == "gpt":
        norms = 2 * (2 * lp * h)  # LayerNorm saves its input; the next linear saves its output
        mlp = 2 * lp * f  # GELU's input and output
        drop = 2 * h if m.dropout > 0 else 0  # two residual-dropout masks (1 byte each)
        return norms + attn + mlp + drop
    if compiled:
        # Inductor's partitioner keeps the matmul inputs it cannot cheaply recompute and recomputes the
        # pointwise rest (norms, SiLU, the product) in the backward: the layer input and the residual
        # after attention, SDPA's q, k, v, output and log-sum-exp, and the MLP's gate and up. 40,064
        # bytes per token and layer at 1.1B; measured 38.7k (craken --auto --compile, H100, mb 8).
        return 2 * lp * h + attn + 2 * lp * f
    # RMSNorm: fp32 copy of the input (kept by pow and mul), the normalized 16-bit value (kept by
    # the weight multiply) and the output (kept by the next linear). Gated MLP: gate, SiLU(gate), up, product.
    # (In fp32 the "copy" is the input itself, so 4h + 2 lp h holds for both precisions.)
    norm = 4 * h + 2 * lp * h
    return 2 * norm + attn + 4 * lp * f


def chunked_loss_bytes(m: ModelInfo, tokens: int, lp: int, compiled: bool) -> float:
    """train/loss.py's chunked loss: one chunk's logits and their gradient (16-bit compiled; eager, the
    fp32 logits, their softmax and the 16-bit gradient), the output weight's fp32 gradient and 16-bit
    copy, and the hidden states' gradient, which it keeps for the backward instead of any logits."""
    chunk = min(tokens, vocab_loss.chunk_tokens(m.vocab_size)) * m.vocab_size
    return chunk * (2 * lp if compiled else 8 + lp) + m.vocab_size * m.hidden_size * (4 + lp) + \
        tokens * m.hidden_size * lp


def activation_bytes(m: ModelInfo, micro_batch: int, seq_len: int, lp: int, checkpointing: bool,
                     compiled: bool = False, chunked_loss: bool = False,
                     fp8_recipe: str | None = None) -> tuple[float, float]:
    """(decoder layers, logits + loss) bytes at the start of the backward pass, for one micro-batch."""
    tokens = micro_batch * seq_len
    per_layer = layer_activation_bytes_per_token(m, lp, compiled) * tokens
    if fp8_recipe and compiled:
        per_layer *= 1 - (1 - FP8_ACTIVATION_SHARE) * fp8.converted_share(m, fp8_recipe)
    if checkpointing:
        # Each layer keeps only its input; one layer at a time is recomputed in the backward.
        layers = m.num_layers * lp * m.hidden_size * tokens + per_layer
    else:
        layers = m.num_layers * per_layer
    final_norm = (4 * m.hidden_size + 2 * lp * m.hidden_size) * tokens
    # transformers' loss upcasts the logits to fp32; log_softmax keeps its fp32 output, and its
    # backward holds the incoming and the outgoing fp32 gradient at once: 12 bytes per logit.
    # Compiled (modeling.compile_regions), the loss keeps the 16-bit logits and writes a 16-bit
    # gradient: no fp32 copy lives across the step (4 GiB less at 1.1B, micro-batch 8, measured).
    logits = (2 * lp if compiled else 12) * tokens * m.vocab_size
    if chunked_loss:
        logits = chunked_loss_bytes(m, tokens, lp, compiled)
    return layers + final_norm, logits


# ---------------------------------------------------------------------------------------------
# one estimate


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
    loss: str = "auto"  # the spec's model.loss (where train/loss.py's chunked loss applies)
    fp8_recipe: str | None = None  # torchao float8 recipe under precision fp8


def estimate(m: ModelInfo, c: Candidate, micro_batch: int, grad_accum: int, s: Shape) -> Strategy:
    P, N, lp = m.num_params, s.world, s.lp
    off_opt, off_par = c.offload_optimizer != "none", c.offload_param != "none"
    fp32_grads = fp32_grad_accum_on(s.fp32_grad_accum, c.stage, "bf16" if s.fp8_recipe else s.precision,
                                    c.offload_optimizer, N)
    params, grads, optim = model_state_bytes(P, c.stage, N, offload_optimizer=off_opt, offload_param=off_par,
                                             largest_layer=m.largest_layer_params, lp_bytes=lp,
                                             grad_accum=grad_accum, fp32_grads=fp32_grads)
    chunked = vocab_loss.applies(s.loss, m.model_type, m.vocab_size, c.stage)
    layers, logits = activation_bytes(m, micro_batch, s.seq_len, lp, c.activation_checkpointing, s.compiled,
                                      chunked, s.fp8_recipe)
    acts = layers + logits
    d: dict[str, float] = {}
    if c.stage == 0:
        d["allreduce_bucket"] = min(P, DS_ALLREDUCE_BUCKET) * lp
    elif fp32_grads:
        # engine.buffered_allreduce_fallback flattens the fp32 gradients (also on one GPU); its bucket
        # closes after the tensor that passes 5e8 elements, here the whole flat group of the weights
        d["allreduce_flat_copy"] = 4.0 * P
    elif c.stage in (1, 2):
        d["reduce_buckets"] = (2 if s.overlap_comm else 1) * s.reduce_bucket * lp
        if not off_opt:
            d["step_flat_grad_copy"] = lp * P / N  # flatten(averaged_gradients) before the fp32 cast
            # The step's buffers (that flat copy and the fp32 gradient partition counted under grads)
            # are allocated after the backward freed the activations, and the caching allocator
            # serves part of them from those freed blocks, so the peak is less than the sum.
            step_buffers = (lp + (4 if lp < 4 else 0)) * P / N
            if not s.compiled:
                d["step_reuses_freed_activations"] = -min(step_buffers, STEP_REUSE_OF_ACTIVATIONS * layers)
        else:
            d["offload_grad_staging"] = lp * m.largest_layer_params
    else:
        d["reduce_bucket"] = s.reduce_bucket * lp
        d["prefetch_bucket"] = s.prefetch_bucket * lp
        if not off_opt:
            d["grad_partition_16bit"] = lp * P / N  # grad_partitions_flat_buffer (on CPU with offload)
        if N > 1:
            d["gather_holes"] = STAGE3_MULTI_GPU_SLACK * acts
    slack = FRAGMENTATION[c.stage]
    if s.compiled:
        slack = max(slack, COMPILED_FRAGMENTATION)
    d["allocator_slack"] = slack * acts
    reserved = params + grads + optim + acts + sum(d.values())
    d["cuda_context"] = CUDA_CONTEXT_GIB * GiB
    if N > 1:
        d["nccl"] = NCCL_GIB * GiB
    total = reserved + d["cuda_context"] + d.get("nccl", 0.0)
    other = total - params - grads - optim - acts

    # CPU RAM per machine: offloaded fp32 master + moments + fp32 grads (+ 16-bit copies), pinned.
    local = s.gpus_per_machine
    cpu = local * CPU_PER_PROCESS_GIB * GiB
    nvme = 0.0
    per_proc_opt = ((4 if lp < 4 else 0) + 8 + 4) * P / N + lp * P / N  # master, moments, fp32 grads, 16-bit copy
    if c.offload_optimizer == "cpu":
        cpu += local * per_proc_opt
    elif c.offload_optimizer == "nvme":
        nvme += local * per_proc_opt
        cpu += local * (4 + 4) * P / N / 4  # swap buffers: about a quarter of the states in flight
    if c.offload_param == "cpu":
        cpu += local * lp * P / N
    elif c.offload_param == "nvme":
        nvme += local * lp * P / N
        cpu += local * 2 * lp * m.largest_layer_params

    why = None
    refused = fp8_layout_problems(c.stage, c.offload_optimizer, c.offload_param) if s.fp8_recipe else []
    if refused:
        why = refused[0].split(": use ")[0]
    elif total * (1 + SAFETY_MARGIN) > s.gpu_memory:
        why = (f"needs {total / GiB:.1f} GiB per GPU at micro-batch {micro_batch}, more than "
               f"{s.gpu_memory / GiB / (1 + SAFETY_MARGIN):.1f} GiB usable "
               f"({s.gpu_memory / GiB:.0f} GiB less the {SAFETY_MARGIN:.0%} safety margin)")
    elif s.cpu_memory is not None and cpu > s.cpu_memory * 0.9:
        why = f"needs {cpu / GiB:.0f} GiB of CPU RAM per machine, more than 90% of {s.cpu_memory / GiB:.0f} GiB"
    elif s.nvme_free is not None and nvme > s.nvme_free * 0.9:
        why = f"needs {nvme / GiB:.0f} GiB on NVMe, more than 90% of the {s.nvme_free / GiB:.0f} GiB free"
    detail = {"layer_activations": layers / GiB, "logits_loss": logits / GiB, **{k: v / GiB for k, v in d.items()}}
    return Strategy(c.name, c.stage, c.offload_optimizer, c.offload_param, c.activation_checkpointing, micro_batch,
                    grad_accum, params / GiB, grads / GiB, optim / GiB, acts / GiB, other / GiB, total / GiB,
                    reserved / GiB, cpu / GiB, nvme / GiB, why is None,
                    c.speed(N) * (fp8.speed(m, s.seq_len, s.fp8_recipe) if s.fp8_recipe else 1.0), why, detail)


# ---------------------------------------------------------------------------------------------
# the choice


def candidates(nvme: bool = False) -> list[Candidate]:
    """Every strategy worth predicting: offload where the stage allows it, each with and without AC."""
    base = [Candidate(0), Candidate(1), Candidate(2), Candidate(3),
            Candidate(1, "cpu"), Candidate(2, "cpu"), Candidate(3, "cpu"), Candidate(3, "cpu", "cpu")]
    if nvme:
        base += [Candidate(3, "nvme"), Candidate(3, "nvme", "nvme")]
    return [Candidate(b.stage, b.offload_optimizer, b.offload_param, ac) for b in base for ac in (False, True)]


def _micro_batches(per_gpu: int, requested: int, search: bool) -> list[int]:
    """Micro-batches to try, largest first: divisors of the per-GPU batch (so accumulation is whole)."""
    if not search:
        return [requested]
    return sorted((m for m in range(1, per_gpu + 1) if per_gpu % m == 0), reverse=True)


def compiles_by_default(model: ModelInfo, hardware: Hardware) -> bool:
    """Whether `craken train --auto` (and `craken plan`) turn on regional compilation when the user
    did not set it: Llama-family models (the decoder layers `compile_regions` finds, the activations
    the compiled term was derived for) on GPUs Triton supports (compute capability 7.0 or newer), and
    large enough for the 20-40 s of compilation to pay back (the built-in tiny model trains in seconds)."""
    return (model.family == "llama" and model.num_params >= COMPILE_MIN_PARAMS and hardware.gpu_count > 0
            and all(g.capability >= (7, 0) for g in hardware.gpus))


def compiled_where_measured(s: Strategy) -> bool:
    """Compilation is turned on by default only with the strategies craken has run compiled on GPUs
    (no ZeRO, ZeRO-1 and ZeRO-2 without offload, docs/performance.md); stage 3 gathers parameters in
    hooks inside each layer and offload moves the step to the CPU, neither measured compiled."""
    return s.stage <= 2 and s.offload_optimizer == "none" and s.offload_param == "none"


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


def plan(model: ModelInfo, spec, hardware: Hardware, *, search_micro_batch: bool = True,
         gpu_memory: float | None = None, out_of_memory_at: dict[str, int] | None = None) -> Plan:
    """Predict every strategy for `spec` (resolved: num_processes set) on `hardware`; choose.

    With `search_micro_batch`, each strategy gets the largest micro-batch that divides the per-GPU
    share of the global batch and fits; the accumulation makes up the rest. Otherwise the spec's
    micro-batch is kept. `gpu_memory` (bytes) overrides the smallest detected GPU's memory.
    `out_of_memory_at` (strategy name -> micro-batch) holds what already ran out of memory on the
    GPUs: those strategies get only smaller micro-batches (the OOM fallback of --auto).
    """
    world = spec.cluster.num_processes or max(1, hardware.gpu_count) * spec.cluster.num_machines
    machines = spec.cluster.num_machines
    micro = spec.batch.micro_batch
    global_batch = spec.batch.global_batch or micro * spec.batch.accumulation(world) * world
    per_gpu = max(1, global_batch // world)
    if gpu_memory is None:
        gpu_memory = min((g.memory_total for g in hardware.gpus), default=0)
    lp = 4 if spec.precision == "fp32" else 2
    z = spec.zero
    nvme_path = spec.offload.optimizer.nvme_path or spec.offload.param.nvme_path
    shape = Shape(
        world=world, gpus_per_machine=max(1, world // machines), seq_len=spec.data.seq_len, lp=lp,
        # modeling.compile_regions compiles `model.model.layers` and the loss; GPT-2/NeoX models keep
        # their layers elsewhere and run eagerly whatever the spec says.
        compiled=spec.model.compile and model.family != "gpt", reduce_bucket=z.reduce_bucket_size, overlap_comm=z.overlap_comm,
        prefetch_bucket=z.stage3_prefetch_bucket_size or 50_000_000, gpu_memory=gpu_memory,
        cpu_memory=hardware.ram_total or None,
        nvme_free=hardware.disk_free.get(nvme_path) if nvme_path else None,
        precision=spec.precision, fp32_grad_accum=z.fp32_grad_accum, loss=spec.model.loss,
        fp8_recipe=spec.fp8.recipe if spec.precision == "fp8" else None,
    )
    tries = _micro_batches(per_gpu, micro, search_micro_batch)
    results: list[Strategy] = []
    oom = out_of_memory_at or {}
    for cand in candidates(nvme=bool(nvme_path)):
        allowed = [mb for mb in tries if mb < oom.get(cand.name, mb + 1)]
        est = None
        for mb in allowed:
            est = estimate(model, cand, mb, max(1, per_gpu // mb), shape)
            if est.fits:
                break
        if est is None:  # ran out of memory at the smallest micro-batch it may use
            smallest = oom[cand.name]
            est = replace(estimate(model, cand, smallest, max(1, per_gpu // smallest), shape), fits=False,
                          why_not=f"ran out of GPU memory at micro-batch {smallest}")
        results.append(est)
    # Fastest first; at equal speed the larger micro-batch, then stage order (ZeRO-1 before ZeRO-2).
    results.sort(key=lambda s: (-s.speed, -s.micro_batch if s.fits else 0))
    choice = next((s for s in results if s.fits), None)
    rejected = []
    for s in results:
        if s is choice:
            break
        rejected.append(f"{s.name}: {s.why_not}")
    requested = estimate(model, Candidate(z.stage, spec.offload.optimizer.device, spec.offload.param.device,
                                          spec.model.activation_checkpointing),
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
