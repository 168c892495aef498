"""kvtune's DeepSpeed code on CPU: raw ZeRO-2 on two ranks trains, and its checkpoint consolidates to an adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

pytest.importorskip("deepspeed", reason="pip install kvtune[deepspeed]")

from conftest import tiny_llama  # noqa: E402
from deepspeed_worker import BLOCK, CHUNKS, LR, STEPS, adapted_model  # noqa: E402

from kvtune.train.deepspeed import consolidate_adapter  # noqa: E402
from kvtune.train.module import chunked_losses, parameter_groups  # noqa: E402

WORKER = Path(__file__).with_name("deepspeed_worker.py")


@pytest.mark.slow
def test_raw_zero2_on_cpu_trains_and_exports_a_consolidated_adapter(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(WORKER.parent), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(WORKER), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert len(losses) == 3 and all(len(step) == CHUNKS for step in losses)
    live = torch.load(tmp_path / "live.pt")
    initial = dict(adapted_model().named_parameters())
    moved = [name for name, tensor in live.items() if not torch.equal(tensor, initial[name])]
    assert any("lococo_compressor" in n for n in moved) and any("lora_B" in n for n in moved)  # it trained
    # ZeRO-2 with per-chunk backward = one plain process averaging both ranks' sequences
    reference = adapted_model()
    optimizer = torch.optim.AdamW(parameter_groups(reference, *LR), weight_decay=0.0)
    generators = [torch.Generator().manual_seed(100 + rank) for rank in range(2)]
    for _ in range(STEPS):
        for generator in generators:
            ids = torch.randint(0, 97, (1, BLOCK * CHUNKS), generator=generator)
            chunked_losses(reference, ids, BLOCK, buffer=4, backward=lambda loss: (loss / (CHUNKS * 2)).backward())
        optimizer.step()
        optimizer.zero_grad()
    for name, parameter in reference.named_parameters():
        if name in live:
            assert torch.allclose(live[name], parameter, atol=1e-4), name

    out = consolidate_adapter(tmp_path / "zero", adapted_model(), tmp_path / "adapter", tag="final")
    reloaded = PeftModel.from_pretrained(tiny_llama(layers=2), out)
    trained = {n: p for n, p in reloaded.named_parameters() if "lococo_" in n or "lora_" in n}
    assert trained.keys() == live.keys()
    for name, tensor in live.items():  # the fp32 master copies merged from both ranks' shards = what the engine held
        assert torch.allclose(trained[name], tensor, atol=1e-6), name


def test_consolidation_refuses_a_checkpoint_of_another_adapter(tmp_path, monkeypatch):
    import kvtune.train.deepspeed as kvtune_deepspeed

    monkeypatch.setattr(kvtune_deepspeed, "trainable_state_from_zero", lambda *_: {"model.base_model.x": torch.ones(1)})
    with pytest.raises(ValueError, match="lacks"):
        consolidate_adapter(tmp_path, adapted_model(), tmp_path / "adapter")
