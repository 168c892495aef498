"""LoCoCo as a PEFT method: `LoCoCoConfig`, the `LoCoCoLayer` wrapping each attention module, and the tuner.

PEFT's `register_peft_method` only accepts names of its own `PeftType` enum, so the custom type ``"LOCOCO"`` is
added to `peft.mapping`'s three tables instead. After ``import kvtune``, `get_peft_model`, `save_pretrained`,
`PeftModel.from_pretrained` and `push_to_hub` work as for any built-in method. A convolution over time cannot be
folded into base weights, so there is no merge.

The wrapper changes nothing in the attention computation: it hands its compressor to kvtune's attention backend
(the ``kvtune_adapter`` keyword), where the `lococo` method (`kvtune.methods.lococo`) compresses the cache with it.
With ``lora_r > 0`` (the context-extension recipe) the attention's projections also get PEFT's own LoRA layers, and
so do the decoder layer's other linears named in ``lora_layer_modules`` (e.g. its MLP); they are tuner layers too, so
one adapter folder saves, loads and trains compressors and LoRA together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import peft.mapping
from peft import LoraConfig
from peft.config import PeftConfig
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from kvtune.lococo.compressor import LoCoCoCompressor
from kvtune.validation import UserError

PEFT_TYPE = "LOCOCO"
PREFIX = "lococo_"


@dataclass
class LoCoCoConfig(PeftConfig):
    """LoCoCo's hyperparameters (defaults: the official code's; ``mem_size`` 128 is its inference setting)."""

    mem_size: int = field(default=128, metadata={"help": "slots kept per layer and KV head (M)"})
    block_size: int = field(default=512, metadata={"help": "tokens per chunk (B): prefill and training granularity"})
    keep_rate: float = field(default=0.5, metadata={"help": "fraction of slots kept verbatim by attention score"})
    kernel_size: int = field(default=21, metadata={"help": "Conv1d kernel over tokens"})
    lambda_init: float = field(default=0.5, metadata={"help": "initial blend of soft weights vs one-hot residual"})
    init_std: float = field(default=1.0, metadata={"help": "std of the conv weights at initialisation"})
    local_len: int = field(default=0, metadata={"help": "most recent entries always kept verbatim (official ℓ)"})
    blend: str = field(default="linear", metadata={"help": "λ parametrisation: 'linear' (official) or 'sigmoid'"})
    normalize_scores: bool = field(
        default=False, metadata={"help": "rank entries by attention per query that could see them, not column sums"}
    )
    score_window: int = field(
        default=0,
        metadata={"help": "0: rank by column sums of a chunk's queries; W: by its last W queries' (TOVA: 1)"},
    )
    score_heads: str = field(
        default="layer", metadata={"help": "with score_window: average over the layer's heads or each KV group"}
    )
    buffer: int = field(default=16, metadata={"help": "entries held beyond mem_size before compression fires"})
    position_interpolation: float = field(default=1.0, metadata={"help": "linear RoPE scaling factor trained with"})
    target_modules: list[str] | str | None = field(
        default_factory=lambda: ["self_attn"], metadata={"help": "attention modules that get a compressor"}
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the attention projections (0: no LoRA)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "projections of each attention module that get LoRA"},
    )
    lora_layer_modules: list[str] = field(
        default_factory=list,
        metadata={"help": "linears of the decoder layer outside attention that get LoRA too (e.g. mlp.down_proj)"},
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "base modules trained and saved too (embeddings and norms)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0, got {self.lora_r}")

    def lora_config(self) -> LoraConfig:
        """The LoRA part as PEFT's own config (the paper's: no dropout, no bias)."""
        return LoraConfig(
            r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=0.0, target_modules=self.lora_target_modules
        )


class LoCoCoLayer(nn.Module, BaseTunerLayer):
    """An attention module plus one `LoCoCoCompressor` per adapter name."""

    adapter_layer_names = ("lococo_compressor",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoCoCoConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lococo_compressor = nn.ModuleDict()
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters = []
        self.update_layer(adapter_name, config)

    @property
    def layer_idx(self) -> int:
        return self.base_layer.layer_idx

    def update_layer(self, adapter_name: str, config: LoCoCoConfig) -> None:
        base = self.base_layer
        head_dim = getattr(base, "head_dim", None) or base.config.hidden_size // base.config.num_attention_heads
        weight = base.k_proj.weight
        self.lococo_compressor[adapter_name] = LoCoCoCompressor(
            head_dim,
            config.mem_size,
            keep_rate=config.keep_rate,
            kernel_size=config.kernel_size,
            lambda_init=config.lambda_init,
            init_std=config.init_std,
            local_len=config.local_len,
            blend=config.blend,
            normalize_scores=config.normalize_scores,
            score_window=config.score_window,
            score_heads=config.score_heads,
        ).to(device=weight.device, dtype=weight.dtype)
        if config.lora_r > 0:
            add_lora(self.base_layer, config.lora_target_modules, adapter_name, config.lora_config())
        self.set_adapter(self.active_adapters)

    def forward(self, *args, **kwargs):
        active = [name for name in self.active_adapters if name in self.lococo_compressor]
        if self.disable_adapters or not active:
            return self.base_layer(*args, **kwargs)
        return self.base_layer(*args, kvtune_adapter=self.lococo_compressor[active[0]], **kwargs)


def add_lora(module: nn.Module, names: list[str], adapter_name: str, lora: LoraConfig) -> None:
    """PEFT's LoRA on each linear of ``module`` named (dotted paths allowed), or one more adapter on a LoRA layer."""
    for name in names:
        try:
            linear = module.get_submodule(name)
        except AttributeError:
            raise UserError(f"{type(module).__name__} has no linear {name!r} to put LoRA on") from None
        if isinstance(linear, LoraLayer):
            linear.update_layer(adapter_name, lora.r, lora_alpha=lora.lora_alpha, config=lora)
        else:
            owner, _, attribute = name.rpartition(".")
            setattr(
                module.get_submodule(owner), attribute, LoraLinear(linear, adapter_name, lora, lora.r, lora.lora_alpha)
            )


class LoCoCoModel(BaseTuner):
    """Puts a `LoCoCoLayer` around every target attention module."""

    prefix: str = PREFIX
    tuner_layer_cls = LoCoCoLayer
    target_module_mapping: dict = {}

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key) -> None:
        if isinstance(target, LoCoCoLayer):
            target.update_layer(adapter_name, peft_config)
        else:
            self._replace_module(parent, target_name, LoCoCoLayer(target, adapter_name, peft_config), target)
        if peft_config.lora_r > 0 and peft_config.lora_layer_modules:  # the parent is the decoder layer
            add_lora(parent, peft_config.lora_layer_modules, adapter_name, peft_config.lora_config())

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            raise ValueError("LoCoCo compresses the cache over time; it cannot be merged into the base weights")
        return super()._unload_and_optionally_merge(False, progressbar, safe_merge, adapter_names)


peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = LoCoCoConfig
peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = LoCoCoModel
peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = PREFIX
