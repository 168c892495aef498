"""How far training moved a LoCoCo adapter: λ per layer and the conv weights' spread, against the recipe's start.

    python scripts/lococo_adapter_stats.py outputs/quickstart/trained/adapter [more adapters ...]

λ (the weight of the conv's soft distributions against the one-hot picks) bounds what the conv can change in the
fused slots: a slot's mixing weights move by at most λ in total variation, whatever the conv learns. One JSON row
per adapter: λ (min, mean, max over layers) and the conv weights' standard deviation (mean over layers).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def adapter_stats(folder: str | Path) -> dict:
    """λ and conv-weight spread of the LoCoCo adapter saved in ``folder`` (PEFT's safetensors file)."""
    import torch
    from safetensors.torch import load_file

    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    tensors = load_file(str(Path(folder) / "adapter_model.safetensors"))
    raw = torch.cat([v.flatten().float() for k, v in sorted(tensors.items()) if k.endswith(".blend")])
    lambdas = torch.sigmoid(raw) if config.get("blend") == "sigmoid" else raw
    stds = [float(v.float().std()) for k, v in tensors.items() if k.endswith("conv.weight")]
    return {
        "adapter": str(folder),
        "blend": config.get("blend", "linear"),
        "lambda_min": float(lambdas.min()),
        "lambda_mean": float(lambdas.mean()),
        "lambda_max": float(lambdas.max()),
        "conv_weight_std": sum(stds) / len(stds),
        "init_std": config.get("init_std"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", nargs="+")
    for folder in parser.parse_args().adapters:
        print(json.dumps(adapter_stats(folder)))


if __name__ == "__main__":
    main()
