"""Task generators: prompts on the target length, needles where the sample says, deterministic seeds, and metrics
that give gold answers 1, wrong ones 0 and partial ones their share."""

from __future__ import annotations

import re
from collections import Counter
from functools import cache

import pytest

from kvtune.eval.corpus import corpus_text
from kvtune.eval.tasks import available_tasks, build_task, prompt_tokens
from kvtune.eval.tasks.haystack import NOISE_SENTENCES, fit_count
from kvtune.eval.tasks.niah import magic_needle, string_match_all
from kvtune.eval.tasks.passkey import passkey_context, passkey_needle
from kvtune.eval.tasks.variable_tracking import chain_statements
from kvtune.eval.tasks.words import WORDS

NEEDLE_TASKS = ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking"]
HAYSTACK_TASKS = [
    (name, haystack)
    for name in NEEDLE_TASKS
    for haystack in ("noise", "natural")
    if (name, haystack) != ("passkey", "natural")
]  # passkey keeps the classic repeated filler
ALL_TASKS = HAYSTACK_TASKS + [("common_words", None), ("frequent_words", None)]


@cache
def generate(tokenizer, name: str, haystack: str | None, length: int, n: int, seed: int) -> tuple:
    """Samples of a task, built once per set of arguments (the tests only read them)."""
    options = {} if haystack is None else {"haystack": haystack}
    return tuple(build_task(name, **options).samples(tokenizer, length, n, seed))


def test_every_task_is_registered():
    assert {name for name, _ in ALL_TASKS} <= set(available_tasks())


def test_vocabulary_words_are_distinct():
    assert len(WORDS) == len(set(WORDS)) > 400


@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.parametrize(("name", "haystack"), ALL_TASKS)
def test_prompts_land_within_two_percent(embedded_tokenizer, name, haystack, length):
    for sample in generate(embedded_tokenizer, name, haystack, length, 3, 0):
        assert abs(prompt_tokens(embedded_tokenizer, sample) - length) <= 0.02 * length


@pytest.mark.parametrize(("name", "haystack"), ALL_TASKS)
def test_same_seed_same_samples_other_seed_other_samples(embedded_tokenizer, name, haystack):
    options = {} if haystack is None else {"haystack": haystack}
    first = generate(embedded_tokenizer, name, haystack, 1024, 3, 0)
    again = build_task(name, **options).samples(embedded_tokenizer, 1024, 3, 0)
    other = generate(embedded_tokenizer, name, haystack, 1024, 3, 1)
    assert list(first) == again
    assert all(a.context != b.context and a.answers != b.answers for a, b in zip(first, other))
    assert len({s.answers[0] for s in first}) == 3  # samples of one seed differ too


@pytest.mark.parametrize(("name", "haystack"), HAYSTACK_TASKS)
def test_needles_sit_at_their_spans_and_depths(embedded_tokenizer, name, haystack):
    for sample in generate(embedded_tokenizer, name, haystack, 4096, 3, 0):
        spans, depths = sample.meta["needles"], sample.meta["depths"]
        assert len(spans) == len(depths) > 0
        for (start, end), depth in zip(spans, depths):
            assert 0 < start < end < len(sample.context)
            assert abs(start / len(sample.context) - depth) < 0.02
        ordered = sorted(spans)
        assert all(a_end < b_start for (_, a_end), (b_start, _) in zip(ordered, ordered[1:]))
        texts = [sample.context[start:end] for start, end in spans]
        if name == "passkey":
            assert texts == [passkey_needle(sample.meta["key"])]
        elif name == "variable_tracking":
            assert texts == chain_statements(sample.meta["values"], sample.meta["value"])
        else:
            assert texts == [magic_needle(key, value) for key, value in sample.meta["pairs"]]
            assert all(key in sample.question and key in sample.answer_prefix for key in sample.meta["keys"])


