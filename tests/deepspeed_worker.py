"""One rank of raw DeepSpeed ZeRO-2 training on CPU: ``DS_ACCELERATOR=cpu torchrun --nproc_per_node=2 THIS OUT``.

kvtune's chunked LoCoCo loss (compressors + LoRA) goes through a DeepSpeed engine: every chunk's backward but the
last of a sequence is outside the accumulation boundary, so one optimiser step covers the whole sequence. Rank 0
writes the trained tensors as the engine holds them (``live.pt``) and the losses; every rank writes its shard of
an adapter-only ZeRO checkpoint (``OUT/zero``, tag ``final``) for `kvtune.train.deepspeed` to consolidate.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
from conftest import tiny_llama
from peft import get_peft_model

from kvtune.lococo import LoCoCoConfig
from kvtune.train.module import chunked_losses, parameter_groups

BLOCK, CHUNKS, STEPS = 16, 3, 3
LR = (5e-2, 2.5e-4, 5e-3)  # compressor, embeddings and norms, LoRA
ADAPTER = LoCoCoConfig(mem_size=12, block_size=BLOCK, kernel_size=5, init_std=0.1, lora_r=4)


def adapted_model():
    torch.manual_seed(0)
    return get_peft_model(tiny_llama(layers=2), ADAPTER)


def main(out: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    model = adapted_model()
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 5e-2, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**6,
    }
    groups = parameter_groups(model, *LR)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    rank = torch.distributed.get_rank()
    generator = torch.Generator().manual_seed(100 + rank)  # each rank trains on its own sequences
    losses, done = [], [0]

    def backward(loss: torch.Tensor) -> None:
        done[0] += 1  # with LoRA on the projections every chunk has a trainable path
        engine.set_gradient_accumulation_boundary(done[0] % CHUNKS == 0)
        engine.backward(loss / CHUNKS, scale_wrt_gas=False)

    for _ in range(STEPS):
        ids = torch.randint(0, 97, (1, BLOCK * CHUNKS), generator=generator)
        losses.append(chunked_losses(engine.module, ids, BLOCK, buffer=4, backward=backward))
        engine.step()
    engine.save_checkpoint(str(out / "zero"), tag="final", exclude_frozen_parameters=True)
    if rank == 0:
        live = {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
        torch.save(live, out / "live.pt")
        (out / "losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
