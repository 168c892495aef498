"""The evaluation harness: replayed scoring agrees with `kvtune.generate`, chunked perplexity is exact without
compression, results and reports are written, and `kvtune bench` measures what the cache holds."""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from hydra import compose, initialize_config_dir
from tqdm import tqdm

import kvtune
from kvtune.bench import measure, with_ratios
from kvtune.cache import KVCache
from kvtune.cli import CONF_DIR
from kvtune.eval import runner
from kvtune.eval.job import run_eval_job
from kvtune.eval.report import read_rows
from kvtune.eval.runner import chunked_nll, evaluate
from kvtune.eval.tasks import build_task

FIELDS = {"task", "method", "budget", "context_length", "samples", "score", "answer_nll", "kv_bytes"}
FIELDS |= {"full_kv_bytes", "seconds", "seed"}


@pytest.mark.parametrize("question_aware", [False, True])
def test_replayed_answers_match_generate(embedded, question_aware):
    model, tokenizer = embedded
    task = build_task("passkey")
    row = evaluate(
        model,
        tokenizer,
        task,
        "snapkv",
        64,
        context_length=600,
        samples=2,
        batch_size=2,
        question_aware=question_aware,
        max_new_tokens=6,
    )
    samples = task.samples(tokenizer, 600, 2, 0)
    for sample, result in zip(samples, row["per_sample"]):
        answer = kvtune.generate(
            model,
            tokenizer,
            sample.context,
            sample.question,
            sample.answer_prefix,
            method="snapkv",
            budget=64,
            question_aware=question_aware,
            max_new_tokens=6,
        )
        assert answer == result["answer"]
    assert row["kv_bytes"] < 0.2 * row["full_kv_bytes"]


def test_full_cache_scores_its_gold_answers(embedded):
    model, tokenizer = embedded
    row = evaluate(model, tokenizer, build_task("passkey"), "full", context_length=800, samples=3, batch_size=3)
    assert row["score"] == 1.0
    assert row["answer_nll"] < 0.5  # the key's digits are near certain with the whole context
    assert row["kv_bytes"] == pytest.approx(row["full_kv_bytes"])


@pytest.mark.parametrize("method", ["full", "tova", "kvzip"])
def test_scoring_leaves_no_cache_alive(embedded_tokenizer, monkeypatch, method):
    """Every cache `_qa` makes is freed when it returns, even when called with autograd on (as scripts do): a
    decode under autograd tied the cache's storage to a graph that pointed back at the cache, a cycle through
    C++ that Python's collector cannot see, so each call kept ~1 GB alive at 2K tokens."""
    tokenizer = embedded_tokenizer
    model = tiny_llama()
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    task = build_task("passkey")
    samples = task.samples(tokenizer, 200, 1, seed=0)
    made: list[weakref.ref] = []
    deepcopy, init = KVCache.__deepcopy__, KVCache.__init__

    def tracked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    def tracked_deepcopy(self, memo):
        clone = deepcopy(self, memo)
        made.append(weakref.ref(clone))
        return clone

    monkeypatch.setattr(KVCache, "__init__", tracked_init)
    monkeypatch.setattr(KVCache, "__deepcopy__", tracked_deepcopy)
    kwargs = {"prompt": [5, 11, 17]} if method == "kvzip" else {}
    ratio = None if method == "full" else 0.5
    progress = tqdm(disable=True)
    with torch.enable_grad():
        row = runner._qa(
            model, tokenizer, task, samples, method, None, ratio, kwargs, ("leak",), 1, False, None, progress
        )
    gc.collect()
    recordings = {id(batch.recording.cache) for batch in runner._recordings[("leak",)]}
    alive = [cache for ref in made if (cache := ref()) is not None and id(cache) not in recordings]
    runner._recordings.clear()
    assert len(made) > len(recordings) and row["kv_bytes"] > 0
    assert alive == []


def test_chunked_nll_without_compression_matches_one_forward():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(0))
    losses, sizes = chunked_nll(model, kvtune.new_cache(model), ids, chunk=16)
    with torch.no_grad():
        logits = model(ids).logits
    reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(2, 69)
    assert torch.allclose(losses, reference, atol=1e-5)
    assert sizes.shape == (5,) and bool((sizes[1:] >= sizes[:-1]).all())


def test_chunked_perplexity_compresses_between_chunks():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 96), generator=torch.Generator().manual_seed(1))
    cache = kvtune.new_cache(model, kvtune.methods.build("streaming_llm", budget=20))
    _, sizes = chunked_nll(model, cache, ids, chunk=16)
    # a bounded cache once the budget is reached: storage (spare capacity and lazily evicted slots included) stops
    # growing with the text
    assert max(sizes[4:]) <= max(sizes[2:4])
    assert all(n == 20 for lengths in cache.lengths() for n in lengths.flatten().tolist())


