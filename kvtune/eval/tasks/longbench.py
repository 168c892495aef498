"""`longbench`: LongBench's real-document tasks (QA, summarisation, few-shot, synthetic, code) with its metrics.

Rows come from LongBench's jsonl files (``{data_dir}/{subset}.jsonl``, fields ``input, context, answers, length,
dataset, language, all_classes, _id``) or from the hub. Prompts follow LongBench's layout in our own words: the
document first, then the instruction and question, then an answer prefix. A document too long for
``context_length`` is cut in the middle, keeping its head and tail, as LongBench does; shorter ones stay as they
are, so prompts are at most ``context_length`` tokens. Sample ``i`` of seed ``s`` is row ``(s * n + i) mod rows``
in file order: seeds pick consecutive, disjoint blocks of rows (never more samples than the file has rows).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from kvtune.eval.metrics import DATASET_METRIC, longbench_score
from kvtune.eval.tasks.base import Sample, prompt_tokens, register_task


@dataclass(frozen=True)
class Template:
    """How a row becomes ``context + question + answer_prefix``.

    The context is ``head + document + tail`` (the document alone is truncated); ``question`` is formatted with the
    row's ``input``. ``lead`` starts the teacher-forced gold answer: a space after ``Answer:``, nothing after a
    newline or in Chinese. Code rows join ``input`` (the file being completed) to the document, as it is long.
    """

    head: str
    tail: str
    question: str
    prefix: str
    lead: str = " "
    input_in_document: bool = False


_BRIEF = "as briefly as you can, in a word or a short phrase where possible, without explanation"
_PASSAGES = Template(
    "The passages below may help you answer a question.\n\n",
    "\n\n",
    "Using the passages above, answer the question with the answer alone and no other words.\n\nQuestion: {input}",
    "\nAnswer:",
)
_ZH_QA = Template(
    "阅读下面的文字，然后用中文简短回答后面的问题。\n\n",
    "\n\n",
    "请根据上面的文字回答问题，只给出答案，不要输出其他内容。\n\n问题：{input}",
    "\n回答：",
    lead="",
)

TEMPLATES: dict[str, Template] = {
    "narrativeqa": Template(
        "Read the story below (a novel or a movie script), then answer the question that follows it.\n\nStory: ",
        "\n\n",
        f"Answer the question about the story above {_BRIEF}.\n\nQuestion: {{input}}",
        "\nAnswer:",
    ),
    "qasper": Template(
        "Read the scientific article below, then answer the question that follows it.\n\nArticle: ",
        "\n\n",
        f"Answer the question about the article above {_BRIEF}. If the article does not answer it, write "
        '"unanswerable"; answer a yes/no question with "yes", "no" or "unanswerable".\n\nQuestion: {input}',
        "\nAnswer:",
    ),
    "multifieldqa_en": Template(
        "Read the text below, then answer the question that follows it.\n\n",
        "\n\n",
        f"Answer the question about the text above {_BRIEF}.\n\nQuestion: {{input}}",
        "\nAnswer:",
    ),
    "multifieldqa_zh": _ZH_QA,
    "hotpotqa": _PASSAGES,
    "2wikimqa": _PASSAGES,
    "musique": _PASSAGES,
    "dureader": _ZH_QA,
    "gov_report": Template(
        "Below is a report by a government agency.\n\nReport:\n",
        "\n\n",
        "Write a one-page summary of the report above.",
        "\n\nSummary:",
    ),
    "qmsum": Template(
        "Below is a meeting transcript, followed by a query about it.\n\nTranscript:\n",
        "\n\n",
        "Answer the query about the transcript above in one or more sentences.\n\nQuery: {input}",
        "\nAnswer:",
    ),
    "multi_news": Template(
        "Below are several news articles.\n\nNews:\n",
        "\n\n",
        "Write a one-page summary of all the news above.",
        "\n\nSummary:",
    ),
    "vcsum": Template(
        "下面是一段会议记录。\n会议记录：\n",
        "\n\n",
        "请阅读上面的会议记录，写一段总结，概括会议的内容。",
        "\n会议总结：",
        lead="",
    ),
    # Few-shot rows: the context holds solved examples and ``input`` ends with the answer's label ("Type:" ...).
    "trec": Template("Classify the type of the last question. Solved examples come first.\n\n", "\n", "{input}", ""),
    "triviaqa": Template(
        "Answer the question about its passage with the answer alone. Solved examples come first.\n\n",
        "\n\n",
        "{input}",
        "",
    ),
    "samsum": Template(
        "Summarize the dialogue in a few short sentences. Solved examples come first.\n\n", "\n\n", "{input}", ""
    ),
    "lsht": Template("判断最后一条新闻的类别。前面是一些已分类的例子。\n\n", "\n", "{input}", "", lead=""),
    "passage_count": Template(
        "Below are paragraphs from Wikipedia; some may be duplicates of others.\n\n",
        "\n\n",
        "How many unique paragraphs are there above once duplicates are removed? Reply with the number alone, "
        "such as 1, 2 or 3.",
        "\nThe final answer is:",
    ),
    "passage_retrieval_en": Template(
        "Below are paragraphs from Wikipedia, then an abstract of one of them.\n\n",
        "\n\n",
        'The abstract:\n\n{input}\n\nWhich paragraph above is the abstract from? Answer like "Paragraph 1" or '
        '"Paragraph 2".',
        "\nThe answer is:",
    ),
    "passage_retrieval_zh": Template(
        "下面是若干段落，之后是其中一段的摘要。\n\n",
        "\n\n",
        '摘要：\n\n{input}\n\n这段摘要出自上面哪一段？请按"段落1"、"段落2"的格式回答。',
        "\n答案是：",
        lead="",
    ),
    "lcc": Template("Complete the code below.\n", "", "Next line of code:", "\n", lead="", input_in_document=True),
    "repobench-p": Template(
        "Complete the code below.\n", "", "Next line of code:", "\n", lead="", input_in_document=True
    ),
}

# Longest answer worth generating per dataset, in tokens (LongBench's generation limits).
MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "multifieldqa_zh": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "dureader": 128,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "vcsum": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "lsht": 64,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "passage_retrieval_zh": 32,
    "lcc": 64,
    "repobench-p": 64,
}


def load_rows(subset: str, data_dir: str | None = None, hub_id: str = "THUDM/LongBench") -> list[dict[str, Any]]:
    """LongBench's rows of ``subset`` in file order, from ``data_dir`` when given, else from the hub."""
    if data_dir is not None:
        path = Path(data_dir) / f"{subset}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"no LongBench file {path}: data_dir must hold LongBench's {subset}.jsonl")
        with path.open(encoding="utf-8") as lines:
            return [json.loads(line) for line in lines if line.strip()]
    try:
        import datasets  # deferred: only the hub path needs it

        return [dict(row) for row in datasets.load_dataset(hub_id, subset, split="test")]
    except Exception as error:  # offline, missing subset, or a datasets release that refuses the loading script
        raise RuntimeError(
            f"could not load LongBench subset {subset!r} from the hub ({hub_id}): {error}. Download LongBench's "
            "data (its jsonl files) and pass data_dir= pointing at the folder that holds them."
        ) from error


