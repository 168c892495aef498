"""Lightning's GPU-only strategies on a toy LoCoCo run: each trains and leaves a loadable, trained adapter.

Lightning's DeepSpeedStrategy and FSDP1 refuse CPUs, so these run only where CUDA exists (``-m gpu``); on CPU the
same code paths are covered by the DDP test (tests/test_fit.py) and raw DeepSpeed ZeRO-2 (tests/test_deepspeed.py).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_fit import TOY

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3", "fsdp", "fsdp2"])
def test_strategy_trains_and_saves_the_adapter(strategy, tmp_path):
    devices = min(2, torch.cuda.device_count())
    overrides = [*TOY, "trainer=gpu", f"trainer.devices={devices}", "trainer.max_steps=3", f"strategy={strategy}"]
    command = [sys.executable, "-m", "kvtune.cli", "fit", *overrides, f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    blends = [float(v) for k, v in adapter.items() if k.endswith("blend")]
    assert blends and all(b != 0.0 for b in blends)  # gathered (ZeRO-3 placeholders are empty) and trained (λ₀ = 0)
