"""LoCoCo: the compressor's arithmetic, the fixed-size chunked cache, gradients, and the PEFT round trip."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from peft import PeftModel, get_peft_model

import kvtune
from kvtune.eval.runner import chunked_nll, evaluate
from kvtune.eval.tasks import build_task
from kvtune.lococo import LoCoCoCompressor, LoCoCoConfig, LoCoCoLayer


def _random_entries(batch=2, heads=3, length=40, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, length, dim, generator=generator)
    values = torch.randn(batch, heads, length, dim, generator=generator)
    scores = torch.rand(batch, heads, length, generator=generator)
    return keys, values, scores


def test_without_blend_the_slots_are_the_top_scored_entries():
    keys, values, scores = _random_entries()
    compressor = LoCoCoCompressor(head_dim=8, mem_size=12, kernel_size=5)
    with torch.no_grad():
        compressor.blend.fill_(0.0)  # all weight on the one-hot residual: fused slots are verbatim picks
        out_keys, out_values, counts = compressor(keys, values, scores, torch.ones_like(scores, dtype=torch.bool))
    assert out_keys.shape == (2, 3, 12, 8) and bool((counts == 12).all())
    for b in range(2):
        for h in range(3):
            order = scores[b, h].argsort(descending=True)
            verbatim, residual = order[:6].sort().values, order[6:12].sort().values
            expected = torch.cat([keys[b, h, verbatim], keys[b, h, residual]])
            assert torch.equal(out_keys[b, h], expected)
            assert torch.equal(out_values[b, h], torch.cat([values[b, h, verbatim], values[b, h, residual]]))


def test_soft_slots_are_convex_mixtures_of_the_remaining_entries():
    keys, values, scores = _random_entries(seed=1)
    compressor = LoCoCoCompressor(head_dim=8, mem_size=12, kernel_size=5, init_std=0.05)
    valid = torch.ones_like(scores, dtype=torch.bool)
    verbatim = scores.topk(6, dim=-1).indices.sort(dim=-1).values
    rest = valid.clone().scatter_(-1, verbatim, False)
    order = torch.sort((~rest).to(torch.int8), dim=-1, stable=True).indices[..., :34]
    rest_keys = keys.gather(2, order[..., None].expand(-1, -1, -1, 8))
    tokens = torch.cat([rest_keys, values.gather(2, order[..., None].expand(-1, -1, -1, 8))], dim=-1)
    with torch.no_grad():
        weights = compressor.mixing_weights(tokens, scores.gather(-1, order), torch.ones_like(order, dtype=torch.bool))
        out_keys, _, _ = compressor(keys, values, scores, valid)
    assert torch.allclose(weights.sum(dim=-1), torch.ones(2, 3, 6), atol=1e-5)
    assert bool((weights >= 0).all())
    assert torch.allclose(out_keys[:, :, 6:], weights @ rest_keys, atol=1e-5)


def test_rows_that_fit_keep_their_entries_and_padding_never_leaks():
    keys, values, scores = _random_entries(batch=2, length=30)
    valid = torch.ones_like(scores, dtype=torch.bool)
    valid[1, :, :22] = False  # the second row holds 8 real entries (left padding), fewer than the 12 slots
    compressor = LoCoCoCompressor(head_dim=8, mem_size=12, kernel_size=5)
    with torch.no_grad():
        out_keys, _, counts = compressor(keys, values, scores, valid)
    assert counts[0].tolist() == [12, 12, 12] and counts[1].tolist() == [8, 8, 8]
    assert torch.equal(out_keys[1, :, :8], keys[1, :, 22:])
    assert bool(torch.isfinite(out_keys).all())


def _lococo_nll(model, ids, chunk=16):
    """Per-token NLL of ``ids`` fed ``chunk`` tokens at a time through a fresh lococo cache."""
    cache = kvtune.new_cache(model, kvtune.methods.build("lococo", chunk=chunk))
    return chunked_nll(model, cache, ids, chunk=chunk)[0]


@pytest.fixture()
def lococo_model():
    torch.manual_seed(0)
    config = LoCoCoConfig(mem_size=12, block_size=16, kernel_size=5, init_std=0.1)
    return get_peft_model(tiny_llama(layers=2), config)


def test_only_compressors_are_trainable(lococo_model):
    trainable = [n for n, p in lococo_model.named_parameters() if p.requires_grad]
    assert trainable and all("lococo_compressor" in n for n in trainable)
    assert sum(isinstance(m, LoCoCoLayer) for m in lococo_model.modules()) == 2


def test_chunked_cache_stays_fixed_and_the_next_chunk_trains_the_compressor(lococo_model):
    ids = torch.randint(0, 97, (2, 80), generator=torch.Generator().manual_seed(3))
    cache = kvtune.new_cache(lococo_model, kvtune.methods.build("lococo", chunk=16, buffer=4))
    conv = next(m for m in lococo_model.modules() if isinstance(m, LoCoCoCompressor)).conv
    gradients = []
    for start in range(0, 80, 16):
        piece = ids[:, start : start + 16]
        positions = torch.arange(start, start + 16)[None].expand(2, -1)
        out = lococo_model(input_ids=piece, position_ids=positions, past_key_values=cache, use_cache=True)
        conv.weight.grad = None
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), piece[:, 1:].flatten())
        if loss.requires_grad:  # before the first compression no trainable parameter is on the loss's path
            loss.backward()
        gradients.append(0.0 if conv.weight.grad is None else float(conv.weight.grad.abs().sum()))
        assert max(n for lengths in cache.lengths() for n in lengths.flatten().tolist()) <= 12 + 4
    # compression first fires after chunk 1 (32 > 12 + 4 entries), then after every chunk (28 > 16): each chunk's
    # loss from chunk 2 on reaches the compressor through the one compression that preceded it
    assert gradients[:2] == [0.0, 0.0] and all(g > 0 for g in gradients[2:])
    assert all(n == 12 for lengths in cache.lengths() for n in lengths.flatten().tolist())


def test_saved_adapter_reloads_with_identical_logits(lococo_model, tmp_path):
    with torch.no_grad():
        for module in lococo_model.modules():
            if isinstance(module, LoCoCoCompressor):
                module.blend.fill_(0.3)  # not the initial value: the saved weights must really be read back
    lococo_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    ids = torch.randint(0, 97, (1, 96), generator=torch.Generator().manual_seed(4))
    reloaded = PeftModel.from_pretrained(tiny_llama(layers=2), tmp_path)
    assert torch.equal(_lococo_nll(lococo_model.eval(), ids), _lococo_nll(reloaded.eval(), ids))
    assert torch.equal(
        _lococo_nll(reloaded, ids), _lococo_nll(kvtune.load_adapter(tiny_llama(layers=2), tmp_path), ids)
    )


def test_lococo_without_an_adapter_says_how_to_get_one():
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 97, (1, 64))
    cache = kvtune.new_cache(model, kvtune.methods.build("lococo", chunk=16))
    with pytest.raises(ValueError, match="load_adapter"):
        chunked_nll(model, cache, ids, chunk=16)


def test_generate_and_eval_with_a_saved_adapter_keep_a_fixed_cache(tmp_path):
    model, tokenizer = kvtune.load_model("embedded")
    get_peft_model(model, LoCoCoConfig(mem_size=64, block_size=128, init_std=0.02)).save_pretrained(tmp_path)
    base, _ = kvtune.load_model("embedded")
    task = build_task("passkey")
    sample = task.samples(tokenizer, 600, 1, 0)[0]
    answer, cache = kvtune.generate(
        base,
        tokenizer,
        sample.context,
        sample.question,
        sample.answer_prefix,
        method="lococo",
        adapter=str(tmp_path),
        chunk=128,
        max_new_tokens=4,
        return_cache=True,
    )
    assert isinstance(answer, str) and answer
    assert max(n for lengths in cache.lengths() for n in lengths.flatten().tolist()) <= 64 + 16
    adapted = kvtune.load_adapter(base, tmp_path)
    row = evaluate(adapted, tokenizer, task, "lococo", 64, context_length=600, samples=1, method_kwargs={"chunk": 128})
    assert row["kv_bytes"] < 0.2 * row["full_kv_bytes"]


def test_local_len_keeps_the_most_recent_entries_verbatim():
    keys, values, scores = _random_entries(length=40)
    scores[..., -4:] = -1.0  # the 4 newest entries score worst: only local_len can keep them
    compressor = LoCoCoCompressor(head_dim=8, mem_size=12, kernel_size=5, local_len=4)
    with torch.no_grad():
        compressor.blend.fill_(0.0)
        out_keys, _, _ = compressor(keys, values, scores, torch.ones_like(scores, dtype=torch.bool))
    for b in range(2):
        for h in range(3):
            kept = torch.cat([scores[b, h, :-4].topk(2).indices, torch.arange(36, 40)]).sort().values
            assert torch.equal(out_keys[b, h, :6], keys[b, h, kept])
    with pytest.raises(ValueError, match="local_len"):
        LoCoCoCompressor(head_dim=8, mem_size=12, local_len=7)  # more than the 6 verbatim slots


@pytest.mark.parametrize("layer_modules", [[], ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]])
def test_lora_and_embeddings_train_beside_the_compressors_with_the_papers_rates(tmp_path, layer_modules):
    from kvtune.train.module import parameter_groups

    torch.manual_seed(0)
    config = LoCoCoConfig(
        mem_size=12,
        block_size=16,
        kernel_size=5,
        lora_r=4,
        lora_layer_modules=layer_modules,
        modules_to_save=["embed_tokens"],
    )
    model = get_peft_model(tiny_llama(layers=2), config)
    groups = {g["name"]: g for g in parameter_groups(model, 5e-2, 2.5e-4, 5e-5)}
    assert {name: g["lr"] for name, g in groups.items()} == {"compressor": 5e-2, "embed_norm": 2.5e-4, "lora": 5e-5}
    # A and B on q, k, v, o (and the MLP's linears named) of both layers
    assert len(groups["lora"]["params"]) == 2 * (4 + len(layer_modules)) * 2
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.1)  # LoRA B starts at zero: make the reload check mean something
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 97, (1, 80), generator=torch.Generator().manual_seed(6))
    reloaded = PeftModel.from_pretrained(tiny_llama(layers=2), tmp_path)
    assert torch.equal(_lococo_nll(model.eval(), ids), _lococo_nll(reloaded.eval(), ids))
    # the reloaded LoRA was used: zeroing its B changes the result, the MLP's alone (where there is one), then all
    for part in (["mlp."] if layer_modules else []) + [""]:
        with torch.no_grad():
            for name, parameter in reloaded.named_parameters():
                if "lora_B" in name and part in name:
                    parameter.zero_()
        assert not torch.allclose(_lococo_nll(model, ids), _lococo_nll(reloaded, ids)), part


def test_lora_on_a_linear_the_layer_lacks_is_a_user_error():
    from kvtune.validation import UserError

    config = LoCoCoConfig(mem_size=12, block_size=16, lora_r=4, lora_layer_modules=["mlp.gate"])
    with pytest.raises(UserError, match="has no linear 'mlp.gate'"):
        get_peft_model(tiny_llama(layers=2), config)