def test_passkey_depths_spread_evenly(embedded_tokenizer):
    samples = generate(embedded_tokenizer, "passkey", "noise", 4096, 3, 0)
    assert [s.meta["depths"] for s in samples] == [[1 / 6], [3 / 6], [5 / 6]]
    assert len({s.meta["key"] for s in samples}) == 3 and all(10_000 <= s.meta["key"] < 100_000 for s in samples)


def test_passkey_context_of_fixed_size_holds_the_key():
    context, (start, end) = passkey_context(repeats=40, key=70521, depth=0.4)
    assert context[start:end] == passkey_needle(70521)
    assert abs(start / len(context) - 0.4) < 0.02
    assert context.count(NOISE_SENTENCES[0]) == 40


def test_natural_haystack_is_a_window_of_the_corpus(embedded_tokenizer):
    corpus = corpus_text()
    windows = set()
    for sample in generate(embedded_tokenizer, "niah_single", "natural", 4096, 3, 0):
        (start, end), intro = sample.meta["needles"][0], sample.context.index("\n") + 1
        before, after = sample.context[intro:start], sample.context[end + 1 :]
        assert before + after in corpus  # the needle went in at a line or sentence break
        assert sample.context[end] == ("\n" if before.endswith("\n") else " ")
        windows.add(after)
    assert len(windows) == 3


def test_multi_needle_tasks_hide_what_they_ask(embedded_tokenizer):
    multikey = generate(embedded_tokenizer, "niah_multikey", "noise", 1024, 3, 0)
    assert all(len(s.meta["pairs"]) == 4 and len({k for k, _ in s.meta["pairs"]}) == 4 for s in multikey)
    multivalue = generate(embedded_tokenizer, "niah_multivalue", "noise", 1024, 3, 0)
    assert all({k for k, _ in s.meta["pairs"]} == set(s.meta["keys"]) for s in multivalue)
    assert all(len(s.meta["values"]) == 4 for s in multivalue)
    multiquery = generate(embedded_tokenizer, "niah_multiquery", "noise", 1024, 3, 0)
    assert all(len(s.meta["keys"]) == 4 == len(s.meta["values"]) for s in multiquery)
    tracking = generate(embedded_tokenizer, "variable_tracking", "noise", 1024, 3, 0)
    assert all(f"5 variables are assigned the value {s.meta['value']}" in s.answer_prefix for s in tracking)


@pytest.mark.parametrize(("name", "haystack"), ALL_TASKS)
def test_gold_scores_one_and_wrong_answers_zero(embedded_tokenizer, name, haystack):
    task = build_task(name)
    samples = generate(embedded_tokenizer, name, haystack, 1024, 3, 0)
    for sample, other in zip(samples, generate(embedded_tokenizer, name, haystack, 1024, 3, 1)):
        assert sample.answers[0].startswith(" ")
        assert task.score(sample.answers[0], sample) == 1.0
        assert task.score(" I do not know.", sample) == 0.0
        if name in NEEDLE_TASKS:  # another sample's answer: the same shape, other values
            assert task.score(other.answers[0], sample) == 0.0


def test_distractors_earn_nothing(embedded_tokenizer):
    task = build_task("niah_multikey")
    for sample in generate(embedded_tokenizer, "niah_multikey", "noise", 1024, 3, 0):
        decoys = [value for _, value in sample.meta["pairs"][1:]]
        assert task.score(" " + ", ".join(decoys) + ".", sample) == 0.0


@pytest.mark.parametrize(
    ("name", "kept", "expected"),
    [
        ("niah_multivalue", [0, 2], 0.5),
        ("niah_multiquery", [3], 0.25),
        ("variable_tracking", [0, 1], 0.4),
        ("common_words", [1, 4, 7], 0.3),
        ("frequent_words", [0, 2], 2 / 3),
    ],
)
def test_partial_answers_earn_their_share(embedded_tokenizer, name, kept, expected):
    task = build_task(name)
    haystack = "noise" if name in NEEDLE_TASKS else None
    sample = generate(embedded_tokenizer, name, haystack, 1024, 3, 0)[0]
    answer = " " + ", ".join(sample.meta["values"][i] for i in kept)
    assert task.score(answer, sample) == pytest.approx(expected)