def _middle_cut(tokenizer: PreTrainedTokenizerBase, ids: list[int], keep: int) -> str:
    """The text of ``ids`` without its middle: the first and last halves of ``keep`` tokens."""
    head = (keep + 1) // 2
    return tokenizer.decode(ids[:head]) + tokenizer.decode(ids[len(ids) - (keep - head) :])


@register_task("longbench")
class LongBench:
    """One LongBench dataset (``subset``, e.g. ``"qasper"``; ``"qasper_e"`` for LongBench-E), scored as LongBench."""

    def __init__(self, subset: str = "narrativeqa", data_dir: str | None = None, hub_id: str = "THUDM/LongBench"):
        dataset = subset.removesuffix("_e")
        if dataset not in DATASET_METRIC:
            raise ValueError(f"unknown LongBench subset {subset!r}; known: {', '.join(sorted(DATASET_METRIC))}")
        self.subset, self.dataset, self.data_dir, self.hub_id = subset, dataset, data_dir, hub_id
        self.name = f"longbench/{subset}"
        self.max_new_tokens = MAX_NEW_TOKENS[dataset]
        self.template = TEMPLATES[dataset]
        self._rows: list[dict[str, Any]] | None = None

    def rows(self) -> list[dict[str, Any]]:
        """The subset's rows, read once."""
        if self._rows is None:
            self._rows = load_rows(self.subset, self.data_dir, self.hub_id)
            if not self._rows:
                raise ValueError(f"LongBench subset {self.subset!r} has no rows")
        return self._rows

    def sample(self, tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], context_length: int) -> Sample:
        """``row`` as a prompt of at most ``context_length`` tokens, its document cut in the middle if needed."""
        t = self.template
        document, question = row["context"], t.question.format(input=row["input"])
        if t.input_in_document:
            document += row["input"]
        answers = [str(a) for a in row["answers"]]
        meta = {
            "dataset": row["dataset"],
            "_id": row["_id"],
            "answers": answers,
            "all_classes": row.get("all_classes"),
            "truncated": False,
        }
        sample = Sample(t.head + document + t.tail, question, t.prefix, [t.lead + answers[0]], meta)
        ids = tokenizer(document, add_special_tokens=False).input_ids
        keep = len(ids)
        # Re-tokenising at the cut can shift the count by a token or two: shrink until the prompt fits.
        while (excess := prompt_tokens(tokenizer, sample) - context_length) > 0:
            if keep == 0:
                raise ValueError(
                    f"{self.name} row {row['_id']}: the prompt without its document is {excess} tokens over "
                    f"context_length={context_length}"
                )
            keep = max(0, keep - excess)
            sample.context = t.head + _middle_cut(tokenizer, ids, keep) + t.tail
            meta["truncated"] = True
        return sample

    def samples(self, tokenizer: PreTrainedTokenizerBase, context_length: int, n: int, seed: int) -> list[Sample]:
        rows = self.rows()
        start = seed * n
        return [self.sample(tokenizer, rows[(start + i) % len(rows)], context_length) for i in range(min(n, len(rows)))]

    def score(self, prediction: str, sample: Sample) -> float:
        return longbench_score(self.dataset, prediction, sample.meta["answers"], sample.meta["all_classes"])
