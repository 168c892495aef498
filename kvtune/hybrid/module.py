"""`HybridLM`: a Lightning module that fine-tunes a LightTransfer hybrid on whole long sequences.

Unlike LoCoCo (`kvtune.train.module.ChunkedLM`), a hybrid needs no cache while training: the plan's lazy layers
attend through the ``kvtune_hybrid`` backend's sliding window (with sinks), the others fully, over the whole
sequence in one forward, exactly as they will at inference. ``use_cache=False`` keeps transformers from building a
cache in training. Only the trainable tensors (LoRA) go into checkpoints.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn

from kvtune.train.module import AdapterCheckpoints, warmup_then_decay


class HybridLM(AdapterCheckpoints, LightningModule):
    """Frozen base model with LoRA, its lazy layers streaming; next-token loss over full sequences."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 2e-4,
        accumulate: int = 1,
        max_steps: int = 100,
        warmup_steps: int = 0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.lr, self.max_steps, self.warmup_steps = model, lr, max_steps, warmup_steps
        self.accumulate = accumulate
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the trainable tensors only
        if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._tick = time.perf_counter()

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch, use_cache=False).loss

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.manual_backward(loss / self.accumulate)
        datamodule = self.trainer.datamodule
        if datamodule is not None:
            datamodule.consumed += batch.shape[0]
        if (batch_idx + 1) % self.accumulate == 0:
            optimizer, scheduler = self.optimizers(), self.lr_schedulers()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        now = time.perf_counter()
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log("train/tokens_per_s", batch.numel() / max(now - self._tick, 1e-9))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        self._tick = now
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        if self.trainer.datamodule is not None:
            self.trainer.datamodule.consumed = 0

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss = float(self.loss(batch))
        self.log("val/loss", loss, prog_bar=True, batch_size=batch.shape[0])
        self.log("val/ppl", math.exp(loss), batch_size=batch.shape[0])

    def configure_optimizers(self) -> dict[str, Any]:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=self.lr, weight_decay=0.0)
        return {"optimizer": optimizer, "lr_scheduler": warmup_then_decay(optimizer, self.warmup_steps, self.max_steps)}