def test_string_match_all_wants_whole_words():
    assert string_match_all(" 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert string_match_all(" 91234567, 12345678", ["1234567"]) == 0.0
    assert string_match_all(" Pineapple, TIGER", ["apple", "tiger"]) == 0.5


def list_words(context: str) -> list[str]:
    return re.findall(r"\d+\. ([a-z]+)", context)


def test_common_words_are_the_most_common(embedded_tokenizer):
    task = build_task("common_words")
    for sample in generate(embedded_tokenizer, "common_words", None, 4096, 3, 0):
        counts = Counter(list_words(sample.context))
        assert sum(counts.values()) == len(re.findall(r"\d+\. ", sample.context))
        assert {counts[w] for w in sample.meta["values"]} == {sample.meta["frequency"]} == {20}
        assert max(c for w, c in counts.items() if w not in sample.meta["values"]) <= 3
        assert task.score(" " + ", ".join(w for w in counts if w not in sample.meta["values"]), sample) == 0.0


def test_frequent_words_are_strictly_the_most_frequent(embedded_tokenizer):
    task = build_task("frequent_words")
    for sample in generate(embedded_tokenizer, "frequent_words", None, 4096, 3, 0):
        words = sample.context.split("\n", 1)[1].split(" ... ")
        ranked = Counter(words).most_common()
        assert [w for w, _ in ranked[:3]] == sample.meta["values"]
        assert ranked[2][1] > ranked[3][1]
        assert all(re.fullmatch(r"[a-z]{3}", w) for w in words)
        assert task.score(" " + ", ".join(w for w, _ in ranked[3:13]), sample) == 0.0


def test_fit_count_finds_the_nearest_length_and_refuses_misses():
    assert fit_count(lambda count: 7 * count + 3, 700, low=1, guess=5) == 100
    assert fit_count(lambda count: 7 * count + 3, 705, low=1, guess=500) == 100
    with pytest.raises(ValueError, match="cannot fit"):
        fit_count(lambda count: 1000 * count, 1500, low=1, guess=1)


def test_bad_options_are_refused(embedded_tokenizer):
    with pytest.raises(ValueError, match="haystack"):
        build_task("niah_single", haystack="lorem").samples(embedded_tokenizer, 1024, 1, 0)
    with pytest.raises(ValueError, match="cannot fit"):
        build_task("niah_multiquery").samples(embedded_tokenizer, 60, 1, 0)
    with pytest.raises(ValueError, match="common_freq"):
        build_task("common_words", common_freq=3, rare_freq=3)


def test_training_text_is_held_out_from_evaluation_text():
    from kvtune.eval.corpus import corpus_documents

    train, evaluation = set(corpus_documents("stdlib_train")), set(corpus_documents("stdlib"))
    assert len(train) == 20 and len(evaluation) == 16 and not train & evaluation


def test_continuation_splits_a_corpus_window_into_context_and_answer(embedded_tokenizer):
    task = build_task("continuation", continuation=64)
    samples = task.samples(embedded_tokenizer, 1024, 3, seed=0)
    windows = build_task("perplexity").samples(embedded_tokenizer, 1024, 3, seed=0)
    for sample, window in zip(samples, windows):
        assert sample.context + sample.answers[0] == window.context  # the answer is what follows the context
        assert abs(len(embedded_tokenizer(sample.answers[0], add_special_tokens=False).input_ids) - 64) <= 2
        assert abs(prompt_tokens(embedded_tokenizer, sample) - (1024 - 64)) <= 0.02 * 1024
        words = sample.answers[0].split()
        assert task.score(sample.answers[0], sample) == 1.0
        assert task.score(" ".join(words[:2] + ["\x00"]), sample) == pytest.approx(2 / 5)
        assert task.score(" I do not know.", sample) == 0.0
    with pytest.raises(ValueError, match="twice the continuation"):
        task.samples(embedded_tokenizer, 100, 1, seed=0)
