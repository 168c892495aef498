"""LongBench's per-dataset metrics, reimplemented from their definitions so that scores compare with published ones.

Every metric maps ``(prediction, ground_truth, **kw)`` to [0, 1]; `longbench_score` applies LongBench's protocol on
top (first line only for the few-shot datasets, best score over the gold answers). Two approximations, both free of
extra dependencies: Chinese text is split into characters (latin words and numbers kept whole) where LongBench uses
jieba's word segmentation, and Rouge-L is the plain F1 of the longest common subsequence of tokens.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

Metric = Callable[..., float]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ZH_TOKEN = re.compile(r"[A-Za-z0-9]+|\S")
_NUMBER = re.compile(r"\d+")


def _normalize_en(text: str) -> str:
    """SQuAD-style normalisation: lowercase, no punctuation or articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _is_punctuation(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def _zh_tokens(text: str) -> list[str]:
    """Characters of Chinese text, with runs of latin letters or digits kept as one token each."""
    return _ZH_TOKEN.findall(text.lower())


def _token_f1(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence (one-row dynamic programme, O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(row[j], row[j - 1])
            diagonal = above
    return row[-1]


def _lcs_f1(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    common = lcs_length(prediction, ground_truth)
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Bag-of-words F1 after normalisation: partial credit for answers phrased differently from the gold."""
    return _token_f1(_normalize_en(prediction).split(), _normalize_en(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """`qa_f1_score` for Chinese, on character tokens without punctuation."""

    def tokens(text: str) -> list[str]:
        return [t for t in _zh_tokens(text) if not _is_punctuation(t)]

    return _token_f1(tokens(prediction), tokens(ground_truth))


def rouge_l_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Rouge-L F1 on whitespace tokens; periods separate tokens as in the `rouge` package LongBench calls."""
    return _lcs_f1(prediction.replace(".", " ").split(), ground_truth.replace(".", " ").split())


def rouge_l_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Rouge-L F1 on Chinese character tokens."""
    return _lcs_f1(_zh_tokens(prediction), _zh_tokens(ground_truth))


def classification_score(
    prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None, **_: Any
) -> float:
    """Credit split between the class names the prediction mentions, so that listing every class earns little.

    Names that are mere substrings of the gold name (``"city"`` in ``"other city"``) do not count as mentions.
    """
    if all_classes is None:
        raise ValueError("classification_score needs all_classes, the dataset's class names")
    mentioned = [c for c in all_classes if c in prediction and (c == ground_truth or c not in ground_truth)]
    return 1.0 / len(mentioned) if ground_truth in mentioned else 0.0


def _share_of_numbers(prediction: str, target: str) -> float:
    """Fraction of the numbers written in ``prediction`` that equal ``target`` (0 when it writes none)."""
    numbers = _NUMBER.findall(prediction)
    return numbers.count(target) / len(numbers) if numbers else 0.0


def count_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """passage_count: the share of numbers in the prediction that are the gold count."""
    return _share_of_numbers(prediction, ground_truth.strip())


def _retrieval(pattern: str, prediction: str, ground_truth: str) -> float:
    found = re.search(pattern, ground_truth)
    if found is None:
        raise ValueError(f"gold answer {ground_truth!r} names no paragraph")
    return _share_of_numbers(prediction, found.group(1))


def retrieval_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """passage_retrieval_en: the share of numbers in the prediction that are the gold paragraph's."""
    return _retrieval(r"Paragraph (\d+)", prediction, ground_truth)


def retrieval_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """passage_retrieval_zh: as `retrieval_score`, with gold answers like ``段落3``."""
    return _retrieval(r"段落(\d+)", prediction, ground_truth)


def code_sim_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Edit similarity of the first code line of the prediction to the gold line, in whole percent.

    Lines holding a backtick, ``#`` or ``//`` are skipped as chatter or comments. The similarity is the Indel
    ratio ``2 * LCS / (len(a) + len(b))``, rounded to a percent like fuzzywuzzy's ``fuzz.ratio``.
    """
    lines = prediction.lstrip("\n").split("\n")
    line = next((x for x in lines if "`" not in x and "#" not in x and "//" not in x), "")
    if not line or not ground_truth:
        return 0.0
    return round(200 * lcs_length(line, ground_truth) / (len(line) + len(ground_truth))) / 100


DATASET_METRIC: dict[str, Metric] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_l_zh_score,
    "gov_report": rouge_l_score,
    "qmsum": rouge_l_score,
    "multi_news": rouge_l_score,
    "vcsum": rouge_l_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_l_score,
    "lsht": classification_score,
    "passage_count": count_score,
    "passage_retrieval_en": retrieval_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}

# Few-shot prompts invite the model to continue with further examples: LongBench scores the first line only.
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def best_over_answers(metric: Metric, prediction: str, answers: Sequence[str], **kw: Any) -> float:
    """The best score over the gold answers: any one of them is a right answer (0 when there are none)."""
    return max((metric(prediction, answer, **kw) for answer in answers), default=0.0)


def longbench_score(
    dataset: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None = None
) -> float:
    """A prediction's score on a LongBench dataset, with LongBench's post-processing."""
    if dataset not in DATASET_METRIC:
        raise ValueError(f"unknown LongBench dataset {dataset!r}; known: {', '.join(sorted(DATASET_METRIC))}")
    if dataset in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return best_over_answers(DATASET_METRIC[dataset], prediction, answers, all_classes=all_classes)
