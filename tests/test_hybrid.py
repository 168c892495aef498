"""LightTransfer hybrids: layer plans, the streaming attention backend, its cache, training and the stock export."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import kvtune
from kvtune.api import cache_kwargs
from kvtune.attention import attention_modules
from kvtune.bench import bench, markdown_table
from kvtune.cli import CONF_DIR
from kvtune.hybrid import LayerPlan, PlanMismatchError, apply_plan, hybrid_cache, load_hybrid
from kvtune.hybrid.attention import Streaming, cache_storage_bytes, flex_streaming, sink_merge, streaming_mask
from kvtune.hybrid.calibrate import layer_scores
from kvtune.hybrid.export import export_hybrid, hybrid_config, to_hybrid_model
from kvtune.hybrid.fit import fit_hybrid
from kvtune.hybrid.plan import plan_from_scores
from kvtune.train.export import export
from tests.conftest import tiny_llama
from tests.test_fit import CtrlC


def _plan(layers=3, lazy=(1,), window=8, sinks=0, model_id="tiny") -> LayerPlan:
    return LayerPlan(model_id, layers, lazy, window=window, sinks=sinks, scores=tuple(0.1 * i for i in range(layers)))


# ---- plans -----------------------------------------------------------------------------------------------------------
def test_plan_round_trips_through_json(tmp_path):
    plan = plan_from_scores([0.2, 0.9, 0.5, 0.95], "m", 0.5, window=16, sinks=4, data={"source": "stdlib_train"})
    assert plan.lazy_layers == (1, 3)
    loaded = LayerPlan.load(plan.save(tmp_path / "plan.json"))
    assert loaded == plan and set(loaded.lazy_layers) == {1, 3}
    assert loaded.layer_types == ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]


def test_plan_for_another_model_is_refused():
    model = tiny_llama(layers=3)
    with pytest.raises(PlanMismatchError, match="4 layers; this model has 3"):
        apply_plan(model, _plan(layers=4))
    with pytest.raises(PlanMismatchError, match="calibrated for 'tiny', not 'other'"):
        apply_plan(model, _plan(), model_id="other")


def test_plan_of_another_format_or_with_unknown_keys_is_refused(tmp_path):
    record = json.loads(_plan().save(tmp_path / "p.json").read_text())
    (tmp_path / "v.json").write_text(json.dumps({**record, "format_version": 99}))
    with pytest.raises(ValueError, match="format 99"):
        LayerPlan.load(tmp_path / "v.json")
    (tmp_path / "k.json").write_text(json.dumps({**record, "windw": 3}))
    with pytest.raises(ValueError, match="unknown layer-plan keys"):
        LayerPlan.load(tmp_path / "k.json")


# ---- attention -------------------------------------------------------------------------------------------------------
def test_window_semantics_match_transformers_sliding_window():
    """A query sees keys at distance < window (itself included) and the sinks, as transformers' sliding_window."""
    mask = streaming_mask(10, 10, Streaming(window=3, sinks=2))
    assert mask[9].nonzero().flatten().tolist() == [0, 1, 7, 8, 9]
    assert mask[3].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert streaming_mask(1, 5, Streaming(window=3, sinks=2))[0].tolist() == [True] * 5  # a truncated cache: all
    assert streaming_mask(4, 4, None).equal(torch.ones(4, 4, dtype=torch.bool).tril())


def test_sink_merge_of_a_windowed_attention_equals_the_band_mask():
    """The CUDA path's decomposition (window by FlashAttention, sinks merged by log-sum-exp), checked on CPU."""
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, 12, 8), torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 8)
    streaming, scale = Streaming(window=5, sinks=3), 8**-0.5
    expected = F.scaled_dot_product_attention(
        query, key, value, attn_mask=streaming_mask(12, 20, streaming), scale=scale, enable_gqa=True
    )
    logits = query @ key.repeat_interleave(2, dim=1).transpose(2, 3) * scale
    logits = logits.masked_fill(~streaming_mask(12, 20, Streaming(window=5, sinks=0)), float("-inf"))
    window_out = logits.softmax(dim=-1) @ value.repeat_interleave(2, dim=1)
    merged = sink_merge(window_out, logits.logsumexp(dim=-1), query, key, value, streaming, scale)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)