def _compose(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


def test_eval_job_writes_rows_table_and_plot(embedded, tmp_path):
    overrides = ["task=passkey", "context_length=512", "samples=2", "batch_size=2", "budget=64"]
    for method in ("full", "streaming_llm", "snapkv"):
        run_eval_job(_compose([*overrides, f"method={method}"]), tmp_path)
    rows = read_rows(tmp_path)
    assert len(rows) == 3 and all(FIELDS <= set(r) for r in rows)
    again = run_eval_job(_compose([*overrides, "method=snapkv"]), tmp_path / "again")
    first = next(r for r in rows if r["method"] == "snapkv")
    assert (again["score"], again["answer_nll"], again["kv_bytes"]) == (
        first["score"],
        first["answer_nll"],
        first["kv_bytes"],
    )
    table = (tmp_path / "results.md").read_text()
    assert "| snapkv |" in table and "budget 64" in table
    assert (tmp_path / "results.png").stat().st_size > 10_000


def test_eval_config_rejects_unknown_keys_and_task_options(tmp_path):
    with pytest.raises(Exception, match="budgt"):
        _compose(["budgt=64"])
    with pytest.raises(ValueError, match="rejected its options"):
        run_eval_job(_compose(["+task.haystak=natural"]), tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        build_task("needle_in_a_haystak")


@pytest.mark.slow
def test_cli_multirun_and_report(tmp_path, kvtune_cli):
    results, jobs = tmp_path / "results", tmp_path / "jobs"
    command = [
        sys.executable,
        "-m",
        "kvtune.cli",
        "eval",
        "task=passkey,perplexity",
        "method=full,snapkv",
        "budget=64",
        "context_length=600",
        "samples=2",
        "batch_size=2",
        f"results_dir={results}",
        f"hydra.sweep.dir={jobs}",
        "-m",
    ]
    subprocess.run(command, check=True, capture_output=True)
    # results only: Hydra's job folders and logs stay in the sweep directory
    assert {p.name for p in results.iterdir()} == {"results.jsonl", "samples.jsonl", "results.md", "results.png"}
    assert (jobs / "0" / ".hydra").is_dir()
    samples = [json.loads(line) for line in (results / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and {(s["task"], s["method"], s["sample"]) for s in samples} == {
        (t, m, i) for t in ("passkey", "perplexity") for m in ("full", "snapkv") for i in (0, 1)
    }
    rows = read_rows(results)
    assert {(r["task"], r["method"]) for r in rows} == {
        (t, m) for t in ("passkey", "perplexity") for m in ("full", "snapkv")
    }
    perplexity = {r["method"]: r for r in rows if r["task"] == "perplexity"}
    assert perplexity["full"]["score"] == pytest.approx(math.exp(perplexity["full"]["answer_nll"]))
    assert perplexity["snapkv"]["kv_bytes"] < perplexity["full"]["kv_bytes"]
    (results / "results.png").unlink()
    status, out, _ = kvtune_cli(["report", str(results)])
    assert status == 0 and "perplexity" in out and (results / "results.png").exists()
    assert all(json.loads(line) for line in (results / "results.jsonl").read_text().splitlines())


def test_bench_measures_the_cache_it_keeps():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 128), generator=torch.Generator().manual_seed(2))
    full = measure(model, ids, "full", None, decode_tokens=4)
    compressed = measure(model, ids, "adakv_snapkv", 32, decode_tokens=4)
    assert compressed["kv_bytes"] <= 1.1 * 32 / 128 * full["kv_bytes"]
    assert full["decode_tok_s"] > 0 and 0 <= compressed["overhead_pct"] <= 100


def test_bench_ratios_come_from_each_groups_full_and_reference():
    def row(method, budget, length, prefill, decode, kv, peak=100):
        return dict(method=method, budget=budget, context_length=length, batch_size=1, prefill_s=prefill,
                    decode_tok_s=decode, kv_bytes=kv, peak_bytes=peak)  # fmt: skip

    early = row("snapkv", 8, 64, 1.0, 1.0, 1)  # measured before any `full`: no ratios to give it
    rows = [early, row("full", None, 64, 2.0, 4.0, 64), row("reference", 8, 8, 0.5, 10.0, 8),
            row("snapkv", 8, 64, 3.0, 9.0, 8, peak=50), row("full", None, 128, 4.0, 2.0, 128),
            row("snapkv", 8, 128, 4.0, 5.0, 8)]  # fmt: skip
    table = with_ratios(rows)
    assert [r["method"] for r in table] == ["full", "reference", "snapkv", "full", "snapkv"]
    snapkv = table[2]
    assert (snapkv["prefill_ratio"], snapkv["decode_ratio"], snapkv["decode_vs_reference"]) == (1.5, 2.25, 0.9)
    assert (snapkv["kv_ratio"], snapkv["peak_ratio"]) == (0.125, 0.5)
    assert table[4]["decode_vs_reference"] is None and table[4]["prefill_ratio"] == 1.0  # no reference there
    assert "prefill_ratio" not in early  # copies: the measured rows stay raw
