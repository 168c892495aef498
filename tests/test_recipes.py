"""Recipes: they compose into checked configs, print resolved, and the 32K recipe trains on a tiny Llama-2 shape."""

from __future__ import annotations

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import kvtune
from kvtune.cli import CONF_DIR
from kvtune.train.fit import fit


def _compose(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="fit", overrides=list(overrides))


def test_32k_recipe_prints_its_resolved_config(kvtune_cli):
    status, out, _ = kvtune_cli(["fit", "recipe=lococo_llama2_32k", "--cfg", "job"])
    assert status == 0
    job = yaml.safe_load(out)
    assert job["model"] == {"name": "meta-llama/Llama-2-7b-hf", "dtype": "bfloat16", "position_interpolation": 8.0}
    assert job["method"]["mem_size"] == 512 and job["method"]["block_size"] == 512
    assert job["method"]["block_size"] * job["data"]["chunks"] == 32768
    assert job["method"]["trainable"] == "compressor+embed_norm+lora" and job["method"]["lora_r"] == 8
    assert job["strategy"]["_target_"] == "lightning.pytorch.strategies.DeepSpeedStrategy"
    assert job["strategy"]["stage"] == 2 and job["strategy"]["exclude_frozen_parameters"]
    assert job["trainer"]["devices"] == 8 and job["logger"]["_target_"].endswith("WandbLogger")


def test_inference_recipe_keeps_128_slots_and_trains_the_compressor_only():
    cfg = _compose("recipe=lococo_llama2_inference_128")
    assert (cfg.method.mem_size, cfg.method.trainable, cfg.model.position_interpolation) == (128, "compressor", 1.0)
    assert cfg.strategy._target_.endswith("DDPStrategy")


@pytest.mark.parametrize("override", ["method.mem_sise=64", "recipe=no_such_recipe", "strategy=zero9"])
def test_bad_keys_and_names_fail_loudly(override):
    with pytest.raises(ConfigCompositionException):
        _compose("recipe=quickstart", override)


def _tiny_llama2(cfg, tokenizer) -> LlamaForCausalLM:
    """Llama-2's shape (multi-head attention, head_dim 128, 4K trained context, the recipe's PI), tiny in depth."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "linear", "factor": cfg.model.position_interpolation, "rope_theta": 10000.0},
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.slow
def test_32k_recipe_fast_dev_run_on_a_tiny_llama2(tmp_path):
    # the recipe as written, but on this machine's hardware: CPU trainer, one process, no W&B, the offline corpus
    cfg = _compose(
        "recipe=lococo_llama2_32k",
        "trainer=cpu",
        "strategy=auto",
        "~logger",
        "data.source=stdlib_train",
        "data.val_fraction=0.3",
        "+trainer.fast_dev_run=true",
        "trainer.devices=1",  # the recipe asks for 8 devices: one CPU process here
        "optim.accumulate=1",  # fast_dev_run feeds one sequence: let it make the optimiser step
        f"output_dir={tmp_path}",
    )
    tokenizer = kvtune.models.load_tokenizer("embedded")
    model = _tiny_llama2(cfg, tokenizer)
    metrics = fit(cfg, tmp_path, base_model=model, tokenizer=tokenizer)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for part in ("lococo_compressor", "lora_A", "lora_B", "embed_tokens", "input_layernorm"):
        assert any(part in name for name in saved), part
    # one optimiser step moved every trainable group away from its initial value
    assert all(abs(float(v) - 0.5) > 1e-4 for k, v in saved.items() if k.endswith("blend"))
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k)  # LoRA B starts at zero


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("ddp", "DDPStrategy"),
        ("fsdp", "FSDPStrategy"),
        ("fsdp2", "ModelParallelStrategy"),
        ("deepspeed_zero2", "DeepSpeedStrategy"),
        ("deepspeed_zero3", "DeepSpeedStrategy"),
        ("deepspeed_zero3_offload", "DeepSpeedStrategy"),
    ],
)
def test_every_strategy_config_builds_its_lightning_strategy(strategy, expected):
    from hydra.utils import instantiate

    built = instantiate(_compose("recipe=quickstart", f"strategy={strategy}", "trainer.devices=2").strategy)
    assert type(built).__name__ == expected
    if strategy.startswith("deepspeed"):
        assert built.exclude_frozen_parameters  # adapter-only checkpoints
        assert built.zero_stage_3 == strategy.startswith("deepspeed_zero3")
    if expected == "DeepSpeedStrategy" and built.zero_stage_3:
        assert built.config["zero_optimization"]["stage3_param_persistence_threshold"] >= 2_000_000
