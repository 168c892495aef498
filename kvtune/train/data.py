"""Long training sequences: text tokenised, concatenated and cut into sequences of ``block_size * chunks`` tokens.

Sources: the offline training corpus (``stdlib_train`` of `kvtune.eval.corpus`, the default, disjoint from the text
evaluation uses), local text files or folders, or a `datasets` dataset where a hub is reachable. The sampler's
order is a seeded permutation per epoch and the data module's state records how far into the epoch training got,
so ``ckpt_path=last`` resumes at the exact sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import PreTrainedTokenizerBase

from kvtune.eval.corpus import corpus_documents


class Sequences(Dataset):
    """Fixed-length token sequences (``[length]`` int64 tensors)."""

    def __init__(self, tokens: list[int], length: int) -> None:
        count = len(tokens) // length
        if count == 0:
            raise ValueError(f"{len(tokens)} tokens cannot fill one sequence of {length}")
        self.data = torch.tensor(tokens[: count * length]).view(count, length)

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.data[index]


class ResumableSampler(Sampler[int]):
    """A seeded permutation per epoch that can start part-way through (the resume position)."""

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch, self.start = 0, 0

    def _order(self) -> list[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        yield from self._order()[self.start :]

    def __len__(self) -> int:
        return len(self._order()) - self.start


def _tokens(tokenizer: PreTrainedTokenizerBase, documents: list[str]) -> list[int]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [t for doc in documents for t in tokenizer(doc, add_special_tokens=False).input_ids + eos]


def load_documents(source: str, hub_split: str = "train", text_field: str = "text") -> list[str]:
    """Documents of ``source``: a named offline corpus, a text file or folder, or ``hf:NAME`` (datasets)."""
    if source.startswith("hf:"):
        from datasets import load_dataset

        try:
            dataset = load_dataset(source[3:], split=hub_split)
        except Exception as error:  # no network, unknown name: tell the user what works offline
            raise RuntimeError(
                f"could not load {source[3:]!r} through datasets ({error}); pass data.source=PATH to local text "
                "files, or data.source=stdlib_train for the offline training corpus"
            ) from error
        return [row[text_field] for row in dataset]
    return list(corpus_documents(source))


class TextDataModule(LightningDataModule):
    """Train/validation sequences of ``sequence_length`` tokens from one source (the last ``val_fraction`` held out)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        sequence_length: int,
        source: str = "stdlib_train",
        val_fraction: float = 0.1,
        batch_size: int = 1,
        seed: int = 0,
        max_train_sequences: int | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer, self.sequence_length, self.source = tokenizer, sequence_length, source
        self.val_fraction, self.batch_size, self.seed = val_fraction, batch_size, seed
        self.max_train_sequences = max_train_sequences
        self.consumed = 0  # sequences of the current epoch already trained on (per rank)
        self.sampler: ResumableSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        documents = load_documents(self.source)
        held_out = max(1, round(len(documents) * self.val_fraction)) if len(documents) > 1 else 0
        train_docs, val_docs = documents[: len(documents) - held_out], documents[len(documents) - held_out :]
        self.train_set = Sequences(_tokens(self.tokenizer, train_docs or documents), self.sequence_length)
        if self.max_train_sequences is not None:
            self.train_set.data = self.train_set.data[: self.max_train_sequences]
        self.val_set = Sequences(_tokens(self.tokenizer, val_docs or documents), self.sequence_length)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.sampler = ResumableSampler(len(self.train_set), self.seed, rank, world)
        if trainer is not None:
            self.sampler.epoch = trainer.current_epoch
        self.sampler.start, self.consumed = self.consumed, self.consumed
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=self.sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed = state["consumed"]
