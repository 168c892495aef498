"""`ChunkedLM`: a Lightning module that trains KV compressors the way they are used, chunk by chunk.

Each sequence is fed ``block_size`` tokens at a time through kvtune's cache with the `lococo` method, so every chunk
attends to the fused memory plus itself; the loss (next-token cross-entropy, or distillation from the full-cache
model) is taken inside each chunk, and chunks are backpropagated one (or ``bptt_chunks``) at a time (manual
optimisation) so that memory stays flat whatever the sequence length. Validation reports what ``kvtune eval
task=perplexity`` reports: chunked perplexity of held-out windows, first chunk unscored (`kvtune.train.fit` also
scores the untrained compressor before the first step, ``val/ppl`` at step 0). Only the trainable adapters' tensors
go into checkpoints.
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

from kvtune.api import cache_kwargs, new_cache
from kvtune.eval.runner import chunked_nll
from kvtune.methods import build
from kvtune.validation import check_count, check_objective


def parameter_groups(
    model: nn.Module, lr_compressor: float, lr_embed_norm: float, lr_lora: float, lr_blend: float | None = None
) -> list[dict]:
    """The paper's optimiser groups: compressors, embeddings and norms, LoRA (only groups with trainable tensors).

    ``lr_blend`` gives the compressors' λ its own rate: one scalar per layer that Adam moves by about its rate per
    step, while the conv's rate is matched to its small initial weights (None: λ trains with the conv).
    """
    groups: dict[str, list[nn.Parameter]] = {"compressor": [], "blend": [], "embed_norm": [], "lora": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if "lococo_" in name:
            groups["blend" if lr_blend is not None and name.endswith(".blend") else "compressor"].append(parameter)
        elif "lora_" in name:
            groups["lora"].append(parameter)
        elif "embed" in name or "norm" in name:
            groups["embed_norm"].append(parameter)
        else:
            raise ValueError(f"trainable parameter {name!r} belongs to no optimiser group")
    rates = {"compressor": lr_compressor, "blend": lr_blend, "embed_norm": lr_embed_norm, "lora": lr_lora}
    return [{"params": p, "lr": rates[g], "name": g} for g, p in groups.items() if p]


def objective_parts(objective: str) -> set[str]:
    """``"distill+lm"`` -> ``{"distill", "lm"}``, checked."""
    check_objective(objective)
    return set(objective.split("+"))


def distillation_loss(
    student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_indices: torch.Tensor
) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) over the teacher's top-k tokens plus one bucket for the rest.

    ``student_logits`` is ``[..., vocab]``; the teacher is its top-k log-probabilities and their token ids
    (`teacher_targets`). Tokens the chunk predicts as well from its own text as the full cache does cost nothing:
    the loss is what the compressed memory loses against the uncompressed one. With k covering the vocabulary this
    is the full KL; with fewer it is the KL between the two distributions coarsened to (top k, everything else),
    which is zero exactly when the student matches the teacher there.
    """
    student = student_logits.float().log_softmax(dim=-1).gather(-1, teacher_indices)
    kl = (teacher_logprobs.exp() * (teacher_logprobs - student)).sum(dim=-1)
    teacher_rest, student_rest = _rest_logprob(teacher_logprobs), _rest_logprob(student)
    return (kl + teacher_rest.exp() * (teacher_rest - student_rest)).mean()


def _rest_logprob(top_logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum of the top-k probabilities): the log-mass of every other token (floored at log 1e-6)."""
    return torch.log(-torch.expm1(top_logprobs.logsumexp(dim=-1).clamp_max(-1e-6)))


def _teacher(model: nn.Module):
    """The frozen base model: PEFT's ``disable_adapter`` (LoRA, saved embeddings/norms off), or the model itself."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


