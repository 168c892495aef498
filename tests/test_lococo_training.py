"""Training LoCoCo so that it learns: distillation from the full cache, a blend that passes gradient at step 1,
truncated backpropagation through several compressions, unbiased attention scores, and training windows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import tiny_llama
from hydra import compose, initialize_config_dir
from peft import get_peft_model

from kvtune.attention import LayerContext
from kvtune.cli import CONF_DIR
from kvtune.lococo import LoCoCoCompressor, LoCoCoConfig
from kvtune.methods import build
from kvtune.methods.base import last_query_votes, received_scores, visible_queries
from kvtune.train.data import Sequences
from kvtune.train.fit import build_adapted_model
from kvtune.train.module import chunked_losses, distillation_loss, teacher_targets

# the shipped recipe at toy sizes: everything that decides whether the conv learns (objective, blend, λ start,
# initialisation) is the recipe's own
SMALL = ["recipe=quickstart", "method.mem_size=12", "method.kernel_size=5", "method.local_len=4"]


def _ids(batch=2, length=96, seed=3):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def _convs(model):
    return [m.conv for m in model.modules() if isinstance(m, LoCoCoCompressor)]


def test_distillation_loss_is_zero_when_the_cache_holds_everything():
    model = get_peft_model(tiny_llama(layers=2), LoCoCoConfig(mem_size=128, block_size=16, kernel_size=5))
    losses = chunked_losses(model, _ids(), block_size=16, objective="distill")
    assert len(losses) == 6 and max(abs(x) for x in losses) < 1e-6


def test_distillation_loss_is_positive_once_the_memory_is_compressed():
    model = get_peft_model(tiny_llama(layers=2), LoCoCoConfig(mem_size=8, block_size=16, kernel_size=5))
    losses = chunked_losses(model, _ids(), block_size=16, buffer=2, objective="distill")
    assert abs(losses[0]) < 1e-6 and all(x > 1e-4 for x in losses[2:])


def test_top_k_distillation_is_the_full_kl_when_k_covers_the_vocabulary_and_a_lower_bound_otherwise():
    student, teacher = torch.randn(3, 5, 40), torch.randn(3, 5, 40) * 3
    full = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    for k in (40, 8, 1):
        top = teacher.log_softmax(-1).topk(k, dim=-1)
        loss = distillation_loss(student, top.values, top.indices)
        # KL over (top k, the rest): the full KL at k = vocabulary, below it otherwise (coarsening loses divergence)
        assert torch.allclose(loss, full.mean(), atol=1e-5) if k == 40 else 0 < loss < full.mean()
        assert distillation_loss(teacher, top.values, top.indices).abs() < 1e-6


def test_teacher_targets_are_the_uncompressed_models_top_k_in_one_forward():
    model = get_peft_model(tiny_llama(layers=2), LoCoCoConfig(mem_size=8, block_size=16, kernel_size=5, lora_r=4))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # a trained LoRA: the teacher is the base model without it
            torch.nn.init.normal_(parameter, std=0.5)
    ids = _ids()
    with model.disable_adapter(), torch.no_grad():
        reference = model(input_ids=ids).logits.log_softmax(-1).topk(5, dim=-1)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits.topk(5, dim=-1).indices, reference.indices)
    logprobs, indices = teacher_targets(model, ids, block_size=16, top_k=5)
    assert torch.equal(indices, reference.indices) and torch.allclose(logprobs, reference.values, atol=1e-5)


def test_the_conv_gets_a_gradient_at_step_one_under_the_shipped_recipe():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="fit", overrides=[*SMALL])
    model, _ = build_adapted_model(cfg, model=tiny_llama(layers=2), tokenizer=None)
    model.train()
    chunked_losses(
        model, _ids(), block_size=16, buffer=4, backward=torch.Tensor.backward, objective=cfg.method.objective
    )
    assert all(conv.weight.grad is not None and float(conv.weight.grad.abs().sum()) > 0 for conv in _convs(model))


def test_sigmoid_blend_starts_at_lambda_init_and_linear_zero_passes_no_conv_gradient():
    keys, values = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    scores, valid = torch.rand(1, 2, 40), torch.ones(1, 2, 40, dtype=torch.bool)
    for blend, start, moves in (("linear", 0.0, False), ("sigmoid", 0.1, True)):
        torch.manual_seed(0)
        compressor = LoCoCoCompressor(head_dim=8, mem_size=12, kernel_size=5, lambda_init=start, blend=blend)
        assert torch.allclose(compressor.blend_weight, torch.tensor([start]))
        compressor(keys, values, scores, valid)[0].square().sum().backward()
        assert (float(compressor.conv.weight.grad.abs().sum()) > 0) == moves


def test_backpropagating_two_chunks_reaches_the_compression_before_the_previous_one():
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(layers=2), LoCoCoConfig(mem_size=8, block_size=16, kernel_size=5, init_std=0.1))
    grads = []
    for bptt in (1, 2):
        model.zero_grad(set_to_none=True)
        chunked_losses(model, _ids(), block_size=16, buffer=2, backward=torch.Tensor.backward, bptt_chunks=bptt)
        grads.append(torch.cat([conv.weight.grad.flatten() for conv in _convs(model)]))
    # the same losses, but with two chunks the gradient also flows through the compression one chunk further back
    assert grads[0].abs().sum() > 0 and not torch.allclose(grads[0], grads[1])


def test_normalised_scores_divide_column_sums_by_the_queries_that_could_see_each_entry():
    # 2 entries stored before this call, 3 new tokens: the old entries were visible to all 3 queries,
    # the new ones to 3, 2 and 1 queries (causal)
    column = torch.tensor([[[3.0, 1.5, 0.9, 0.4, 0.2], [0.6, 0.3, 1.2, 0.8, 1.0]]])  # [B=1, H=2, L=5]
    ctx = LayerContext(
        layer_idx=0,
        num_layers=1,
        layer=None,
        cache=None,
        query=torch.zeros(1, 2, 3, 4),
        keys=torch.zeros(1, 1, 5, 4),
        values=torch.zeros(1, 1, 5, 4),
        valid=torch.ones(1, 1, 5, dtype=torch.bool),
        aux=None,
        column_scores=column,
        scaling=0.5,
    )
    assert visible_queries(ctx).flatten().tolist() == [3.0, 3.0, 3.0, 2.0, 1.0]
    expected = column / torch.tensor([3.0, 3.0, 3.0, 2.0, 1.0])
    assert torch.allclose(received_scores(ctx, normalize=True, how="sum"), expected.sum(dim=1, keepdim=True))
    assert torch.allclose(received_scores(ctx, normalize=False, how="mean"), column.mean(dim=1, keepdim=True))


def test_every_method_can_prefill_in_chunks_and_then_is_not_replayed():
    policy = build("h2o", budget=8, prefill_chunk=512, normalize=True)
    assert policy.prefill_chunk == 512 and policy.replayable is False and policy.normalize
    assert getattr(build("h2o", budget=8), "replayable", True)


def test_random_windows_come_from_across_the_stream():
    tokens = list(range(10_000))
    windows = Sequences(tokens, 100, count=32, seed=0)
    assert windows.data.shape == (32, 100)
    assert bool((windows.data[:, 1:] - windows.data[:, :-1] == 1).all())  # each window is contiguous text
    assert int(windows.data[:, 0].max()) > 5_000  # not only the first sequences of the stream


class _Recorder:
    """Stands in for a cache layer: records what the policy compacts to."""

    def detach(self) -> None:
        pass

    def compact(self, selection, view=None) -> None:
        self.selection = selection


def _fuse_context(column: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, compressor) -> LayerContext:
    return LayerContext(
        layer_idx=0,
        num_layers=1,
        layer=_Recorder(),
        cache=None,
        query=query,
        keys=keys,
        values=keys.clone(),
        valid=torch.ones(1, 1, keys.shape[2], dtype=torch.bool),
        aux=None,
        column_scores=column,
        scaling=1.0,
        adapter=compressor,
    )


def test_score_window_ranks_by_the_last_querys_head_averaged_attention_not_column_sums():
    # 6 entries, one KV head with two query heads, 2 queries in this call. Keys are scaled basis vectors, so the
    # last query's logit on entry i is its i-th coordinate. Column sums favour entries 0, 2, 4, 5; the last query
    # (averaged over the two heads) favours 1, 3, 4, 5. mem_size 4 (2 verbatim + 2 one-hot picks at λ = 0).
    keys = torch.eye(6, 8)[None, None] * 4.0  # [1, 1, 6, 8]
    query = torch.zeros(1, 2, 2, 8)
    query[0, 0, -1, :6] = torch.tensor([0.0, 1.0, 0.0, 0.5, 0.8, 0.2])
    query[0, 1, -1, :6] = torch.tensor([0.0, 0.6, 0.0, 1.0, 0.2, 0.9])
    column = torch.tensor([[[5.0, 0.1, 4.0, 0.2, 3.0, 2.0]] * 2])  # [1, H=2, 6]
    logits = (query[0, :, -1, :6] * 4.0).softmax(dim=-1)  # [2 heads, 6]: the last query sees every entry
    expected = logits.mean(dim=0)
    kept = {}
    for window in (0, 1):
        compressor = LoCoCoCompressor(head_dim=8, mem_size=4, kernel_size=3, lambda_init=0.0, score_window=window)
        ctx = _fuse_context(column, query, keys, compressor)
        if window:
            assert torch.allclose(last_query_votes(ctx, 1).flatten(), expected, atol=1e-6)
        build("lococo", buffer=0).fuse(ctx)
        slots = ctx.layer.selection.keys[0, 0]  # each slot is one entry's key (λ = 0: one-hot picks)
        kept[window] = sorted(int(row.argmax()) for row in slots)
    assert kept[0] == [0, 2, 4, 5]
    assert kept[1] == sorted(expected.topk(4).indices.tolist()) == [1, 3, 4, 5]