def test_flex_attention_path_for_training_with_sinks_equals_the_band_mask():
    """The CUDA training path with sinks (flex_attention block mask), run eagerly on CPU (forward only: flex has no
    CPU backward)."""
    torch.manual_seed(0)
    query = torch.randn(1, 4, 48, 16)
    key, value = torch.randn(1, 2, 48, 16), torch.randn(1, 2, 48, 16)
    streaming, scale = Streaming(window=8, sinks=3), 0.25
    got = flex_streaming(query, key, value, streaming, scale, compiled=False)
    expected = F.scaled_dot_product_attention(
        query, key, value, attn_mask=streaming_mask(48, 48, streaming), scale=scale, enable_gqa=True
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlashAttention-2 through varlen_attn)")
@pytest.mark.parametrize("sinks", [0, 4])
def test_cuda_window_kernel_equals_the_band_mask(sinks):
    """The CUDA path (varlen_attn window_size, sinks merged by log-sum-exp) against SDPA with the band mask."""
    from kvtune.hybrid.attention import _cuda

    torch.manual_seed(0)
    query = torch.randn(2, 8, 300, 64, device="cuda", dtype=torch.bfloat16)
    key, value = (torch.randn(2, 2, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    streaming = Streaming(window=64, sinks=sinks)
    expected = F.scaled_dot_product_attention(
        query.float(),
        key.float(),
        value.float(),
        attn_mask=streaming_mask(300, 300, streaming, "cuda"),
        enable_gqa=True,
    )
    got = _cuda(query, key, value, streaming, 64**-0.5).transpose(1, 2).float()
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    # training with sinks takes the flex_attention path: its gradient against the band mask's
    query.requires_grad_(True)
    (grad,) = torch.autograd.grad(_cuda(query, key, value, streaming, 64**-0.5).float().square().sum(), query)
    reference = query.detach().float().requires_grad_(True)
    band = F.scaled_dot_product_attention(
        reference,
        key.float(),
        value.float(),
        attn_mask=streaming_mask(300, 300, streaming, "cuda"),
        scale=64**-0.5,
        enable_gqa=True,
    )
    (expected_grad,) = torch.autograd.grad(band.transpose(1, 2).square().sum(), reference)
    torch.testing.assert_close(grad.float(), expected_grad, atol=5e-2, rtol=5e-2)


def test_a_window_longer_than_the_sequence_is_exactly_the_full_model():
    model, ids = tiny_llama(), torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        expected = model(ids).logits
        apply_plan(model, _plan(lazy=(0, 1, 2), window=64, sinks=4))
        assert model(ids).logits.equal(expected)


def _reference_logits(model: LlamaForCausalLM, ids: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
    """The same model under eager attention with explicit per-layer 4-D masks (an independent reference)."""
    layers = model.model.layers
    masks = {
        i: torch.where(
            streaming_mask(
                ids.shape[1], ids.shape[1], Streaming(plan.window, plan.sinks) if i in plan.lazy_layers else None
            ),
            0.0,
            float("-inf"),
        )[None, None]
        for i in range(len(layers))
    }
    outputs = []

    def hook(index):
        def pre(module, args, kwargs):
            kwargs["attention_mask"] = masks[index]
            return args, kwargs

        return pre

    model.set_attn_implementation("eager")
    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        outputs.append(model(ids).logits)
    finally:
        for handle in handles:
            handle.remove()
    return outputs[0]


def test_hybrid_with_sinks_matches_an_eager_reference_and_its_bounded_cache_decodes_the_same():
    model, ids = tiny_llama(layers=4), torch.randint(0, 97, (1, 40))
    plan = _plan(layers=4, lazy=(1, 2), window=6, sinks=2)
    with torch.no_grad():
        reference = _reference_logits(model, ids, plan)
        apply_plan(model, plan)
        logits = model(ids).logits
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
        # prefill 30 tokens, then feed the rest one by one through the sinks + window cache
        cache = hybrid_cache(model)
        steps = [model(ids[:, :30], **cache_kwargs(model, cache)).logits[:, -1]]
        for t in range(30, 40):
            out = model(ids[:, t : t + 1], position_ids=torch.tensor([[t]]), **cache_kwargs(model, cache))
            steps.append(out.logits[:, -1])
        torch.testing.assert_close(torch.stack(steps, dim=1), logits[:, 29:], atol=1e-5, rtol=1e-5)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [40, 2 + 6 - 1, 2 + 6 - 1, 40]
    assert sum(cache_storage_bytes(cache)) == plan.kv_bytes(40, kv_heads=2, head_dim=8, itemsize=4)


# ---- test-time lighttransfer with a plan ----------------------------------------------------------------------------
def test_lighttransfer_takes_its_lazy_layers_from_a_plan_and_decodes_at_the_window(tmp_path):
    model, ids = tiny_llama(layers=4), torch.randint(0, 97, (1, 40))
    path = _plan(layers=4, lazy=(0, 2), window=6, sinks=2).save(tmp_path / "plan.json")
    with kvtune.compress(model, "lighttransfer", plan=str(path)):
        with torch.no_grad():
            cache = model(ids, use_cache=True).past_key_values
            for t in range(40, 43):
                model(torch.tensor([[t]]), position_ids=torch.tensor([[t]]), **cache_kwargs(model, cache))
    assert [int(n.max()) for n in cache.lengths()] == [2 + 6 - 1, 43, 2 + 6 - 1, 43]
    other = tiny_llama(layers=3)
    with pytest.raises(PlanMismatchError, match="4 layers; this model has 3"), torch.no_grad():
        with kvtune.compress(other, "lighttransfer", plan=str(path)):
            other(ids, use_cache=True)


# ---- calibration -----------------------------------------------------------------------------------------------------
def test_calibration_scores_a_window_covering_everything_as_fully_lazy():
    model = tiny_llama()
    sequences = torch.randint(0, 97, (2, 48))
    assert layer_scores(model, sequences, window=16, sinks=2) != pytest.approx([1.0] * 3)
    assert layer_scores(model, sequences, window=47, sinks=1) == pytest.approx([1.0] * 3)


def test_calibrate_cli_refuses_impossible_settings_in_one_line(kvtune_cli):
    status, out, err = kvtune_cli(["calibrate", "window=512", "sequence_length=256"])
    assert status == 2 and "Traceback" not in out + err
    assert "must be longer than sinks + window (516)" in err.strip().splitlines()[-1]


# ---- export to stock transformers ------------------------------------------------------------------------------------
STOCK = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(ids).logits
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
cache = out.past_key_values
stored = []
for layer in cache.layers:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (layer.keys, layer.values)}
    stored.append(sum(storages.values()))
torch.save(logits, sys.argv[3])
print(json.dumps({"kvtune": any(m.startswith("kvtune") for m in sys.modules), "type": type(model).__name__,
                  "entries": [layer.keys.shape[-2] for layer in cache.layers], "logical_bytes":
                  sum(l.keys.nbytes + l.values.nbytes for l in cache.layers), "storage_bytes": stored,
                  "tokens": out.sequences[0].tolist()}))
"""


def _trained_run(tmp_path, plan: LayerPlan, tokenizer):
    """A run folder as `kvtune fit` leaves it: a base model on disk, a LoRA adapter with non-zero B, the plan."""
    tiny_llama(layers=4, seed=1).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(3)
    for name, parameter in peft.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.2)
    run = tmp_path / "run"
    peft.save_pretrained(run / "adapter")
    plan.save(run / "plan.json")
    (run / "fit_config.json").write_text(json.dumps({"model": {"name": str(tmp_path / "base"), "dtype": "float32"}}))
    return run


def test_exported_hybrid_serves_on_plain_transformers_like_kvtunes_hybrid(tmp_path, embedded_tokenizer):
    plan = LayerPlan(str(tmp_path / "base"), 4, (1, 3), window=7, sinks=0)
    run = _trained_run(tmp_path, plan, embedded_tokenizer)
    out = export_hybrid(run, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "ministral" and config["sliding_window"] == 7
    assert config["layer_types"] == plan.layer_types and (out / "README.md").read_text().count("[1, 3]")
    ids = torch.randint(0, 97, (1, 30))
    torch.save(ids, tmp_path / "ids.pt")
    result = subprocess.run(
        [sys.executable, "-c", STOCK, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        capture_output=True,
        text=True,
        check=True,
    )
    served = json.loads(result.stdout.strip().splitlines()[-1])
    assert not served["kvtune"] and served["type"] == "MinistralForCausalLM"
    # kvtune's hybrid: the same base and adapter, merged, under the kvtune_hybrid backend
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    merged = apply_plan(PeftModel.from_pretrained(base, run / "adapter").merge_and_unload(), plan)
    with torch.no_grad():
        ours = merged(ids).logits
        tokens = merged.generate(ids, max_new_tokens=6, do_sample=False, cache=hybrid_cache(merged))
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), ours, atol=1e-5, rtol=1e-5)
    assert served["tokens"] == tokens[0].tolist()
    # 30 prompt + 6 generated tokens: the last one is never fed, so 35 went through every layer
    lazy = set(plan.lazy_layers)
    assert all(n <= plan.window for i, n in enumerate(served["entries"]) if i in lazy)
    assert served["entries"] == plan.kept_entries(35)
    assert served["logical_bytes"] == plan.kv_bytes(35, kv_heads=2, head_dim=8, itemsize=4)
    # transformers concatenates then slices: a sliding layer's storage holds one entry more than it shows
    entry = 2 * 2 * 8 * 4
    assert served["storage_bytes"] == [(n + (i in lazy)) * entry for i, n in enumerate(plan.kept_entries(35))]


EMBEDDED_STOCK = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert not any(m.startswith("kvtune") for m in sys.modules)
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
"""


@pytest.mark.slow
def test_embedded_hybrid_exports_to_the_same_logits(tmp_path, embedded_tokenizer):
    """SmolLM2 (tied embeddings, 30 layers) as a 15-sliding-layer Ministral: stock logits equal kvtune's hybrid."""
    model = kvtune.load_model("embedded")[0]
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(3)
    for name, parameter in peft.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.02)
    run = tmp_path / "run"
    peft.save_pretrained(run / "adapter")
    plan = LayerPlan("embedded", 30, tuple(range(1, 30, 2)), window=64, sinks=0)
    plan.save(run / "plan.json")
    (run / "fit_config.json").write_text(json.dumps({"model": {"name": "embedded", "dtype": "float32"}}))
    out = export_hybrid(run, tmp_path / "export")
    ids = torch.tensor([embedded_tokenizer(kvtune.eval.corpus.corpus_text()).input_ids[:300]])
    torch.save(ids, tmp_path / "ids.pt")
    command = [sys.executable, "-c", EMBEDDED_STOCK, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    hybrid = load_hybrid(kvtune.load_model("embedded")[0], _with_plan(run))
    with torch.no_grad():
        ours = hybrid(ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), ours, atol=1e-4, rtol=1e-4)


def _with_plan(run):
    (run / "adapter" / "plan.json").write_text((run / "plan.json").read_text())
    return run / "adapter"


def test_export_refuses_a_plan_with_sinks_before_loading_anything(tmp_path):
    with pytest.raises(ValueError, match="lighttransfer.sinks=0"):
        hybrid_config(LlamaConfig(), _plan(sinks=4))
    with pytest.raises(NotImplementedError, match="biases"):
        hybrid_config(LlamaConfig(attention_bias=True), _plan())


def test_ministral_holds_llama_weights_exactly():
    model, ids = tiny_llama(layers=3), torch.randint(0, 97, (1, 20))
    plan = _plan(layers=3, lazy=(), window=4)
    with torch.no_grad():
        assert to_hybrid_model(model, plan)(ids).logits.equal(model(ids).logits)


# ---- training ----------------------------------------------------------------------------------------------------
TOY = [
    "recipe=lighttransfer_quickstart",
    "lighttransfer.sequence_length=48",
    "lighttransfer.window=8",
    "lighttransfer.sinks=2",
    "lighttransfer.warmup_steps=0",
    "data.max_train_sequences=12",
    "trainer.val_check_interval=100",
    "trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
    "checkpoint_every=1",
    "~logger",
]


def _fit_config(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="fit", overrides=[*TOY, f"output_dir={tmp_path}", *overrides])


def _toy_base(tokenizer):
    """A tiny Llama over the embedded tokenizer's vocabulary (what the data module produces)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def test_gpu_recipe_composes_with_the_lococo_strategy_and_logger_groups():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="fit", overrides=["recipe=lighttransfer_llama3_8b", "lighttransfer.sinks=0"])
    assert cfg.model.name == "meta-llama/Meta-Llama-3-8B" and cfg.trainer.accelerator == "gpu"
    assert cfg.strategy._target_.endswith("DDPStrategy") and cfg.logger._target_.endswith("WandbLogger")
    assert (cfg.lighttransfer.window, cfg.lighttransfer.sinks) == (1020, 0)
    with pytest.raises(Exception, match="windw"), initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        compose(config_name="fit", overrides=["recipe=lighttransfer_quickstart", "lighttransfer.windw=3"])


def test_fit_trains_lora_with_the_plan_and_resumes_exactly(tmp_path, embedded_tokenizer):
    plan = LayerPlan("embedded", 2, (1,), window=8, sinks=2).save(tmp_path / "plan.json")
    args = (f"lighttransfer.plan={plan}",)
    fit_hybrid(
        _fit_config(tmp_path / "a", "trainer.max_steps=4", *args),
        tmp_path / "a",
        base_model=_toy_base(embedded_tokenizer),
        tokenizer=embedded_tokenizer,
    )
    # the same 4-step schedule, interrupted (Ctrl-C) after 2 steps, then resumed from its checkpoint
    with pytest.raises(SystemExit):  # Lightning shuts down gracefully, then exits with status 1
        fit_hybrid(
            _fit_config(tmp_path / "b", "trainer.max_steps=4", *args),
            tmp_path / "b",
            callbacks=[CtrlC(at_step=2)],
            base_model=_toy_base(embedded_tokenizer),
            tokenizer=embedded_tokenizer,
        )
    assert (tmp_path / "b" / "checkpoints" / "interrupted.ckpt").is_file()
    fit_hybrid(
        _fit_config(tmp_path / "b", "trainer.max_steps=4", "ckpt_path=last", *args),
        tmp_path / "b",
        base_model=_toy_base(embedded_tokenizer),
        tokenizer=embedded_tokenizer,
    )
    straight, resumed = (
        load_file(tmp_path / "a/adapter/adapter_model.safetensors"),
        load_file(tmp_path / "b/adapter/adapter_model.safetensors"),
    )
    assert straight.keys() == resumed.keys() and all("lora_" in k for k in straight)
    assert any(t.abs().sum() > 0 for k, t in straight.items() if "lora_B" in k)  # it trained
    for name in straight:
        torch.testing.assert_close(straight[name], resumed[name], atol=0, rtol=0)
    saved = LayerPlan.load(tmp_path / "a/plan.json")
    assert saved.lazy_layers == (1,) and (saved.window, saved.sinks) == (8, 2)
    hybrid = load_hybrid(_toy_base(embedded_tokenizer), tmp_path / "a" / "adapter")
    modules = [layer.self_attn for layer in hybrid.model.layers]
    assert [m.kvtune_streaming for m in modules] == [None, Streaming(window=8, sinks=2)]


# ---- kvtune bench: full and hybrid rows in one run -------------------------------------------------------------------
def test_bench_adds_a_hybrid_row_whose_cache_is_the_plans_arithmetic(embedded_tokenizer):
    model = _toy_base(embedded_tokenizer)  # 2 layers, 2 KV heads of 8 dims, float32
    stock = model.config._attn_implementation
    plan = LayerPlan("toy", 2, (1,), window=16, sinks=2)
    rows = bench(model, embedded_tokenizer, ["full"], [], [96, 160], [1], decode_tokens=3, plans=[plan])
    by_length = {(r["method"], r["context_length"]): r for r in rows}
    assert set(by_length) == {(m, n) for m in ("full", "hybrid") for n in (96, 160)}
    for length in (96, 160):
        full, hybrid = by_length["full", length], by_length["hybrid", length]
        assert full["kv_bytes"] == 2 * 2 * length * 2 * 8 * 4  # keys and values, 2 layers
        assert hybrid["kv_bytes"] == plan.kv_bytes(length, kv_heads=2, head_dim=8, itemsize=4)
        assert hybrid["kv_ratio"] == pytest.approx((length + 2 + 16 - 1) / (2 * length))
        assert hybrid["plan"] == "1/2 layers W=16 sinks=2" and hybrid["decode_tok_s"] > 0
    assert model.config._attn_implementation == stock  # the stock model is restored after the hybrid rows
    assert all(getattr(m, "kvtune_streaming", None) is None for m in attention_modules(model))
    assert "1/2 layers W=16 sinks=2" in markdown_table(rows)


# ---- plans on the command line and with exported adapters ------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvtune.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", ["bench", "fit"])
def test_a_plan_for_another_model_or_no_plan_is_refused_in_one_line_before_loading(tmp_path, command, kvtune_cli):
    other = _plan(layers=30, model_id="other").save(tmp_path / "other.json")
    option = {"bench": "hybrid=[{}]", "fit": "lighttransfer.plan={}"}[command]
    extra = ["recipe=lighttransfer_quickstart", f"hydra.run.dir={tmp_path / 'run'}"] if command == "fit" else []
    for path, message in ((other, "calibrated for 'other', not 'embedded'"), (tmp_path / "no.json", "no layer plan")):
        status, out, err = kvtune_cli([command, option.format(path), *extra])  # it fails if anything loads
        assert status == 2 and "Traceback" not in out + err
        assert message in err.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "adapter").exists()


def test_bench_refuses_a_plan_with_another_layer_count(tmp_path, embedded_tokenizer):
    tiny_llama(layers=4).save_pretrained(tmp_path / "base")
    embedded_tokenizer.save_pretrained(tmp_path / "base")
    plan = LayerPlan(str(tmp_path / "base"), 5, (1,), window=8).save(tmp_path / "plan.json")
    result = _cli("bench", f"model={tmp_path / 'base'}", f"hybrid=[{plan}]", "context_lengths=[64]", "budgets=[8]")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "with 5 layers; this model has 4" in result.stderr.strip().splitlines()[-1]


def test_export_carries_the_plan_and_load_adapter_applies_it(tmp_path, embedded_tokenizer):
    plan = LayerPlan(str(tmp_path / "base"), 4, (1, 3), window=7, sinks=2)
    run = _trained_run(tmp_path, plan, embedded_tokenizer)
    _with_plan(run)
    out = export(run, tmp_path / "out")
    assert LayerPlan.load(out / "plan.json") == plan
    assert "layers [1, 3] of 4 attend to 2 sinks + a 7-token sliding window" in (out / "README.md").read_text()
    adapter = kvtune.load_adapter(LlamaForCausalLM.from_pretrained(tmp_path / "base").eval(), out)
    streaming = [getattr(m, "kvtune_streaming", None) for m in attention_modules(adapter.get_base_model())]
    assert streaming == [None, Streaming(7, 2), None, Streaming(7, 2)]
    merged = load_hybrid(LlamaForCausalLM.from_pretrained(tmp_path / "base").eval(), run / "adapter")
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(adapter(ids).logits, merged(ids).logits, atol=1e-5, rtol=1e-5)
