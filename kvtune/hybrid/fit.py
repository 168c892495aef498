"""`kvtune fit` with a ``lighttransfer`` section: LoRA fine-tuning of a LightTransfer hybrid.

The same stack as LoCoCo's fit (`kvtune.train.fit`): Hydra config, the resumable `TextDataModule`, Lightning's
trainer with the ``strategy``/``logger`` groups, adapter-only checkpoints every ``checkpoint_every`` steps and on
interruption, ``ckpt_path=last`` for exact resume. The run directory also holds ``plan.json``: the plan the run
trained with (its lazy layers, and the config's window and sinks), which inference and `kvtune export --hybrid`
read back.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvtune.hybrid.attention import apply_plan
from kvtune.hybrid.calibrate import calibrate
from kvtune.hybrid.module import HybridLM
from kvtune.hybrid.plan import PLAN_FILE, LayerPlan
from kvtune.models import load_model
from kvtune.train.data import TextDataModule
from kvtune.train.fit import train_and_save, write_run_record


def training_plan(cfg: DictConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> LayerPlan:
    """The plan's lazy layers (loaded, or calibrated now on the training corpus) with the config's window/sinks."""
    hybrid = cfg.lighttransfer
    if hybrid.plan is not None:
        plan = LayerPlan.load(hybrid.plan)
        plan.check_model(model, cfg.model.name)
    else:
        plan = calibrate(
            model,
            tokenizer,
            cfg.model.name,
            lazy_fraction=hybrid.lazy_fraction,
            window=hybrid.window,
            sinks=hybrid.sinks,
            source=cfg.data.source,
            sequence_length=hybrid.sequence_length,
            sequences=hybrid.calibration_sequences,
        )
    return dataclasses.replace(plan, window=hybrid.window, sinks=hybrid.sinks)


def build_hybrid_model(
    cfg: DictConfig, model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[PeftModel, PreTrainedTokenizerBase, LayerPlan]:
    """Base model (frozen) with LoRA on ``target_modules``, its lazy layers switched to streaming attention."""
    hybrid = cfg.lighttransfer
    if model is None:
        model, tokenizer = load_model(cfg.model.name, dtype=cfg.model.dtype)
    plan = training_plan(cfg, model, tokenizer)
    lora = LoraConfig(
        r=hybrid.lora_r, lora_alpha=hybrid.lora_alpha, target_modules=list(hybrid.target_modules), lora_dropout=0.0
    )
    peft_model = get_peft_model(model, lora)
    apply_plan(peft_model, plan)
    return peft_model, tokenizer, plan


def fit_hybrid(
    cfg: DictConfig,
    output_dir: str | Path,
    callbacks: list[pl.Callback] | None = None,
    base_model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, Any]:
    """Train the hybrid as ``cfg`` says; checkpoints, adapter and plan under ``output_dir``. Returns the metrics."""
    output_dir = Path(output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    model, tokenizer, plan = build_hybrid_model(cfg, base_model, tokenizer)
    data = TextDataModule(
        tokenizer,
        sequence_length=cfg.lighttransfer.sequence_length,
        source=cfg.data.source,
        val_fraction=cfg.data.val_fraction,
        batch_size=cfg.data.batch_size,
        seed=cfg.seed,
        max_train_sequences=cfg.data.max_train_sequences,
    )
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    max_steps = trainer_kwargs.get("max_steps", -1)
    module = HybridLM(
        model,
        lr=cfg.lighttransfer.lr,
        accumulate=cfg.optim.accumulate,
        max_steps=max_steps if max_steps > 0 else 1000,
        warmup_steps=cfg.lighttransfer.warmup_steps,
        gradient_checkpointing=cfg.optim.gradient_checkpointing,
    )
    trainer, metrics = train_and_save(cfg, output_dir, model, module, data, trainer_kwargs, callbacks)
    if trainer.is_global_zero:
        plan.save(output_dir / PLAN_FILE)
        plan.save(output_dir / "adapter" / PLAN_FILE)  # the adapter folder is self-contained: `load_hybrid` reads both
        write_run_record(cfg, output_dir, metrics)
    return metrics
