"""`kvtune fit` end to end on the embedded model at toy sizes: it trains, resumes exactly, and saves adapters."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch import Callback
from peft import PeftModel
from safetensors.torch import load_file

import kvtune
from kvtune.cli import CONF_DIR
from kvtune.eval.runner import chunked_nll
from kvtune.train.export import export
from kvtune.train.fit import fit

TOY = [
    "recipe=quickstart",
    "method.block_size=32",
    "method.mem_size=16",
    "method.kernel_size=5",
    "method.local_len=4",
    "data.chunks=3",
    "data.max_train_sequences=16",
    "optim.accumulate=1",
    "trainer.val_check_interval=100",
    "trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
    "checkpoint_every=1",
    "~logger",
]


class CtrlC(Callback):
    """Presses Ctrl-C once ``at_step`` optimiser steps are done."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.at_step:
            raise KeyboardInterrupt


class Keep(Callback):
    """Keeps the trained model of a run (what the trainer held, before anything was saved or reloaded)."""

    def on_train_end(self, trainer, module) -> None:
        self.model = module.model.eval()


# a fresh process: load the exported folder onto the embedded model and score ids through the lococo cache
FRESH_PROCESS = """
import sys, torch, kvtune
from kvtune.eval.runner import chunked_nll
model = kvtune.load_adapter(kvtune.load_model("embedded")[0], sys.argv[1])
cache = kvtune.new_cache(model, kvtune.methods.build("lococo", chunk=32))
torch.save(chunked_nll(model, cache, torch.load(sys.argv[2]), chunk=32)[0], sys.argv[3])
"""


def _config(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="fit", overrides=[*TOY, f"output_dir={tmp_path}", *overrides])


def _adapter(folder):
    return load_file(folder / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_adapter_and_exports_it_exactly(tmp_path):
    keep = Keep()
    fit(_config(tmp_path / "straight", "trainer.max_steps=6"), tmp_path / "straight", callbacks=[keep])
    # the same 6-step schedule, stopped after 3 steps and resumed from its last checkpoint
    with pytest.raises(SystemExit):  # Lightning shuts down gracefully, then exits with status 1
        fit(_config(tmp_path / "resumed", "trainer.max_steps=6"), tmp_path / "resumed", callbacks=[CtrlC(at_step=3)])
    assert (tmp_path / "resumed" / "checkpoints" / "interrupted.ckpt").is_file()
    with pytest.raises(FileExistsError, match="ckpt_path=last"):  # never trained into afresh by accident
        fit(_config(tmp_path / "resumed", "trainer.max_steps=6"), tmp_path / "resumed")
    fit(_config(tmp_path / "resumed", "trainer.max_steps=6", "ckpt_path=last"), tmp_path / "resumed")
    assert (tmp_path / "straight" / "checkpoints" / "last.ckpt").is_file()  # a finished run keeps its last state
    straight, resumed = _adapter(tmp_path / "straight"), _adapter(tmp_path / "resumed")
    assert straight.keys() == resumed.keys() and straight
    for name in straight:
        assert torch.allclose(straight[name], resumed[name], atol=1e-6), name
    initial = PeftModel.from_pretrained(kvtune.load_model("embedded")[0], tmp_path / "straight" / "adapter")
    assert any("lococo_compressor" in n for n, _ in initial.named_parameters())

    # round trip: export, load in a fresh process, identical per-token losses through the compressed cache
    exported = export(tmp_path / "straight", tmp_path / "exported")
    assert "kvtune.load_adapter" in (exported / "README.md").read_text()
    ids = torch.randint(0, 1000, (1, 160), generator=torch.Generator().manual_seed(5))
    torch.save(ids, tmp_path / "ids.pt")
    command = [sys.executable, "-c", FRESH_PROCESS, str(exported), str(tmp_path / "ids.pt"), str(tmp_path / "nll.pt")]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    with torch.no_grad():
        here = chunked_nll(keep.model, kvtune.new_cache(keep.model, kvtune.methods.build("lococo", chunk=32)), ids, 32)
    assert torch.equal(torch.load(tmp_path / "nll.pt"), here[0])


@pytest.mark.slow
def test_ddp_and_fsdp2_on_two_processes_match_one_process_with_double_accumulation(tmp_path):
    toy = [o for o in TOY if o != "optim.accumulate=1"] + ["trainer.max_steps=3"]
    runs = {
        "ddp": ["strategy=ddp", "trainer.devices=2", "optim.accumulate=1"],
        "fsdp2": ["strategy=fsdp2", "trainer.devices=2", "optim.accumulate=1"],
        "single": ["trainer.devices=1", "optim.accumulate=2"],
    }
    for name, extra in runs.items():
        command = [sys.executable, "-m", "kvtune.cli", "fit", *toy, *extra, f"hydra.run.dir={tmp_path / name}"]
        subprocess.run(command, check=True, capture_output=True, cwd=tmp_path, timeout=600)
    single = _adapter(tmp_path / "single")
    for strategy in ("ddp", "fsdp2"):
        sharded = _adapter(tmp_path / strategy)
        assert sharded.keys() == single.keys() and single
        # gradients averaged across ranks vs accumulated in one: equal up to float rounding, which Adam enlarges on
        # near-zero conv gradients (seen: 2e-4); a rank's gradients missing would move λ's logit by ~lr (5e-2) a step
        for name in single:
            assert torch.allclose(sharded[name], single[name], atol=2e-3), (strategy, name)
    blends = [float(v) for k, v in single.items() if k.endswith("blend")]
    assert blends and all(abs(b - math.log(0.01 / 0.99)) > 1e-3 for b in blends)  # it really trained (θ = logit λ)
