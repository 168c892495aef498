"""LongBench: the jsonl loader and prompt layout on a tiny fixture, and every metric on cases worked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from kvtune.eval.metrics import (
    DATASET_METRIC,
    best_over_answers,
    classification_score,
    code_sim_score,
    count_score,
    lcs_length,
    longbench_score,
    qa_f1_score,
    qa_f1_zh_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_l_score,
    rouge_l_zh_score,
)
from kvtune.eval.tasks import build_task, prompt_tokens
from kvtune.eval.tasks.longbench import MAX_NEW_TOKENS, TEMPLATES, LongBench

FIXTURES = Path(__file__).parent / "fixtures" / "longbench"


def _rows(subset: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / f"{subset}.jsonl").read_text(encoding="utf-8").splitlines()]


# Loader and prompts


def test_samples_keep_the_rows_fields_and_answers(embedded_tokenizer):
    task = build_task("longbench", subset="qasper", data_dir=str(FIXTURES))
    rows, template = _rows("qasper"), TEMPLATES["qasper"]
    items = task.samples(embedded_tokenizer, 4096, 3, 0)
    assert task.name == "longbench/qasper" and task.max_new_tokens == 128
    assert [s.meta["_id"] for s in items] == ["q-001", "q-002", "q-003"]
    for sample, row in zip(items, rows):
        assert sample.context == template.head + row["context"] + template.tail  # short enough: left whole
        assert sample.question.endswith("Question: " + row["input"]) and sample.answer_prefix == "\nAnswer:"
        assert sample.answers == [" " + row["answers"][0]] and sample.meta["answers"] == row["answers"]
        assert sample.meta["dataset"] == "qasper" and not sample.meta["truncated"]
        assert prompt_tokens(embedded_tokenizer, sample) <= 4096


def test_seed_picks_the_next_block_of_rows(embedded_tokenizer):
    task = LongBench("qasper", data_dir=str(FIXTURES))
    # seed 1, n 2 starts at row 2 and wraps around to row 0.
    assert [s.meta["_id"] for s in task.samples(embedded_tokenizer, 4096, 2, 1)] == ["q-003", "q-001"]
    assert len(task.samples(embedded_tokenizer, 4096, 10, 0)) == 3  # never more samples than rows


def test_long_document_is_cut_in_the_middle(embedded_tokenizer):
    task = LongBench("qasper", data_dir=str(FIXTURES))
    full = task.samples(embedded_tokenizer, 4096, 1, 0)[0]
    assert prompt_tokens(embedded_tokenizer, full) > 300
    sample = task.samples(embedded_tokenizer, 200, 1, 0)[0]
    assert sample.meta["truncated"] and 190 <= prompt_tokens(embedded_tokenizer, sample) <= 200
    head = TEMPLATES["qasper"].head
    assert sample.context.startswith(head + "Abstract. We study")  # the document's head ...
    assert sample.context.endswith("needs little data to adapt.\n\n")  # ... and tail are kept
    assert "Section 6." not in sample.context  # the middle is gone
    assert sample.question == full.question and sample.answers == full.answers


def test_prompt_without_room_for_the_document_fails(embedded_tokenizer):
    with pytest.raises(ValueError, match="over context_length=40"):
        LongBench("qasper", data_dir=str(FIXTURES)).samples(embedded_tokenizer, 40, 1, 0)


@pytest.mark.parametrize(
    ("subset", "wrong"),
    [
        ("qasper", "seven"),
        ("trec", "Individual"),
        ("passage_retrieval_en", "Paragraph 1"),
        ("lcc", "xyz()"),
        ("gov_report", "Zebras dance."),
    ],
)
def test_gold_scores_one_and_wrong_scores_zero(embedded_tokenizer, subset, wrong):
    task = LongBench(subset, data_dir=str(FIXTURES))
    sample = task.samples(embedded_tokenizer, 4096, 1, 0)[0]
    assert task.max_new_tokens == MAX_NEW_TOKENS[subset]
    assert task.score(sample.meta["answers"][0], sample) == 1.0
    assert task.score(wrong, sample) == 0.0


def test_code_and_few_shot_layouts(embedded_tokenizer):
    code = LongBench("lcc", data_dir=str(FIXTURES)).samples(embedded_tokenizer, 4096, 1, 0)[0]
    # After "Next line of code:\n" the gold line is its own continuation: no space is prepended.
    assert code.question + code.answer_prefix == "Next line of code:\n" and code.answers == ["    return a * b"]
    trec = LongBench("trec", data_dir=str(FIXTURES))
    sample = trec.samples(embedded_tokenizer, 4096, 1, 0)[0]
    assert sample.question.endswith("Type:") and sample.answers == [" City"]
    assert sample.meta["all_classes"][1] == "City"
    # Few-shot answers are scored on their first line: the model running on into another example costs nothing.
    assert trec.score("City\nQuestion: Who wrote Hamlet?\nType: Individual", sample) == 1.0


def test_configuration_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown LongBench subset"):
        LongBench("no_such_set")
    with pytest.raises(FileNotFoundError, match="musique.jsonl"):
        LongBench("musique", data_dir=str(FIXTURES)).rows()
    assert LongBench("qasper_e").dataset == "qasper"  # LongBench-E files share their dataset's metric

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="pass data_dir="):
        LongBench("qasper").rows()


# Metrics, with the arithmetic in the comments


def test_qa_f1():
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]: 2 shared, P = 2/2, R = 2/3, F1 = 0.8.
    assert qa_f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert qa_f1_score("The Cat!", "cat") == 1.0  # case, punctuation and articles do not count
    assert qa_f1_score("dog", "cat") == 0.0
    # Characters: 北京市 vs 北京 share 2; P = 2/3, R = 2/2, F1 = 2 * (2/3) / (5/3) = 0.8. Punctuation is dropped.
    assert qa_f1_zh_score("北京市。", "北京") == pytest.approx(0.8)


def test_rouge_l():
    # LCS "the cat on the mat" = 5 of 6 tokens on each side: P = R = F = 5/6.
    assert rouge_l_score("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    # LCS is 2 ("the gunman"): P = 2/4, R = 2/6, F1 = 2 * (1/2) * (1/3) / (5/6) = 0.4.
    assert rouge_l_score("police killed the gunman", "the gunman was killed by police") == pytest.approx(0.4)
    assert rouge_l_score("It works.", "It works") == 1.0  # periods separate tokens
    assert rouge_l_score("", "anything") == 0.0
    # Characters 会议讨论预算 vs 会议决定预算: LCS 会议预算 = 4 of 6 each side, F = 2/3.
    assert rouge_l_zh_score("会议讨论预算", "会议决定预算") == pytest.approx(2 / 3)
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # e.g. BCBA


def test_classification_partial_credit():
    classes = ["City", "Country", "Individual", "location", "Other location"]
    assert classification_score("City", "City", all_classes=classes) == 1.0
    assert classification_score("City or Country", "City", all_classes=classes) == 0.5  # two named, gold among them
    assert classification_score("City, Country or Individual", "City", all_classes=classes) == pytest.approx(1 / 3)
    assert classification_score("Country", "City", all_classes=classes) == 0.0
    # "location" is found too, but as part of the gold "Other location" it is not a second answer: 1/1.
    assert classification_score("Other location", "Other location", all_classes=classes) == 1.0
    with pytest.raises(ValueError, match="all_classes"):
        classification_score("City", "City")


def test_retrieval_and_count():
    assert retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert retrieval_score("Paragraph 3 or Paragraph 5", "Paragraph 3") == 0.5  # one of two numbers is right
    assert retrieval_score("Paragraph 13", "Paragraph 3") == 0.0  # whole numbers only
    assert retrieval_score("I cannot tell", "Paragraph 3") == 0.0  # no number at all
    assert retrieval_zh_score("段落2", "段落2") == 1.0
    assert count_score("There are 4 unique paragraphs.", "4") == 1.0
    assert count_score("4 or 5", "4") == 0.5
    assert count_score("five", "5") == 0.0


def test_code_similarity():
    # 12 characters each, LCS "return a " + " b" = 11: 2 * 11 / 24 = 0.9167, rounded to 92 percent.
    assert code_sim_score("return a + b", "return a * b") == 0.92
    # "x = 1" vs "y = 1": LCS " = 1" = 4 of 5 + 5 characters: 8 / 10.
    assert code_sim_score("x = 1", "y = 1") == 0.8
    assert code_sim_score("# multiply them\nreturn a + b", "return a * b") == 0.92  # comment lines are skipped
    assert code_sim_score("```python\nreturn a * b\n```", "return a * b") == 1.0  # so are markdown fences
    assert code_sim_score("", "return a * b") == 0.0


def test_protocol_helpers():
    assert set(DATASET_METRIC) == set(MAX_NEW_TOKENS) == set(TEMPLATES) and len(DATASET_METRIC) == 21
    assert best_over_answers(qa_f1_score, "twelve", ["12", "twelve"]) == 1.0  # any gold answer will do
    assert best_over_answers(qa_f1_score, "twelve", []) == 0.0
    assert longbench_score("triviaqa", "Paris\nQuestion: next one", ["Paris"]) == 1.0  # first line only
    # Other datasets score the whole answer: [paris, and, more] vs [paris], P = 1/3, R = 1, F1 = 0.5.
    assert longbench_score("narrativeqa", "Paris\nand more", ["Paris"]) == 0.5
    with pytest.raises(ValueError, match="unknown LongBench dataset"):
        longbench_score("nope", "x", ["x"])