def _positions(start: int, piece: torch.Tensor) -> torch.Tensor:
    """Absolute positions of a chunk that begins at ``start`` (``[B, len]``)."""
    return torch.arange(start, start + piece.shape[1], device=piece.device)[None].expand(piece.shape[0], -1)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None off glibc: musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Give the heap's freed pages back to the OS (glibc's ``malloc_trim``; nothing elsewhere).

    Called after the teacher's pass and after each backward. The teacher's large frees raise glibc's mmap threshold,
    so the student's tensors of a few MiB then live in the heap, which keeps their pages after they are freed: the
    process held ~800 MiB more at 8K tokens than at 4K with the distillation objective, though nothing alive grew.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _reshard(model: nn.Module) -> None:
    """Return FSDP2-sharded modules to their sharded state after the teacher's no-grad pass.

    Those forwards leave the root's parameters unsharded outside FSDP2's backward bookkeeping; the student's backward
    then fails to free them ("Trying to resize storage that is not resizable"). Nothing to do without FSDP2.
    """
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def teacher_targets(
    model: nn.Module, ids: torch.Tensor, block_size: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen base model's top-``top_k`` next-token log-probabilities and token ids at every position of ``ids``.

    One no-grad pass before the student's chunks, chunk by chunk through an uncompressed cache that is dropped when
    the pass ends. Training then holds only these k values per token (``[B, T, k]`` twice): the full-vocabulary
    logits of a 16K sequence would be 3 GiB, and a teacher kept in lockstep would hold its growing cache beside
    the student's graph. The pass itself is inference with a full cache, so it peaks at that cache's bytes.
    """
    cache = new_cache(model, None)
    logprobs, indices = [], []
    with torch.no_grad(), _teacher(model):
        for start in range(0, ids.shape[1], block_size):
            piece = ids[:, start : start + block_size]
            out = model(input_ids=piece, position_ids=_positions(start, piece), **cache_kwargs(model, cache))
            top = out.logits.float().log_softmax(dim=-1).topk(min(top_k, out.logits.shape[-1]), dim=-1)
            logprobs.append(top.values)
            indices.append(top.indices)
            del out
    _reshard(model)
    targets = torch.cat(logprobs, dim=1), torch.cat(indices, dim=1)
    del cache, logprobs, indices
    return_freed_memory()
    return targets


def chunked_losses(
    model: nn.Module,
    ids: torch.Tensor,
    block_size: int,
    buffer: int = 16,
    backward: Callable[[torch.Tensor], None] | None = None,
    objective: str = "lm",
    bptt_chunks: int = 1,
    distill_top_k: int = 128,
) -> list[float]:
    """Feed ``ids`` (``[B, T]``) ``block_size`` tokens at a time through a `lococo` cache; the loss of each chunk.

    ``objective``: ``lm`` is next-token cross-entropy inside each chunk (the paper's); ``distill`` is
    KL(teacher || student) against the frozen base model fed the same sequence through an uncompressed cache
    (`teacher_targets`, its top ``distill_top_k`` tokens per position, computed before the first chunk);
    ``distill+lm`` adds both. The first chunk attends to no memory and has no distillation term.

    With ``backward``, the summed loss of every ``bptt_chunks`` chunks is handed to it (Lightning's
    ``manual_backward``, DeepSpeed's ``engine.backward``, or ``Tensor.backward``) as soon as they are done, so the
    gradient runs through that many compressions while at most ``bptt_chunks`` chunks' graphs are alive: memory
    does not grow with the sequence. Chunks with no trainable tensor on their path are not backpropagated.
    """
    parts = objective_parts(objective)
    check_count("bptt_chunks")(bptt_chunks)
    check_count("distill_top_k")(distill_top_k)
    truncate = bptt_chunks == 1 or backward is None
    targets = teacher_targets(model, ids, block_size, distill_top_k) if "distill" in parts else None
    cache = new_cache(model, build("lococo", chunk=block_size, buffer=buffer, truncate=truncate))
    losses: list[float] = []
    pending: list[torch.Tensor] = []
    starts = range(0, ids.shape[1], block_size)
    for index, start in enumerate(starts):
        piece = ids[:, start : start + block_size]
        out = model(
            input_ids=piece, position_ids=_positions(start, piece), **cache_kwargs(model, cache), use_cache=True
        )
        logits = out.logits[:, :-1]
        loss = torch.zeros((), device=logits.device)
        if "lm" in parts:
            loss = loss + F.cross_entropy(logits.flatten(0, 1).float(), piece[:, 1:].flatten())
        if targets is not None and index > 0:
            stop = start + piece.shape[1] - 1
            loss = loss + distillation_loss(logits, targets[0][:, start:stop], targets[1][:, start:stop])
        losses.append(float(loss.detach()))
        if backward is None:
            continue
        if loss.requires_grad:
            pending.append(loss)
        if len(pending) == bptt_chunks or (pending and index == len(starts) - 1):
            backward(torch.stack(pending).sum())
            pending = []
            if not truncate:  # the graph is spent: the memory continues as a constant
                for layer in cache.layers:
                    layer.detach()
            return_freed_memory()
    return losses


def warmup_then_decay(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at step ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, 1.0 - (step - warmup) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class AdapterCheckpoints:
    """Mixin for kvtune's Lightning modules: checkpoints hold the trainable tensors only (the base stays frozen)."""

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by name: what checkpoints and exports hold."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = self.trainable_state()


class ChunkedLM(AdapterCheckpoints, LightningModule):
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
        objective: str = "lm",
        bptt_chunks: int = 1,
        warmup_steps: int = 0,
        lr_blend: float | None = None,
        distill_top_k: int = 128,
    ) -> None:
        super().__init__()
        objective_parts(objective)
        self.model, self.block_size, self.buffer = model, block_size, buffer
        self.rates = (lr_compressor, lr_embed_norm, lr_lora, lr_blend)
        self.accumulate, self.max_steps = accumulate, max_steps
        self.objective, self.bptt_chunks, self.warmup_steps = objective, bptt_chunks, warmup_steps
        self.distill_top_k = distill_top_k
        self.val_nlls: list[float] = []
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
        return chunked_losses(
            self.model,
            ids,
            self.block_size,
            self.buffer,
            backward,
            self.objective,
            self.bptt_chunks,
            self.distill_top_k,
        )

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
        """Chunked NLL of held-out windows, scored as `kvtune eval task=perplexity` does (first chunk left out)."""
        cache = new_cache(self.model, build("lococo", chunk=self.block_size, buffer=self.buffer))
        losses, _ = chunked_nll(self.model, cache, batch, self.block_size)
        self.val_nlls += losses[:, self.block_size - 1 :].mean(dim=1).tolist()

    def on_validation_epoch_end(self) -> None:
        if not self.val_nlls:
            return
        nll = sum(self.val_nlls) / len(self.val_nlls)
        self.val_nlls = []
        self.log("val/loss", nll, prog_bar=True)
        self.log("val/ppl", math.exp(nll))

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the paper's groups; linear warm-up over ``warmup_steps``, then linear decay to 0."""
        optimizer = torch.optim.AdamW(parameter_groups(self.model, *self.rates), weight_decay=0.0)
        return {"optimizer": optimizer, "lr_scheduler": warmup_then_decay(optimizer, self.warmup_steps, self.max_steps)}
