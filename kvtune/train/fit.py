"""`kvtune fit`: build the model with its adapters, the data and the Lightning trainer from a config, then train.

The config is data (`kvtune.config.FitConfig`, recipes under `recipes/`); this module turns it into objects.
Interrupting (Ctrl-C or SIGTERM) saves ``last.ckpt`` before exiting; ``ckpt_path=last`` resumes from it exactly
(optimiser, scheduler, RNG and the position inside the epoch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from omegaconf import DictConfig, OmegaConf
from peft import get_peft_model

from kvtune.lococo import LoCoCoConfig
from kvtune.models import load_model
from kvtune.train.data import TextDataModule
from kvtune.train.module import ChunkedLM

EMBED_NORM_MODULES = ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"]
TRAINABLE_SETS = ("compressor", "compressor+embed_norm")


def build_adapted_model(cfg: DictConfig):
    """Base model (frozen) with LoCoCo compressors (and embeddings/norms when asked) as a PEFT model."""
    method = cfg.method
    if method.trainable not in TRAINABLE_SETS:
        raise ValueError(f"method.trainable must be one of {TRAINABLE_SETS}, got {method.trainable!r}")
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
        buffer=method.buffer,
        position_interpolation=cfg.model.position_interpolation,
        modules_to_save=EMBED_NORM_MODULES if method.trainable == "compressor+embed_norm" else None,
    )
    return get_peft_model(model, config), tokenizer


def fit(cfg: DictConfig, output_dir: str | Path, callbacks: list[pl.Callback] | None = None) -> dict[str, Any]:
    """Train as ``cfg`` says; checkpoints and logs under ``output_dir``. Returns the final logged metrics.

    ``callbacks`` are added to the trainer's own (checkpointing every ``checkpoint_every`` steps and on
    interruption).
    """
    output_dir = Path(output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    model, tokenizer = build_adapted_model(cfg)
    data = TextDataModule(
        tokenizer,
        sequence_length=cfg.method.block_size * cfg.data.chunks,
        source=cfg.data.source,
        val_fraction=cfg.data.val_fraction,
        batch_size=cfg.data.batch_size,
        seed=cfg.seed,
        max_train_sequences=cfg.data.max_train_sequences,
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
    )
    checkpoints = output_dir / "checkpoints"
    callbacks = [
        ModelCheckpoint(dirpath=checkpoints, save_last=True, every_n_train_steps=cfg.checkpoint_every),
        OnExceptionCheckpoint(dirpath=checkpoints, filename="last"),
        *(callbacks or []),
    ]
    logger = instantiate(cfg.logger) if cfg.logger is not None else False
    strategy = instantiate(cfg.strategy) if isinstance(cfg.strategy, DictConfig) else cfg.strategy
    trainer = pl.Trainer(
        default_root_dir=output_dir, callbacks=callbacks, logger=logger, strategy=strategy, **trainer_kwargs
    )
    ckpt_path = cfg.ckpt_path
    if ckpt_path == "last":
        ckpt_path = str(checkpoints / "last.ckpt") if (checkpoints / "last.ckpt").is_file() else None
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        model.save_pretrained(output_dir / "adapter")
        record = {**OmegaConf.to_container(cfg, resolve=True), "recipe": _recipe_name()}
        (output_dir / "fit_config.json").write_text(json.dumps(record, indent=2))
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _recipe_name() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get("recipe") if HydraConfig.initialized() else None
