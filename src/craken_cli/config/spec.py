"""The run model: one Pydantic description of a training run.

Every file craken writes (DeepSpeed JSON, accelerate YAML, run.yaml, launch argv) is a view of a
`RunSpec`; no value is typed twice. Field descriptions are the only help text: `--help`, the JSON
Schema and docs/configuration.md all read them.

Values left as `None` (or "auto") are filled by `resolve.resolve()` from the detected hardware
before anything is rendered, so a rendered file never carries an "auto" that its consumer cannot
fill.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

Precision = Literal["bf16", "fp16", "fp32", "fp8", "auto"]
OffloadDevice = Literal["none", "cpu", "nvme"]


def _integral_float_to_int(value):
    # DeepSpeed JSONs write sizes as 5e8, which JSON and YAML read as floats.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# At most 2**50 elements: DeepSpeed keeps bucket sizes in C++ integers (1e40 overflowed inside the workers).
Count = Annotated[int, BeforeValidator(_integral_float_to_int), Field(le=2**50)]
# "auto": filled from the model's hidden size as the HF Trainer fills DeepSpeed's "auto" buckets.
PositiveAutoCount = Annotated[Annotated[int, Field(gt=0, le=2**50)] | Literal["auto"],
                              BeforeValidator(_integral_float_to_int)]
AutoCount = Annotated[Annotated[int, Field(ge=0, le=2**50)] | Literal["auto"], BeforeValidator(_integral_float_to_int)]

# The embedded defaults (train/builtin.py builds them; named here, where the lightest module can own them).
BUILTIN_MODEL = "builtin:tiny"
BUILTIN_DATA = "builtin:counting"


class CrossFieldProblems(ValueError):
    """Every cross-field problem of a spec. Pydantic keeps the exception it wraps, so
    `sources.format_validation_errors` reads the list itself, never a joined string split again."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))  # for display only; readers take .problems


# Stage-3-only settings (zero.*) and the value resolve fills for each one left unset (DeepSpeed's own
# defaults); setting one at stage 0-2 is a mistake DeepSpeed silently ignores.
STAGE3_DEFAULTS = {
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    "gather_16bit_weights_on_save": True,
}
# Those DeepSpeed reads under the same names in zero_optimization (the last one it calls
# stage3_gather_16bit_weights_on_model_save).
STAGE3_FIELDS = tuple(key for key in STAGE3_DEFAULTS if key.startswith("stage3_"))
# The zero.* buckets that may be "auto": filled from the model's hidden size (importers.hidden_size_buckets).
AUTO_BUCKETS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


class Section(BaseModel):
    # strict: "8" in a YAML file is a string, not a number; env values are YAML-parsed first.
    # allow_inf_nan off: an lr or eps of .inf trains nothing, and json writes it as Infinity (not JSON).
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, allow_inf_nan=False)


class ModelSection(Section):
    name_or_path: str = Field(
        BUILTIN_MODEL,
        description=f"Model to train: a hub id, a local folder with config.json, or '{BUILTIN_MODEL}' "
        "(a small Llama built from a config, no download).",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer hub id or folder; defaults to the model's own (built-in: trained locally)."
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with a hub repository. Only set this for code you trust."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to transformers."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about 30% more compute."
    )
    compile: bool = Field(
        False, description="torch.compile each decoder layer (regional compilation; GPU only, ~20 s once)."
    )
    compile_tuning: bool | None = Field(
        None, description="With compile: time each compiled kernel's block sizes on the GPU and keep the fastest "
        "(inductor's coordinate-descent tuning). Unset: on under --precision fp8 (about 4% faster steps at 3B, "
        "about 2 minutes more for the first compile), off otherwise (under 1% faster, about 1 minute more). "
        "Inductor caches the tuned kernels, so later runs of the same shapes start as fast as untuned ones."
    )
    loss: Literal["auto", "chunked", "model"] = Field(
        "auto", description="Training loss: 'chunked' computes the output layer and cross-entropy a few thousand "
        "tokens at a time and never holds the whole logits (Llama, Mistral, Qwen2/3); 'model' is the model's own "
        "loss; auto: chunked for vocabularies of 100,000 or more (Llama-3, Qwen) in eager runs, else the model's "
        "(compiled, it holds only the 16-bit logits and their gradient, and trains faster)."
    )


