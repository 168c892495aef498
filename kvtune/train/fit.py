"""`kvtune fit`: build the model with its adapters, the data and the Lightning trainer from a config, then train.

The config is data (`kvtune.config.FitConfig`, recipes under `recipes/`); this module turns it into objects.
Checkpoints (adapters only) go to ``RUN/checkpoints``: ``last.ckpt`` every ``checkpoint_every`` steps and
``interrupted.ckpt`` when Ctrl-C or SIGTERM stops the run. ``ckpt_path=last`` resumes from the newer of the two
exactly (optimiser, scheduler, RNG and the position inside the epoch). A run directory that already holds
checkpoints is never trained into afresh by accident: resume it or pick another directory.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvtune.lococo import LoCoCoConfig
from kvtune.models import load_model
from kvtune.train.data import TextDataModule
from kvtune.train.deepspeed import save_adapter, zero_stage_3
from kvtune.train.module import ChunkedLM

EMBED_NORM_MODULES = ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"]
TRAINABLE_PARTS = ("compressor", "embed_norm", "lora")


def trainable_parts(spec: str) -> set[str]:
    """``"compressor+embed_norm+lora"`` -> its parts, checked: the compressor always trains."""
    parts = set(spec.split("+"))
    if "compressor" not in parts or not parts <= set(TRAINABLE_PARTS):
        raise ValueError(
            f"method.trainable must join parts of {TRAINABLE_PARTS} with '+', compressor included; got {spec!r}"
        )
    return parts


def build_adapted_model(
    cfg: DictConfig, model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """Base model (frozen) with LoCoCo compressors, plus embeddings/norms and LoRA when asked, as a PEFT model.

    ``model``/``tokenizer`` replace loading ``cfg.model.name`` (tests pass a tiny model built in-process).
    """
    method = cfg.method
    parts = trainable_parts(method.trainable)
    if model is None:
        model, tokenizer = load_model(
            cfg.model.name, dtype=cfg.model.dtype, position_interpolation=cfg.model.position_interpolation
        )
    config = LoCoCoConfig(
        mem_size=method.mem_size,
        block_size=method.block_size,
        keep_rate=method.keep_rate,
        kernel_size=method.kernel_size,
        lambda_init=method.lambda_init,
        init_std=method.init_std,
        local_len=method.local_len,
        blend=method.blend,
        normalize_scores=method.normalize_scores,
        score_window=method.score_window,
        score_heads=method.score_heads,
        buffer=method.buffer,
        position_interpolation=cfg.model.position_interpolation,
        lora_r=method.lora_r if "lora" in parts else 0,
        lora_alpha=method.lora_alpha,
        lora_layer_modules=list(method.lora_layer_modules),
        modules_to_save=EMBED_NORM_MODULES if "embed_norm" in parts else None,
    )
    return get_peft_model(model, config), tokenizer


def fit(
    cfg: DictConfig,
    output_dir: str | Path,
    callbacks: list[pl.Callback] | None = None,
    base_model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, Any]:
    """Train as ``cfg`` says; checkpoints and logs under ``output_dir``. Returns the final logged metrics.

    ``callbacks`` are added to the trainer's own (checkpointing every ``checkpoint_every`` steps and on
    interruption); ``base_model``/``tokenizer`` replace loading ``cfg.model.name``.
    """
    output_dir = Path(output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    model, tokenizer = build_adapted_model(cfg, base_model, tokenizer)
    data = TextDataModule(
        tokenizer,
        sequence_length=cfg.method.block_size * cfg.data.chunks,
        source=cfg.data.source,
        val_fraction=cfg.data.val_fraction,
        batch_size=cfg.data.batch_size,
        seed=cfg.seed,
        max_train_sequences=cfg.data.max_train_sequences,
        val_length=cfg.data.val_length,
        val_source=cfg.data.val_source,
    )
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    module = ChunkedLM(
        model,
        block_size=cfg.method.block_size,
        buffer=cfg.method.buffer,
        lr_compressor=cfg.optim.lr_compressor,
        lr_embed_norm=cfg.optim.lr_embed_norm,
        lr_lora=cfg.optim.lr_lora,
        accumulate=cfg.optim.accumulate,
        max_steps=trainer_kwargs.get("max_steps", -1) if trainer_kwargs.get("max_steps", -1) > 0 else 1000,
        gradient_checkpointing=cfg.optim.gradient_checkpointing,
        objective=cfg.method.objective,
        bptt_chunks=cfg.optim.bptt_chunks,
        warmup_steps=cfg.optim.warmup_steps,
        lr_blend=cfg.optim.lr_blend,
        distill_top_k=cfg.method.distill_top_k,
    )
    trainer, metrics = train_and_save(cfg, output_dir, model, module, data, trainer_kwargs, callbacks)
    if trainer.is_global_zero:
        write_run_record(cfg, output_dir, metrics)
    return metrics


def build_trainer(
    cfg: DictConfig, output_dir: Path, trainer_kwargs: dict[str, Any], callbacks: list[pl.Callback] | None = None
) -> tuple[pl.Trainer, str | None]:
    """The Lightning trainer every kvtune run uses (checkpoints every ``checkpoint_every`` steps and on
    interruption, the configured logger and strategy), and the checkpoint to resume from."""
    checkpoints = output_dir / "checkpoints"
    ckpt_path = resume_path(checkpoints, cfg.ckpt_path)
    callbacks = [
        ModelCheckpoint(dirpath=checkpoints, save_last=True, every_n_train_steps=cfg.checkpoint_every),
        # its own name: Lightning deletes this file when a run ends normally, which must not take last.ckpt along
        OnExceptionCheckpoint(dirpath=checkpoints, filename="interrupted"),
        *(callbacks or []),
    ]
    logger = instantiate(cfg.logger) if cfg.logger is not None else False
    strategy = instantiate(cfg.strategy) if isinstance(cfg.strategy, DictConfig) else cfg.strategy
    trainer = pl.Trainer(
        default_root_dir=output_dir, callbacks=callbacks, logger=logger, strategy=strategy, **trainer_kwargs
    )
    return trainer, ckpt_path


def train_and_save(
    cfg: DictConfig,
    output_dir: Path,
    model: PeftModel,
    module: pl.LightningModule,
    data: pl.LightningDataModule,
    trainer_kwargs: dict[str, Any],
    callbacks: list[pl.Callback] | None = None,
) -> tuple[pl.Trainer, dict[str, float]]:
    """What every kvtune fit does: the step-0 validation, training (resumed from the run's checkpoint if any), then
    the adapter saved under ``output_dir/adapter`` (gathered first under ZeRO-3). Returns the trainer and the final
    metrics."""
    trainer, ckpt_path = build_trainer(cfg, output_dir, trainer_kwargs, callbacks)
    validate_untrained(trainer, module, data, ckpt_path)
    with warnings.catch_warnings():  # the frozen base model is in eval mode on purpose (no dropout while adapting)
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    save_adapter(model, output_dir / "adapter", trainer.is_global_zero, gather=zero_stage_3(trainer.strategy))
    return trainer, metrics


def validate_untrained(
    trainer: pl.Trainer, module: pl.LightningModule, data: pl.LightningDataModule, ckpt_path: str | None
) -> None:
    """The validation curve's step 0, the untrained model, on a fresh run: one process only (a multi-process
    strategy would launch its ranks here, before fit), not in a fast_dev_run smoke check."""
    if ckpt_path is None and trainer.limit_val_batches != 0 and trainer.world_size == 1 and not trainer.fast_dev_run:
        trainer.validate(module, datamodule=data, verbose=False)


def write_run_record(cfg: DictConfig, output_dir: Path, metrics: dict[str, float]) -> None:
    """The resolved config (with the recipe's name) and the final metrics, beside the adapter."""
    record = {**OmegaConf.to_container(cfg, resolve=True), "recipe": _recipe_name()}
    (output_dir / "fit_config.json").write_text(json.dumps(record, indent=2))
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))


def resume_path(checkpoints: Path, ckpt_path: str | None) -> str | None:
    """The checkpoint to resume from: ``"last"`` is the newest in ``checkpoints`` (None when there is none).

    Without ``ckpt_path``, Lightning would quietly resume from an interruption checkpoint it finds; kvtune refuses a
    run directory with checkpoints instead, so that nothing is resumed or overwritten without being asked.
    """
    existing = sorted(checkpoints.glob("*.ckpt"), key=lambda path: path.stat().st_mtime)
    if ckpt_path == "last":
        return str(existing[-1]) if existing else None
    if ckpt_path is None and existing:
        raise FileExistsError(
            f"{checkpoints} already holds checkpoints: resume with ckpt_path=last, or train afresh in another "
            "run directory (hydra.run.dir=...)"
        )
    return ckpt_path


def _recipe_name() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get("recipe") if HydraConfig.initialized() else None
