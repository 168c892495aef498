"""Structured configs (registered with Hydra's ConfigStore, so a misspelt key fails loudly)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


def wandb_offline() -> bool:
    """W&B stays offline (runs synced later with `wandb sync`) unless a key is set or WANDB_MODE=online."""
    return not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online")


OmegaConf.register_new_resolver("kvtune_wandb_offline", wandb_offline, replace=True)


@dataclass
class GenerateConfig:
    """`kvtune generate`: answer a question about a (long) context with a compressed KV cache."""

    model: str = "embedded"
    dtype: str = "float32"
    method: str = "full"
    budget: int | None = None
    ratio: float | None = None
    context: str | None = None
    context_file: str | None = None
    question: str = ""
    questions_file: str | None = None  # one question per line: the context is compressed once, each answered
    answer_prefix: str = ""
    max_new_tokens: int = 32
    question_aware: bool = False
    chat_template: bool = False
    prefill_chunk: int | None = None
    method_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """`kvtune eval`: one (task, method, budget) per job; sweep them with Hydra's multirun (``-m``)."""

    model: str = "embedded"
    dtype: str = "float32"
    adapter: str | None = None  # a saved adapter (PEFT folder or Hub id) applied first, e.g. for method=lococo
    label: str | None = None  # the name tables and plots give this row (default: the method)
    task: dict[str, Any] = field(default_factory=lambda: {"name": "passkey"})
    method: str = "full"
    budget: int | None = None
    ratio: float | None = None
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    context_length: int = 4096
    samples: int = 20
    seed: int = 0
    batch_size: int = 1  # samples prefilled together; raise it on GPUs (on CPU batching is not faster)
    question_aware: bool = False
    max_new_tokens: int | None = None
    results_dir: str | None = None  # results only (rows, samples, table, plot); default: the run or sweep directory
    logger: Any = None  # a Lightning logger config from conf/logger (csv, wandb)


@dataclass
class BenchConfig:
    """`kvtune bench`: speed and memory of methods x budgets x context lengths x batch sizes, against `full`."""

    model: str = "embedded"
    dtype: str = "float32"
    methods: list[str] = field(default_factory=lambda: ["full", "streaming_llm", "snapkv", "adakv_snapkv"])
    budgets: list[int] = field(default_factory=lambda: [512])
    context_lengths: list[int] = field(default_factory=lambda: [4096])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    decode_tokens: int = 32
    prefill_chunks: list[int | None] = field(default_factory=lambda: [None])  # null: one-shot prefill
    decode_intervals: list[int] = field(default_factory=lambda: [1])  # steps per eviction while decoding (1: each)
    hybrid: list[str] = field(default_factory=list)  # LightTransfer layer plans (`kvtune calibrate`): a row each
    output: str = "bench.json"


@dataclass
class FitModelConfig:
    name: str = "embedded"  # Hub id, local directory, or the embedded SmolLM2
    dtype: str = "float32"
    position_interpolation: float = 1.0  # linear RoPE scaling factor (context extension: target length / trained)


@dataclass
class LoCoCoMethodConfig:
    """LoCoCo's hyperparameters (`kvtune.lococo.LoCoCoConfig`) and which parameters train."""

    name: str = "lococo"
    mem_size: int = 128
    block_size: int = 512
    keep_rate: float = 0.5
    kernel_size: int = 21
    lambda_init: float = 0.5
    init_std: float = 1.0
    local_len: int = 0  # most recent entries always kept verbatim (the official code's local_len)
    blend: str = (
        "linear"  # λ parametrisation: "linear" (the official raw λ) or "sigmoid" (λ = σ(θ), θ from lambda_init)
    )
    normalize_scores: bool = False  # rank entries by attention per query that could see them (not column sums)
    score_window: int = 0  # 0: rank by column sums of the chunk; W: by the chunk's last W queries (TOVA's score: 1)
    score_heads: str = "layer"  # with score_window: average the votes over the layer's heads, or each KV group
    objective: str = "lm"  # "lm" (next-token CE, the paper's), "distill" (KL to the full-cache model), "distill+lm"
    distill_top_k: int = 128  # the teacher's top-k log-probs kept per token (plus the rest's mass): flat memory
    buffer: int = 16
    trainable: str = "compressor"  # "+"-joined parts of {compressor, embed_norm, lora}; compressor is required
    lora_r: int = 8  # LoRA on q/k/v/o when trainable includes lora (the paper's extension recipe: r=8, alpha=16)
    lora_alpha: int = 16
    lora_layer_modules: list[str] = field(default_factory=list)  # with lora: decoder-layer linears too (mlp.up_proj)