class DataSection(Section):
    dataset: str = Field(
        BUILTIN_DATA,
        description="Training text: a hub id, a local .json/.jsonl/.csv/.parquet/.txt file (also .gz/.bz2/.xz "
        "compressed) or folder of them, a folder datasets' save_to_disk wrote, "
        f"or '{BUILTIN_DATA}' (a generated pattern language, no download).",
    )
    text_column: str = Field("text", description="Column holding the text.")
    split: str = Field("train", description="Split to read: of a hub data set, of a saved DatasetDict, or of a folder "
                       "whose file names name splits (train.jsonl, test.jsonl; else all its files are 'train'); a "
                       "single local file is read whole.")
    seq_len: int = Field(128, gt=0, description="Tokens per training sequence (texts are packed into blocks).")
    eval_fraction: float = Field(
        0.05, ge=0, lt=0.5, description="Share of the training split's packed blocks held out for evaluation when "
        "the eval rows do not come from a split of their own (data.eval_split); 0 with eval_split none: no "
        "evaluation.")
    eval_split: str = Field(
        "auto", min_length=1, description="Where the evaluation rows come from. auto: the data's own validation "
        "split when it has one beside data.split (the first of validation, valid, val, dev, test, eval; a "
        "folder's files are named for splits as datasets names them: validation.jsonl, dev.jsonl, "
        "data/test-0.parquet, ...), else data.eval_fraction of the training rows; a split's name: that split, "
        "whole (up to data.max_samples records); none: data.eval_fraction of the training rows, whatever splits the data has.")
    max_samples: int | None = Field(
        None, gt=0, description="Read at most this many raw records of each split read (unset: all): the first N "
        "of data.split, and the first N of the eval split when the eval rows come from a split of their own "
        "(data.eval_split); else data.eval_fraction of the rows those N training records give is held out.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    format: Literal["auto", "text", "prompt_completion", "alpaca", "chat"] = Field(
        "auto", description="How records become training samples: 'text' (the text column, packed, every token "
        "trains), 'prompt_completion' (prompt/completion columns), 'alpaca' (instruction/input/output), 'chat' "
        "(a messages list of {role, content}, or ShareGPT's conversations list of {from, value}, rendered with the "
        "tokenizer's chat template); the supervised formats "
        "train only on the completion / output / assistant tokens. auto: from the columns found.")
    chat_template: str | None = Field(
        None, description="Jinja chat template for format 'chat', as text or the path of a file holding it "
        "(unset: the tokenizer's own).")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="A supervised sample longer than seq_len: cut to seq_len, or left out (counted "
        "and reported either way).")
    packing: bool = Field(
        True, description="Supervised samples: several per row, each with position ids starting at 0, so "
        "transformers' attention masks (sdpa, eager, flash_attention_2) keep a sample from attending to another; "
        "off: one sample per row, padded to seq_len.")
    num_proc: int | None = Field(
        None, gt=0, description="Processes that tokenize the data set (unset: every CPU core of the machine).")
    cache_dir: str | None = Field(
        None, description="Folder of the tokenized data cache, keyed by data files, tokenizer, format, template "
        "and seq_len, so a later launch reads instead of tokenizing (unset: $XDG_CACHE_HOME/craken/data, "
        "else ~/.cache/craken/data).")
    streaming: bool = Field(
        False, description="Read and tokenize the data while training (datasets' IterableDataset; accelerate gives "
        "each process its own files when there are at least as many files as processes, else every process reads "
        "all and keeps its own batches), for data larger than memory or disk; no cache, no evaluation.")


