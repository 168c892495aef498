"""`passkey`: the classic retrieval probe, a 5-digit key stated once inside repeated filler.

Sample ``i`` of ``n`` puts the key at relative depth ``(i + 0.5) / n``, so depths spread evenly through the
context. The filler is fitted so that the whole prompt lands on ``context_length`` tokens of the model's tokenizer.
"""

from __future__ import annotations

import random

from transformers import PreTrainedTokenizerBase

from kvtune.eval.tasks.base import Sample, prompt_tokens, register_task

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there. "
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION, PREFIX = " What is the pass key?", " The pass key is"


def passkey_needle(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def passkey_context(repeats: int, key: int, depth: float) -> tuple[str, tuple[int, int]]:
    """Intro, ``repeats`` filler blocks, the needle after ``round(repeats * depth)`` of them; the needle's span."""
    at = round(repeats * depth)
    needle = passkey_needle(key)
    head = INTRO + FILLER * at
    return head + needle + FILLER * (repeats - at), (len(head), len(head) + len(needle))


@register_task("passkey")
class Passkey:
    name = "passkey"
    max_new_tokens = 8

    def __init__(self, haystack: str = "noise") -> None:
        if haystack != "noise":
            raise ValueError(
                "passkey keeps the classic repeated filler; for natural text use niah_single haystack=natural"
            )

    def samples(self, tokenizer: PreTrainedTokenizerBase, context_length: int, n: int, seed: int) -> list[Sample]:
        filler_tokens = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
        items = []
        for i in range(n):
            key = random.Random(seed * 100_003 + i).randrange(10_000, 100_000)
            depth = (i + 0.5) / n
            repeats = max(1, context_length // filler_tokens)
            while True:  # the filler's token count is near constant: one or two corrections land on the target
                context, span = passkey_context(repeats, key, depth)
                meta = {"key": key, "depths": [depth], "needles": [span]}
                sample = Sample(context, QUESTION, PREFIX, [f" {key}."], meta)
                error = prompt_tokens(tokenizer, sample) - context_length
                step = round(error / filler_tokens)
                if step == 0 or repeats - step < 1:
                    break
                repeats -= step
            items.append(sample)
        return items

    def score(self, prediction: str, sample: Sample) -> float:
        return float(str(sample.meta["key"]) in prediction)
