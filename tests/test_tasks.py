"""Task generators: lengths on target, needles where the sample says, deterministic seeds, metrics that separate
right from wrong answers."""

from __future__ import annotations

import pytest

from kvtune.eval.tasks import build_task, prompt_tokens

SYNTHETIC = [
    ("passkey", {}),
    ("niah_single", {}),
    ("niah_single", {"haystack": "natural"}),
    ("niah_multikey", {}),
    ("niah_multivalue", {"haystack": "natural"}),
    ("niah_multiquery", {}),
    ("variable_tracking", {}),
    ("common_words", {}),
    ("frequent_words", {}),
]


@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.parametrize(("name", "options"), SYNTHETIC)
def test_lengths_land_within_two_percent(embedded_tokenizer, name, options, length):
    for sample in build_task(name, **options).samples(embedded_tokenizer, length, 3, seed=0):
        assert abs(prompt_tokens(embedded_tokenizer, sample) - length) <= 0.02 * length


@pytest.mark.parametrize(("name", "options"), SYNTHETIC)
def test_same_seed_same_samples_and_gold_scores_one(embedded_tokenizer, name, options):
    task = build_task(name, **options)
    first, again = task.samples(embedded_tokenizer, 1024, 2, 0), task.samples(embedded_tokenizer, 1024, 2, 0)
    other = task.samples(embedded_tokenizer, 1024, 2, 1)
    assert [s.context for s in first] == [s.context for s in again]
    assert [s.answers for s in first] != [s.answers for s in other]
    for sample in first:
        assert task.score(sample.answers[0], sample) == 1.0
        assert task.score(" I do not know.", sample) == 0.0


@pytest.mark.parametrize(
    ("name", "options"), [s for s in SYNTHETIC if s[0].startswith("niah") or s[0] == "variable_tracking"]
)
def test_needles_are_where_the_sample_says(embedded_tokenizer, name, options):
    for sample in build_task(name, **options).samples(embedded_tokenizer, 2048, 3, seed=4):
        spans = sample.meta["needles"]
        assert spans and all(span is not None for span in spans)
        texts = [sample.context[start:end] for start, end in spans]
        assert all(v in "".join(texts) for v in sample.meta["values"])
        for (start, _), depth in zip(spans, sample.meta["depths"]):
            assert abs(start / len(sample.context) - depth) < 0.05  # character depth tracks the requested depth


def test_passkey_depths_spread_evenly(embedded_tokenizer):
    samples = build_task("passkey").samples(embedded_tokenizer, 2048, 5, seed=0)
    for index, sample in enumerate(samples):
        start, end = sample.meta["needle"]
        assert str(sample.meta["key"]) in sample.context[start:end]
        assert abs(start / len(sample.context) - (index + 0.5) / 5) < 0.05


def test_multi_value_answers_earn_partial_credit(embedded_tokenizer):
    task = build_task("niah_multivalue")
    sample = task.samples(embedded_tokenizer, 1024, 1, 0)[0]
    values = sample.meta["values"]
    assert len(values) == 4
    assert task.score(f" {values[0]} and {values[2]}", sample) == 0.5


def test_frequent_words_gold_really_is_most_frequent(embedded_tokenizer):
    sample = build_task("frequent_words").samples(embedded_tokenizer, 2048, 1, 0)[0]
    words = sample.context.removeprefix("Coded text: ").rstrip(".").split(" ... ")
    ranked = sorted(set(words), key=words.count, reverse=True)
    assert ranked[:3] == sample.meta["values"]


def test_unknown_haystack_is_refused(embedded_tokenizer):
    with pytest.raises(ValueError, match="haystack"):
        build_task("niah_single", haystack="lorem").samples(embedded_tokenizer, 1024, 1, 0)