class BatchSection(Section):
    micro_batch: int | None = Field(
        4, gt=0, description="Sequences per GPU (process) per forward pass. Unset: global_batch / (grad_accum x "
        "processes), as DeepSpeed derives it from a file that states only train_batch_size.")
    grad_accum: int | None = Field(
        None, gt=0, description="Micro-batches accumulated per optimizer step (unset: from global_batch, else 8)."
    )
    global_batch: int | None = Field(
        None, gt=0, description="Sequences per optimizer step over all processes; must equal "
        "micro_batch x grad_accum x processes."
    )

    def accumulation(self, world_size: int) -> int:
        """Gradient accumulation for `world_size` processes: stated, derived from global_batch, or 8."""
        if self.grad_accum is not None:
            return self.grad_accum
        if self.global_batch is not None and self.micro_batch is not None:
            return max(1, self.global_batch // (self.micro_batch * world_size))
        return 1 if self.global_batch is not None else 8


class OptimizerSection(Section):
    lr: float = Field(3e-4, gt=0, description="Peak learning rate of AdamW.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    clip: float = Field(0.3, ge=0, description="Gradient clipping by global norm (0 disables).")
    fused: bool | None = Field(
        None, description="DeepSpeed's JIT-built FusedAdam CUDA op instead of torch's AdamW (unset: no; torch's "
        "AdamW uses its own fused kernel on GPU and needs no op to build)."
    )

    @model_validator(mode="after")
    def _betas_in_range(self) -> OptimizerSection:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must each be in [0, 1), got {list(self.betas)}")
        return self


class ScheduleSection(Section):
    kind: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up.")
    warmup_steps: int = Field(10, ge=0, description="Optimizer steps of linear warm-up from 0 to lr.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a share of lr (cosine).")


class TrainSection(Section):
    max_steps: int = Field(200, gt=0, description="Optimizer steps to train.")
    seed: int = Field(42, ge=0, lt=2**32, description="Seed for weights, data order and dropout.")
    eval_every: int = Field(50, ge=0, description="Evaluate every N optimizer steps (0: only at the end).")
    eval_batches: int = Field(8, gt=0, description="Micro-batches per evaluation and process.")
    save_every: int = Field(0, ge=0, description="Checkpoint every N optimizer steps (0: only at the end).")
    keep_checkpoints: int = Field(2, gt=0, description="Checkpoints kept; older ones are deleted.")
    save_final: bool = Field(
        True, description="Save a last checkpoint and the final/ model at the end (off: benchmarks, throwaway runs)."
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="On a NaN/Inf loss or gradient norm: stop with advice (checked every few steps and "
        "before every checkpoint), or skip the step (DeepSpeed's bf16 overflow check then drops it)."
    )


class ZeroSection(Section):
    stage: Literal[0, 1, 2, 3] = Field(1, description="ZeRO stage: 0 none, 1 optimizer, 2 +gradients, 3 +parameters.")
    overlap_comm: bool = Field(True, description="Overlap gradient reduction with the backward pass.")
    contiguous_gradients: bool = Field(True, description="Copy gradients into one buffer as they are produced.")
    reduce_bucket_size: PositiveAutoCount = Field(
        500_000_000, description="Elements reduced at once (auto: hidden_size squared, as the HF Trainer fills it).")
    allgather_bucket_size: Count = Field(500_000_000, ge=0, description="Elements gathered at once (stage 1-2).")
    fp32_grad_accum: bool | None = Field(
        None, description="Accumulate gradients in fp32 through DeepSpeed's BF16 optimizer: exact over any number "
        "of accumulation steps and faster on one GPU (docs/performance.md), for more "
        "memory: each GPU keeps the whole model's gradients in 16 and 32 bits (6 bytes per parameter, 6/N with the "
        "ZeRO optimizer; 1.3 GiB more for 1.1B on one GPU). ZeRO-1 with bf16 and no optimizer offload only. "
        "Unset: on with one process; with several it all-reduces fp32 gradients after the backward (4x the bytes of the 16-bit "
        "reduce-scatter, not overlapped), not measured on GPUs, so off."
    )
    stage3_prefetch_bucket_size: AutoCount | None = Field(
        None, description="Stage 3: parameter elements prefetched ahead (unset: 50M; auto: 0.9 x hidden_size "
        "squared, as the HF Trainer fills it)."
    )
    stage3_param_persistence_threshold: AutoCount | None = Field(
        None, description="Stage 3: parameters smaller than this stay unpartitioned (unset: 100k; auto: 10 x "
        "hidden_size, as the HF Trainer fills it)."
    )
    stage3_max_live_parameters: Count | None = Field(
        None, ge=0, description="Stage 3: parameter elements kept gathered at once (unset: 1e9)."
    )
    stage3_max_reuse_distance: Count | None = Field(
        None, ge=0, description="Stage 3: keep a parameter if reused within this many elements (unset: 1e9)."
    )
    gather_16bit_weights_on_save: bool | None = Field(
        None, description="Stage 3: gather full 16-bit weights when saving (unset: on at stage 3)."
    )


class OffloadTarget(Section):
    device: OffloadDevice = Field("none", description="Where they live: none (GPU), cpu or nvme.")
    nvme_path: str | None = Field(None, description="Folder on a fast local NVMe disk (required for nvme).")
    pin_memory: bool = Field(True, description="Page-locked CPU buffers: faster copies, more locked RAM.")


class OffloadSection(Section):
    optimizer: OffloadTarget = Field(
        default_factory=OffloadTarget, description="Optimizer states (stage 1-3)."
    )
    param: OffloadTarget = Field(default_factory=OffloadTarget, description="Parameters (stage 3 only).")


class LoggingSection(Section):
    steps_per_print: int = Field(10, gt=0, description="Print a plain log line every N optimizer steps.")
    wall_clock_breakdown: bool = Field(
        False, description="Profile: DeepSpeed prints forward/backward/step times and its samples/s every "
        "steps_per_print steps (device syncs every micro-step; off, DeepSpeed's throughput timer is off too)."
    )
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = Field(
        "none", description="Experiment tracker fed through Accelerate (install its package, e.g. "
        "pip install 'craken[tensorboard]'); TensorBoard writes to RUN/tensorboard/<name>/."
    )


class ClusterSection(Section):
    num_processes: int | None = Field(
        None, gt=0, description="Processes over all machines (unset: one per GPU found, or 2 on a CPU-only machine)."
    )
    num_machines: int = Field(1, gt=0, description="Machines taking part.")
    machine_rank: int = Field(0, ge=0, description="This machine's rank, 0 .. num_machines-1.")
    main_process_ip: str | None = Field(
        None, description="Address of the machine of rank 0 (required with several machines)."
    )
    main_process_port: int = Field(29500, gt=0, lt=65536, description="TCP port of the rendezvous on rank 0.")
    rdzv_backend: Literal["static", "c10d"] | None = Field(
        None, description="torchrun rendezvous backend (unset: static, or c10d with max_restarts, since a restarted "
        "static group reads its dead workers' stale addresses)."
    )
    launcher: Literal["accelerate", "deepspeed"] = Field(
        "accelerate", description="accelerate (torchrun) or DeepSpeed's hostfile launcher (pdsh + ssh)."
    )
    max_restarts: int = Field(0, ge=0, description="Restart a failed worker group this often, resuming.")
    use_cpu: bool | None = Field(None, description="Train on CPU processes (unset: when no GPU is found).")


class OutputSection(Section):
    name: str = Field("default", min_length=1, description="Run name; the run folder is runs/<name>.")
    dir: str | None = Field(None, description="Run folder (unset: runs/<name>).")

    def run_dir(self) -> str:
        return self.dir if self.dir is not None else f"runs/{self.name}"


class DeepSpeedSection(Section):
    extra: dict[str, Any] = Field(
        default_factory=dict, description="DeepSpeed keys craken does not model, written into ds_config.json as "
        "given: nested sections merge key by key into what craken renders, and \"auto\" is filled as the HF Trainer "
        "fills it. An optimizer block of DeepSpeed's Lamb, Lion, Adagrad, MuAdam, MuAdamW or MuSGD gets only the "
        "optimizer.* params it takes (no betas for Adagrad, no eps for Lion). `craken config import` keeps a file's "
        "other keys here (activation_checkpointing, tensor_parallel, zero_optimization.sub_group_size, fp16 loss "
        "scaling, its scheduler block, ...)."
    )

    @model_validator(mode="after")
    def _not_modeled(self) -> DeepSpeedSection:
        from .sources import flatten

        taken = [f"deepspeed.extra.{key} is craken's {DEEPSPEED_FIELDS[key]}: set that instead"
                 for key in flatten(self.extra) if key in DEEPSPEED_FIELDS]
        problems = taken + extra_shape_problems(self.extra)
        if problems:
            raise CrossFieldProblems(problems)
        return self

    def optimizer_type(self, raw: bool = False) -> str | None:
        """The optimizer type `extra` names, lower-cased as DeepSpeed matches its own names (None: none);
        `raw`: as written (DeepSpeed looks a name it does not know up in torch.optim as written)."""
        block = self.extra.get("optimizer")
        kind = block.get("type") if isinstance(block, dict) else None
        if not isinstance(kind, str):
            return None
        return kind if raw else kind.lower()


# The deepspeed.extra optimizer types (as DeepSpeed matches them, lower-cased) that restate craken's own
# optimizer: every param craken writes is theirs, and a script's own AdamW stands in for them.
ADAM_TYPES = ("adam", "adamw")

# The keys of deepspeed.extra DeepSpeed reads as sections, mappings of their own keys: its pydantic
# sub-configs and the blocks craken renders (merged over one of those, anything else would replace
# craken's values), and aio, which DeepSpeed reads key by key. DeepSpeed reads a null aio as its defaults.
# A scheduler block replaces craken's whole (train/schedule.run_block), so one that is no mapping would be
# dropped without a word.
DEEPSPEED_SECTIONS = ("zero_optimization", "zero_optimization.offload_optimizer", "zero_optimization.offload_param",
                      "bf16", "fp16", "optimizer", "optimizer.params", "scheduler", "data_types", "timers", "aio")
NULL_SECTIONS = ("aio",)
# deepspeed.extra's settings craken reads itself (plan.memory.SwapSettings), read as DeepSpeed reads them: its
# pydantic sections take a string or float of a whole number ("4", 4.0) as the number, and "auto" as the
# default; aio's number goes to its async_io op as given, so only a whole number works there.
SWAP_SETTINGS = {"zero_optimization.offload_optimizer.buffer_count": int,
                 "zero_optimization.offload_optimizer.pipeline_read": bool,
                 "zero_optimization.offload_optimizer.pipeline_write": bool,
                 "zero_optimization.offload_param.buffer_count": int,
                 "zero_optimization.offload_param.buffer_size": int,
                 "zero_optimization.offload_param.max_in_cpu": int,
                 "zero_optimization.sub_group_size": int}
AIO_SETTINGS = {"aio.intra_op_parallelism": int}


def extra_setting(value, key: str):
    """A setting of deepspeed.extra (SWAP_SETTINGS, AIO_SETTINGS) as DeepSpeed reads it; None for "auto"
    (DeepSpeed's default). Raises ValueError where DeepSpeed would refuse it."""
    if key in AIO_SETTINGS:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(key)
    if value == "auto":
        return None
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(SWAP_SETTINGS[key]).validate_python(value)  # lax, as DeepSpeed's models validate
    except ValidationError:
        raise ValueError(key) from None


def extra_shape_problems(extra: dict) -> list[str]:
    """deepspeed.extra's sections that are not mappings, and the settings craken reads that DeepSpeed would
    not take, each named with its key."""
    def stated(key: str):
        """(the key's value, whether extra states it), through parents that are mappings only."""
        *parents, leaf = key.split(".")
        node = extra
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        return (node[leaf], True) if isinstance(node, dict) and leaf in node else (None, False)

    problems = []
    for key in DEEPSPEED_SECTIONS:
        value, given = stated(key)
        if not given or isinstance(value, dict) or (value is None and key in NULL_SECTIONS):
            continue
        target = key.removeprefix("zero_optimization.offload_")
        off = f" (craken's offload.{target}.device none turns the offload off)" if target != key else ""
        problems.append(f"deepspeed.extra.{key} is {json.dumps(value, default=str)}: DeepSpeed reads {key} as a "
                        f"section, a mapping of its own keys: write it as one, or remove it{off}")
    for key, kind in {**SWAP_SETTINGS, **AIO_SETTINGS}.items():
        value, given = stated(key)
        try:
            if given:
                extra_setting(value, key)
        except ValueError:
            wanted = "true or false" if kind is bool else "a whole number"
            problems.append(f"deepspeed.extra.{key} is {json.dumps(value, default=str)}: DeepSpeed takes {wanted} "
                            "there: write one (without quotes), or remove it for DeepSpeed's default")
    return problems


# DeepSpeed JSON key -> the spec field render.deepspeed_config writes it from. The importer reads a
# file's value into that field; deepspeed.extra may not hold these keys (one place per value).
DEEPSPEED_FIELDS = {
    "train_micro_batch_size_per_gpu": "batch.micro_batch",
    "gradient_accumulation_steps": "batch.grad_accum",
    "train_batch_size": "batch.global_batch",
    "gradient_clipping": "optimizer.clip",
    "steps_per_print": "logging.steps_per_print",
    "wall_clock_breakdown": "logging.wall_clock_breakdown",
    "bf16.enabled": "precision",
    "fp16.enabled": "precision",
    "optimizer.params.lr": "optimizer.lr",
    "optimizer.params.betas": "optimizer.betas",
    "optimizer.params.eps": "optimizer.eps",
    "optimizer.params.weight_decay": "optimizer.weight_decay",
    "optimizer.params.torch_adam": "optimizer.fused",
    "data_types.grad_accum_dtype": "zero.fp32_grad_accum",
    "zero_optimization.stage": "zero.stage",
    "zero_optimization.overlap_comm": "zero.overlap_comm",
    "zero_optimization.contiguous_gradients": "zero.contiguous_gradients",
    "zero_optimization.reduce_bucket_size": "zero.reduce_bucket_size",
    "zero_optimization.allgather_bucket_size": "zero.allgather_bucket_size",
    **{f"zero_optimization.{key}": f"zero.{key}" for key in STAGE3_FIELDS},
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": "zero.gather_16bit_weights_on_save",
    **{f"zero_optimization.offload_{target}.{key}": f"offload.{target}.{key}"
       for target in ("optimizer", "param") for key in ("device", "nvme_path", "pin_memory")},
}


class Fp8Section(Section):
    recipe: Literal["tensorwise", "rowwise"] = Field(
        "tensorwise", description="torchao float8 scaling under --precision fp8: tensorwise (one scale per tensor; "
        "the faster) or rowwise (one per row; more accurate, slower: docs/performance.md)."
    )


class RunSpec(Section):
    """A whole training run."""

    version: Literal[1] = Field(1, description="Version of this file format.")
    precision: Precision = Field(
        "auto", description="bf16, fp16, fp32, fp8 (float8 matmuls through torchao on GPUs of compute capability "
        ">= 8.9, the rest bf16; pip install 'craken[fp8]'), or auto (bf16 where the GPU has it)."
    )
    model: ModelSection = Field(default_factory=ModelSection, description="What is trained.")
    data: DataSection = Field(default_factory=DataSection, description="What it is trained on.")
    batch: BatchSection = Field(default_factory=BatchSection, description="Batch sizes.")
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection, description="AdamW and clipping.")
    schedule: ScheduleSection = Field(default_factory=ScheduleSection, description="Learning-rate schedule.")
    train: TrainSection = Field(default_factory=TrainSection, description="Length, evaluation, checkpoints.")
    fp8: Fp8Section = Field(default_factory=Fp8Section, description="FP8 training (precision fp8).")
    zero: ZeroSection = Field(default_factory=ZeroSection, description="DeepSpeed ZeRO.")
    offload: OffloadSection = Field(default_factory=OffloadSection, description="CPU/NVMe offload.")
    logging: LoggingSection = Field(default_factory=LoggingSection, description="Logging.")
    cluster: ClusterSection = Field(default_factory=ClusterSection, description="Processes and machines.")
    output: OutputSection = Field(default_factory=OutputSection, description="Where results go.")
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection, description="DeepSpeed keys beyond these.")

    # Cross-field rules: each message names the setting to change. They raise ValueError, which
    # pydantic collects; `sources.build_spec` turns all of them into one report.
    @model_validator(mode="after")
    def _cross_field(self) -> RunSpec:
        problems = cross_field_problems(self)
        if problems:
            raise CrossFieldProblems(problems)
        return self

    @property
    def uses_deepspeed(self) -> bool:
        """ZeRO stage 0 on GPUs runs without DeepSpeed: plain Accelerate (bf16 autocast, DDP) with torch's
        fused AdamW, measured faster than DeepSpeed's stage 0/1 on one GPU (docs/performance.md). CPU
        processes keep DeepSpeed at every stage (its gloo path is the one that runs several processes)."""
        return self.zero.stage > 0 or self.cluster.use_cpu is not False

    @property
    def base_precision(self) -> str:
        """The precision of everything FP8 does not convert, as DeepSpeed and Accelerate are told it:
        bf16 under fp8 (autocast, 16-bit weights at ZeRO-1/2), else the precision itself."""
        return base_precision(self.precision)

    @property
    def fp32_grad_accum(self) -> bool:
        """Whether DeepSpeed accumulates gradients in fp32 (its BF16 optimizer); needs a resolved precision."""
        return fp32_grad_accum_on(self.zero.fp32_grad_accum, self.zero.stage, self.base_precision,
                                  self.offload.optimizer.device, self.world_size)

    @property
    def world_size(self) -> int:
        if self.cluster.num_processes is None:
            raise RuntimeError("num_processes is unresolved; call resolve.resolve() first")
        return self.cluster.num_processes

    @property
    def grad_accum(self) -> int:
        return self.batch.accumulation(self.world_size)

    @property
    def train_batch_size(self) -> int:
        return self.batch.micro_batch * self.grad_accum * self.world_size


