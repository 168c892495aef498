"""`kvtune export --hybrid RUN OUT`: a trained sink-free hybrid as a standard checkpoint that stock transformers serves.

Llama-family weights load unchanged into transformers' Ministral architecture, which is Llama without attention
biases plus per-layer ``layer_types`` (``sliding_attention`` / ``full_attention``) and one ``sliding_window``. The
plan's lazy layers become sliding layers with ``sliding_window = plan.window`` (same semantics as kvtune's hybrid:
a query sees keys at distance ``< window``); LoRA is merged into the weights. Attention sinks have no equivalent
in serving engines, so only a sink-free plan (``sinks=0``) exports.
"""

from __future__ import annotations

import json
from pathlib import Path

from peft import PeftModel
from transformers import MinistralConfig, MinistralForCausalLM, PreTrainedModel

from kvtune.hybrid.plan import PLAN_FILE, LayerPlan
from kvtune.models import EMBEDDED, load_model, load_tokenizer
from kvtune.train.export import EMBEDDED_ORIGIN

WEIGHT_COMPATIBLE = ("llama", "mistral", "ministral")
COPIED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
)


def hybrid_config(config, plan: LayerPlan) -> MinistralConfig:
    """A Ministral config with the base model's shapes and the plan's per-layer attention types."""
    if plan.sinks:
        raise ValueError(
            f"the plan keeps {plan.sinks} attention sinks, which transformers, vLLM and SGLang cannot serve; "
            "train with lighttransfer.sinks=0 to export a standard checkpoint"
        )
    if config.model_type not in WEIGHT_COMPATIBLE:
        raise NotImplementedError(
            f"export --hybrid maps Llama-family weights onto Ministral; {config.model_type!r} is not one of "
            f"{WEIGHT_COMPATIBLE}"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise NotImplementedError("the base model has attention or MLP biases, which Ministral does not hold")
    fields = {name: getattr(config, name) for name in COPIED_FIELDS if getattr(config, name, None) is not None}
    fields.setdefault("head_dim", config.hidden_size // config.num_attention_heads)
    return MinistralConfig(**fields, sliding_window=plan.window, layer_types=plan.layer_types)


def to_hybrid_model(model: PreTrainedModel, plan: LayerPlan) -> MinistralForCausalLM:
    """The same weights (LoRA already merged) in a Ministral model whose lazy layers are sliding layers."""
    plan.check_model(model)
    hybrid = MinistralForCausalLM(hybrid_config(model.config, plan)).to(model.dtype)
    hybrid.load_state_dict(model.state_dict(), strict=True)
    hybrid.generation_config = model.generation_config
    return hybrid.eval()


def export_hybrid(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge the run's LoRA into its base model and write a transformers folder with a model card."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    for needed in (PLAN_FILE, "fit_config.json", "adapter/adapter_config.json"):
        if not (run_dir / needed).is_file():
            raise FileNotFoundError(f"{run_dir} is not a finished hybrid run ({needed} missing)")
    plan = LayerPlan.load(run_dir / PLAN_FILE)
    config = json.loads((run_dir / "fit_config.json").read_text())
    name, dtype = config["model"]["name"], config["model"].get("dtype", "float32")
    if plan.sinks:
        hybrid_config(None, plan)  # raises the sink error before the model loads
    base, _ = load_model(name, dtype=dtype)
    merged = PeftModel.from_pretrained(base, run_dir / "adapter").merge_and_unload()
    hybrid = to_hybrid_model(merged, plan)
    out_dir.mkdir(parents=True, exist_ok=True)
    hybrid.save_pretrained(out_dir)
    load_tokenizer(name).save_pretrained(out_dir)
    plan.save(out_dir / PLAN_FILE)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    measured_path = run_dir / "measured.json"
    measured = json.loads(measured_path.read_text()) if measured_path.is_file() else {}
    (out_dir / "README.md").write_text(model_card(name, config, plan, metrics, measured))
    return out_dir


def model_card(name: str, config: dict, plan: LayerPlan, metrics: dict, measured: dict) -> str:
    """Markdown card: base model, the plan, training, measured numbers, loading with plain transformers."""
    base = EMBEDDED_ORIGIN if name == EMBEDDED else name
    hybrid = config.get("lighttransfer", {})
    full = plan.num_layers - len(plan.lazy_layers)
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {base}",
        "tags: [kvtune, lighttransfer, hybrid-attention, sliding-window, kv-cache-compression]",
        "---",
        "",
        "# LightTransfer hybrid (kvtune)",
        "",
        f"`{base}` fine-tuned with kvtune into a hybrid: {len(plan.lazy_layers)} of {plan.num_layers} layers attend "
        f"to a sliding window of {plan.window} tokens (`sliding_attention`), {full} keep full attention. The "
        "sliding layers' KV cache stays at the window, so decoding holds "
        f"{full / plan.num_layers:.0%} of a full cache plus {len(plan.lazy_layers)} x {plan.window - 1} entries.",
        "",
        "## Layer plan",
        "",
        f"- sliding layers: {list(plan.lazy_layers)}",
        f"- window: {plan.window} (a query sees keys at distance < {plan.window}); sinks: {plan.sinks}",
        f"- calibrated on: {plan.data}",
        f"- lazy ratio per layer: {[round(s, 3) for s in plan.scores]}",
        "",
        "## Training",
        "",
        f"- LoRA r={hybrid.get('lora_r', '?')}, alpha={hybrid.get('lora_alpha', '?')} on "
        f"{hybrid.get('target_modules', '?')}, merged into the weights",
        f"- sequences of {hybrid.get('sequence_length', '?')} tokens from `{config.get('data', {}).get('source')}`, "
        f"{config.get('trainer', {}).get('max_steps', '?')} steps (recipe `{config.get('recipe') or 'custom'}`)",
        "",
        "## Metrics",
        "",
        *([f"- {k}: {v:.4g}" for k, v in sorted(metrics.items())] or ["- none recorded in training"]),
        *[f"- {k}: {v}" for k, v in sorted(measured.items())],
        "",
        "## Use (plain transformers, no kvtune)",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO_ID")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_ID")',
        "```",
        "",
        "transformers builds a sliding-window cache for the `sliding_attention` layers; vLLM's Transformers backend "
        "reads the same `layer_types`.",
        "",
    ]
    return "\n".join(lines)