@dataclass
class FitDataConfig:
    source: str = "stdlib_train"  # the offline training corpus (held out from eval's); a text file/folder; hf:NAME
    chunks: int = 8  # P: chunks per training sequence (sequence length = block_size * chunks)
    val_fraction: float = 0.1
    batch_size: int = 1
    max_train_sequences: int | None = None  # that many windows at seeded random offsets (None: every consecutive one)
    val_length: int | None = None  # validation windows' tokens (the evaluation length); None: the training length
    val_source: str | None = None  # held-out documents of this source validate (None: the training source's)


@dataclass
class OptimConfig:
    lr_compressor: float = 5e-2
    lr_embed_norm: float = 2.5e-4
    lr_lora: float = 5e-5
    lr_blend: float | None = None  # the compressors' λ on its own rate (None: with the conv, as the paper)
    accumulate: int = 1  # sequences per optimiser step
    warmup_steps: int = 0  # linear warm-up, then linear decay to 0 at max_steps (the paper: no warm-up)
    bptt_chunks: int = 1  # chunks backpropagated together: gradient through that many compressions (1: the paper's)
    gradient_checkpointing: bool = False


@dataclass
class LightTransferFitConfig:
    """`kvtune fit` of a LightTransfer hybrid (section ``lighttransfer``): the plan's lazy layers attend to sinks +
    a sliding window while LoRA trains; ``sinks=0`` trains a pure sliding window that `kvtune export --hybrid` can
    write as a standard transformers checkpoint."""

    plan: str | None = None  # a `kvtune calibrate` plan (its lazy layers); None: calibrate at the start of the fit
    lazy_fraction: float = 0.5  # used when calibrating here
    window: int = 256  # a lazy layer's query sees keys at distance < window (transformers' sliding_window)
    sinks: int = 4  # first tokens every lazy layer also sees; 0 = exportable sliding window
    calibration_sequences: int = 8
    sequence_length: int = 2048  # training sequence length (tokens)
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lr: float = 2e-4
    warmup_steps: int = 0


@dataclass
class CalibrateConfig:
    """`kvtune calibrate`: per-layer lazy ratios over a corpus -> a layer plan (JSON) and its plot (PNG)."""

    model: str = "embedded"
    dtype: str = "float32"
    lazy_fraction: float = 0.5
    window: int = 256
    sinks: int = 4
    source: str = "stdlib_train"  # the offline training corpus (held out from evaluation), a text file/folder
    sequence_length: int = 2048
    sequences: int = 8
    last_queries: int = 32
    output: str = "${hydra:runtime.output_dir}/plan.json"
    plot: str | None = "${hydra:runtime.output_dir}/plan.png"


@dataclass
class FitConfig:
    """`kvtune fit`: train KV compressors (recipes under recipes/, selected with recipe=NAME)."""

    model: FitModelConfig = field(default_factory=FitModelConfig)
    method: LoCoCoMethodConfig = field(default_factory=LoCoCoMethodConfig)
    data: FitDataConfig = field(default_factory=FitDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: dict[str, Any] = field(default_factory=dict)  # keyword arguments of lightning.pytorch.Trainer
    strategy: Any = "auto"  # a Lightning strategy name or a _target_ config (conf/strategy/)
    logger: Any = None  # a Lightning logger config (conf/logger/)
    seed: int = 0
    checkpoint_every: int = 50
    ckpt_path: str | None = None  # "last" resumes from the run directory's last checkpoint
    output_dir: str = "${hydra:runtime.output_dir}"
    lighttransfer: LightTransferFitConfig | None = None  # set (recipe lighttransfer_*): train a hybrid, not LoCoCo


store = ConfigStore.instance()
store.store(name="generate_schema", node=GenerateConfig)
store.store(name="eval_schema", node=EvalConfig)
store.store(name="bench_schema", node=BenchConfig)
store.store(name="fit_schema", node=FitConfig)
store.store(name="calibrate_schema", node=CalibrateConfig)