def base_precision(precision: str) -> str:
    """fp8 trains its non-converted compute in bf16; the other precisions are their own."""
    return "bf16" if precision == "fp8" else precision


def fp32_grad_accum_possible(stage: int, precision: str, offload_optimizer: str) -> bool:
    """Where DeepSpeed 0.19 runs fp32 gradient accumulation through its BF16 optimizer (engine
    `_do_optimizer_sanity_check`): ZeRO-1, bf16 weights, optimizer states on the GPU. Elsewhere the
    setting would reach the ZeRO optimizer's fp32-gradient path, which craken has not measured."""
    return stage == 1 and precision == "bf16" and offload_optimizer == "none"


def fp32_grad_accum_on(setting: bool | None, stage: int, precision: str, offload_optimizer: str, world: int) -> bool:
    """zero.fp32_grad_accum as it applies to one strategy: the user's setting where DeepSpeed can use it,
    else on with one process, the only process count it was measured faster with."""
    possible = fp32_grad_accum_possible(stage, precision, offload_optimizer)
    return possible and (world == 1 if setting is None else setting)


def cross_field_problems(spec: RunSpec) -> list[str]:
    """Every cross-field inconsistency, each phrased as what to change."""
    out: list[str] = []
    zero, offload, batch, cluster = spec.zero, spec.offload, spec.batch, spec.cluster
    for name, target in (("optimizer", offload.optimizer), ("param", offload.param)):
        if target.device == "nvme" and not target.nvme_path:
            out.append(f"offload.{name}.device is nvme but offload.{name}.nvme_path is empty: set --nvme-path DIR")
        if target.device != "nvme" and target.nvme_path:
            out.append(f"offload.{name}.nvme_path is set but offload.{name}.device is {target.device}: "
                       f"use --offload-{name} nvme or drop the path")
    if offload.param.device != "none" and zero.stage != 3:
        out.append(f"parameter offload needs ZeRO stage 3, got stage {zero.stage}: "
                   "use --zero 3 or --offload-param none")
    if offload.optimizer.device != "none" and zero.stage == 0:
        out.append("optimizer offload needs ZeRO stage 1, 2 or 3: use --zero 1/2/3 or --offload-optimizer none")
    if zero.stage != 3:
        set_s3 = [f for f in STAGE3_DEFAULTS if getattr(zero, f) is not None]
        if set_s3:
            out.append(f"zero.{', zero.'.join(set_s3)} only apply at ZeRO stage 3 (stage is {zero.stage}): "
                       "remove them or use --zero 3")
    if zero.fp32_grad_accum and not fp32_grad_accum_possible(zero.stage, "bf16" if spec.precision == "auto" else
                                                           spec.base_precision, offload.optimizer.device):
        out.append(f"zero.fp32_grad_accum needs ZeRO-1 with bf16 and no optimizer offload (stage {zero.stage}, "
                   f"precision {spec.precision}, optimizer offload {offload.optimizer.device}): use --zero 1, "
                   "--precision bf16 and --offload-optimizer none, or drop zero.fp32_grad_accum")
    data = spec.data
    if data.eval_split == data.split:
        out.append(f"data.eval_split {data.eval_split} is the training split (data.split): set data.eval_split to "
                   "another split, or to auto or none")
    if data.streaming and data.eval_split not in ("auto", "none"):
        out.append(f"data.eval_split {data.eval_split}: a --streaming run does not evaluate: drop data.eval_split, "
                   "or train without --streaming")
    if spec.precision == "fp8":
        out += fp8_layout_problems(zero.stage, offload.optimizer.device, offload.param.device)
    if spec.schedule.kind == "linear" and spec.schedule.warmup_steps == 0:
        out.append("schedule.kind linear with schedule.warmup_steps 0 would never decay (DeepSpeed's WarmupDecayLR "
                   "decays to the lr its warm-up starts from): set schedule.warmup_steps to 1 or more, or use "
                   "schedule.kind cosine or constant")
    if cluster.max_restarts and cluster.rdzv_backend == "static":
        out.append("restarts (--max-restarts) need the c10d rendezvous: a restarted static group reads stale "
                   "addresses of its dead workers; use --rdzv-backend c10d or leave it unset")
    if cluster.machine_rank >= cluster.num_machines:
        out.append(f"cluster.machine_rank {cluster.machine_rank} must be below num_machines {cluster.num_machines}: "
                   "fix --machine-rank")
    if cluster.num_machines > 1 and not cluster.main_process_ip:
        out.append("several machines need the address of rank 0: set --main-process-ip")
    if batch.micro_batch is None and batch.global_batch is None:
        out.append("batch.micro_batch is empty and no global batch derives it: set --micro-batch N or --global-batch N")
    if cluster.num_processes is not None:
        if cluster.num_processes % cluster.num_machines:
            out.append(f"cluster.num_processes {cluster.num_processes} (total) is not a multiple of num_machines "
                       f"{cluster.num_machines}: fix --num-processes")
        if batch.global_batch is not None and batch.micro_batch is not None:
            per_step = batch.micro_batch * cluster.num_processes
            if batch.grad_accum is None and batch.global_batch % per_step:
                out.append(f"global batch {batch.global_batch} is not a multiple of micro_batch {batch.micro_batch} x "
                           f"{cluster.num_processes} processes = {per_step}: change --global-batch or --micro-batch")
            elif batch.grad_accum is not None and batch.global_batch != per_step * batch.grad_accum:
                out.append(f"global batch {batch.global_batch} != micro_batch {batch.micro_batch} x grad_accum "
                           f"{batch.grad_accum} x {cluster.num_processes} processes = {per_step * batch.grad_accum}: "
                           "drop one of --global-batch/--grad-accum or make them agree"
                           + agreeing_processes(batch.global_batch, batch.micro_batch * batch.grad_accum))
    return out


def agreeing_processes(global_batch: int, per_process: int) -> str:
    """The other way out, where one exists: the process count the three batch values were written for (a
    DeepSpeed JSON of a 1-GPU run, read on a machine that detects 2)."""
    if global_batch % per_process:
        return ""
    return f", or run it on --num-processes {global_batch // per_process}"


def fp8_layout_problems(stage: int, offload_optimizer: str, offload_param: str) -> list[str]:
    """Where craken runs FP8 training: no ZeRO and ZeRO-1/2 on the GPU. ZeRO-3 gathers each weight in
    hooks around the module that torchao's float8 Linear replaces, and offload steps the weights on the
    CPU: neither has run with float8 matmuls."""
    out = []
    if stage == 3:
        out.append("precision fp8 runs without ZeRO or at ZeRO-1/2, not at ZeRO-3 (its partitioned weights, gathered "
                   "around each float8 Linear, have not been run with it): use --zero 0/1/2 or --precision bf16")
    if offload_optimizer != "none" or offload_param != "none":
        out.append("precision fp8 keeps the optimizer on the GPU (offload, which steps the weights on the CPU, has not "
                   "been run with float8 matmuls): use --offload-optimizer none --offload-param none or "
                   "--precision bf16")
    return out
