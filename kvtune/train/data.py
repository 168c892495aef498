"""Long training sequences: text tokenised, concatenated and cut into sequences of ``block_size * chunks`` tokens.

Sources: the offline training corpus (``stdlib_train`` of `kvtune.eval.corpus`, the default, disjoint from the text
evaluation uses), its prose companion ``python_reference``, local text files or folders, or a `datasets` dataset
where a hub is reachable; several join with ``+`` (each holds out its own last documents for validation). With
``max_train_sequences`` the sequences are windows at seeded random offsets across the whole stream (many documents,
not the first few). The sampler's order is a seeded permutation per epoch and the data module's state records how
far into the epoch training got, so ``ckpt_path=last`` resumes at the exact sequence.
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
    """Fixed-length token sequences (``[length]`` int64 tensors): consecutive, or ``count`` windows at seeded random
    offsets of the stream (which may overlap)."""

    def __init__(self, tokens: list[int], length: int, count: int | None = None, seed: int = 0) -> None:
        slots = len(tokens) // length
        if slots == 0:
            raise ValueError(f"{len(tokens)} tokens cannot fill one sequence of {length}")
        stream = torch.tensor(tokens)
        if count is None:
            self.data = stream[: slots * length].view(slots, length)
        else:
            generator = torch.Generator().manual_seed(seed)
            starts = torch.randint(0, len(tokens) - length + 1, (count,), generator=generator)
            self.data = torch.stack([stream[start : start + length] for start in starts.tolist()])

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


def split_documents(source: str, val_fraction: float) -> tuple[list[str], list[str]]:
    """Training and held-out documents of every ``+``-joined source (each holds out its last ``val_fraction``)."""
    train, held = [], []
    for part in source.split("+"):
        documents = load_documents(part)
        count = max(1, round(len(documents) * val_fraction)) if len(documents) > 1 and val_fraction > 0 else 0
        train += documents[: len(documents) - count] or documents
        held += documents[len(documents) - count :] if count else documents
    return train, held


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
    """Training sequences of ``sequence_length`` tokens and validation windows of ``val_length`` (the evaluation
    length) from the held-out last ``val_fraction`` of the documents of ``val_source`` (default: ``source``)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        sequence_length: int,
        source: str = "stdlib_train",
        val_fraction: float = 0.1,
        batch_size: int = 1,
        seed: int = 0,
        max_train_sequences: int | None = None,
        val_length: int | None = None,
        val_source: str | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer, self.sequence_length, self.source = tokenizer, sequence_length, source
        self.val_fraction, self.batch_size, self.seed = val_fraction, batch_size, seed
        self.max_train_sequences = max_train_sequences
        self.val_length, self.val_source = val_length or sequence_length, val_source
        self.consumed = 0  # sequences of the current epoch already trained on (per rank)
        self.sampler: ResumableSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        train_docs, val_docs = split_documents(self.source, self.val_fraction)
        if self.val_source is not None and self.val_source != self.source:
            val_docs = split_documents(self.val_source, self.val_fraction)[1]
        tokens = _tokens(self.tokenizer, train_docs)
        self.train_set = Sequences(tokens, self.sequence_length, self.max_train_sequences, self.seed)
        self.val_set = Sequences(_tokens(self.tokenizer, val_docs), self.val_length)

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
