"""`ChunkedLM`: a Lightning module that trains KV compressors the way they are used, chunk by chunk.

Each sequence is fed ``block_size`` tokens at a time through kvtune's cache with the `lococo` method, so every chunk
attends to the fused memory plus itself; the loss is next-token cross-entropy inside each chunk, and each chunk is
backpropagated on its own (manual optimisation) so that memory stays flat whatever the sequence length. Only the
trainable adapters' tensors go into checkpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

from kvtune.api import cache_kwargs, new_cache
from kvtune.methods import build


def parameter_groups(model: nn.Module, lr_compressor: float, lr_embed_norm: float, lr_lora: float) -> list[dict]:
    """The paper's optimiser groups: compressors, embeddings and norms, LoRA (only groups with trainable tensors)."""
    groups: dict[str, list[nn.Parameter]] = {"compressor": [], "embed_norm": [], "lora": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if "lococo_" in name:
            groups["compressor"].append(parameter)
        elif "lora_" in name:
            groups["lora"].append(parameter)
        elif "embed" in name or "norm" in name:
            groups["embed_norm"].append(parameter)
        else:
            raise ValueError(f"trainable parameter {name!r} belongs to no optimiser group")
    rates = {"compressor": lr_compressor, "embed_norm": lr_embed_norm, "lora": lr_lora}
    return [{"params": p, "lr": rates[g], "name": g} for g, p in groups.items() if p]


def chunked_losses(
    model: nn.Module,
    ids: torch.Tensor,
    block_size: int,
    buffer: int = 16,
    backward: Callable[[torch.Tensor], None] | None = None,
) -> list[float]:
    """Feed ``ids`` (``[B, T]``) ``block_size`` tokens at a time through a `lococo` cache; mean loss per chunk.

    With ``backward``, each chunk's loss is handed to it as soon as the chunk is done (Lightning's
    ``manual_backward``, DeepSpeed's ``engine.backward``, or ``Tensor.backward``), so that at most one chunk's graph
    is alive: memory does not grow with the sequence. Chunks before the first compression have no trainable tensor
    on their path (without LoRA) and are not backpropagated.
    """
    cache = new_cache(model, build("lococo", chunk=block_size, buffer=buffer))
    losses = []
    for start in range(0, ids.shape[1], block_size):
        piece = ids[:, start : start + block_size]
        positions = torch.arange(start, start + piece.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
        out = model(input_ids=piece, position_ids=positions, **cache_kwargs(model, cache), use_cache=True)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), piece[:, 1:].flatten())
        if backward is not None and loss.requires_grad:
            backward(loss)
        losses.append(float(loss.detach()))
    return losses


class ChunkedLM(LightningModule):
    """Frozen base model plus trainable adapters, trained and validated with chunked compression."""

    def __init__(
        self,
        model: nn.Module,
        block_size: int,
        buffer: int = 16,
        lr_compressor: float = 5e-2,
        lr_embed_norm: float = 2.5e-4,
        lr_lora: float = 5e-5,
        accumulate: int = 1,
        max_steps: int = 100,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.block_size, self.buffer = model, block_size, buffer
        self.rates = (lr_compressor, lr_embed_norm, lr_lora)
        self.accumulate, self.max_steps = accumulate, max_steps
        self.automatic_optimization = False
        self.replicated: list[nn.Parameter] = []  # adapters FSDP2 leaves whole (configure_model)
        self.strict_loading = False  # checkpoints hold the adapters only
        if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._tick = time.perf_counter()

    def chunk_losses(self, ids: torch.Tensor, train: bool) -> list[float]:
        """Mean loss per chunk of ``ids`` (``[B, T]``); in training each chunk's loss is backpropagated at once."""
        scale = 1.0 / (math.ceil(ids.shape[1] / self.block_size) * self.accumulate)
        backward = (lambda loss: self.manual_backward(loss * scale)) if train else None
        return chunked_losses(self.model, ids, self.block_size, self.buffer, backward)

    def configure_model(self) -> None:
        """FSDP2 (``strategy=fsdp2``): shard the frozen base weights per decoder layer; keep the adapters whole.

        The fused memory carries gradient from one chunk's forward into the next chunk's backward, by which time
        FSDP2 has resharded the layer that made it: sharded compressor weights would be read after their storage
        was freed. Trainable tensors are therefore left out of sharding (they are small) and their gradients are
        averaged across ranks before each optimiser step, as DDP would.
        """
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        self.replicated = [p for p in self.model.parameters() if p.requires_grad]
        data_parallel, ignored = mesh["data_parallel"], set(self.replicated)
        for layer in self.model.get_base_model().get_decoder().layers:
            fully_shard(layer, mesh=data_parallel, ignored_params=ignored)
        fully_shard(self.model, mesh=data_parallel, ignored_params=ignored)

    def average_replicated_gradients(self) -> None:
        """Mean of the unsharded adapters' gradients over ranks (gloo has no AVG: sum, then divide)."""
        world = torch.distributed.get_world_size()
        for parameter in self.replicated:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            torch.distributed.all_reduce(parameter.grad)
            parameter.grad /= world

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        losses = self.chunk_losses(batch, train=True)
        datamodule = self.trainer.datamodule
        if datamodule is not None:
            datamodule.consumed += batch.shape[0]
        if (batch_idx + 1) % self.accumulate == 0:
            optimizer, scheduler = self.optimizers(), self.lr_schedulers()
            if self.replicated:
                self.average_replicated_gradients()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        now = time.perf_counter()
        tokens_per_second = batch.numel() / max(now - self._tick, 1e-9)
        self._tick = now
        self.log("train/loss", sum(losses) / len(losses), prog_bar=True)
        self.log("train/tokens_per_s", tokens_per_second)
        for group in self.optimizers().param_groups:
            self.log(f"train/lr_{group['name']}", group["lr"])

    def on_train_epoch_end(self) -> None:
        if self.trainer.datamodule is not None:
            self.trainer.datamodule.consumed = 0

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        with torch.no_grad():
            losses = self.chunk_losses(batch, train=False)
        loss = sum(losses) / len(losses)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch.shape[0])
        self.log("val/ppl", math.exp(loss), batch_size=batch.shape[0])

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(parameter_groups(self.model, *self.rates), weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / self.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by name: what checkpoints and exports hold."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = self.trainable_state()
