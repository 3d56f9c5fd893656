"""Text data that ships with CPython (``pydoc_data.topics``) and a tokenizer trained on it locally (no download)."""

from __future__ import annotations

import functools
import zlib
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["PydocTextDataModule", "TokenChunks", "build_tokenizer", "pydoc_chunks", "pydoc_topics"]

Domain = Literal["pretrain", "finetune", "all"]


def pydoc_topics() -> dict[str, str]:
    """CPython's help topics (~460 kB of English technical prose), keyed by topic name."""
    from pydoc_data.topics import topics

    return dict(sorted(topics.items()))


def _domain_of(topic: str, finetune_fraction: float) -> str:
    # stable, seed-free split of the topics into two "domains"
    return "finetune" if zlib.crc32(topic.encode()) % 1000 < finetune_fraction * 1000 else "pretrain"


@functools.lru_cache(maxsize=4)
def build_tokenizer(vocab_size: int = 1024):  # -> transformers.PreTrainedTokenizerFast
    """A byte-level BPE tokenizer trained on the pydoc topics in about a second (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 260:
        raise ValueError(f"`vocab_size` must be >= 260 (256 bytes + merges + specials), got {vocab_size}.")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator(list(pydoc_topics().values()), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def pydoc_chunks(
    seq_len: int = 64, domain: Domain = "all", vocab_size: int = 1024, finetune_fraction: float = 0.25
) -> Tensor:
    """Non-overlapping ``seq_len``-token chunks ``(N, seq_len)`` of the topics of one domain, in topic order.

    ``domain="pretrain"`` and ``"finetune"`` split the topics (by a hash of their name) into two disjoint sets, so a
    model can be "pre-trained" on one and fine-tuned on the other.
    """
    if domain not in ("pretrain", "finetune", "all"):
        raise ValueError(f'`domain` must be "pretrain", "finetune" or "all", got {domain!r}.')
    tokenizer = build_tokenizer(vocab_size)
    rows = []
    for topic, text in pydoc_topics().items():
        if domain != "all" and _domain_of(topic, finetune_fraction) != domain:
            continue
        ids = tokenizer(text)["input_ids"]
        usable = len(ids) // seq_len * seq_len
        if usable:
            rows.append(torch.tensor(ids[:usable], dtype=torch.long).view(-1, seq_len))
    return torch.cat(rows)


class TokenChunks(Dataset):
    """Map-style dataset of ``{"input_ids", "labels"}`` dicts over a ``(N, T)`` token tensor (labels = inputs)."""

    def __init__(self, tokens: Tensor) -> None:
        if tokens.dim() != 2:
            raise ValueError(f"`tokens` must be (N, T), got {tuple(tokens.shape)}.")
        self.tokens = tokens

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        row = self.tokens[index]
        return {"input_ids": row, "labels": row}


class PydocTextDataModule(pl.LightningDataModule):
    """Causal-LM data over CPython's pydoc topics: a small fine-tuning set and a held-out set of the same domain.

    Args:
        seq_len: tokens per sample.
        domain: ``"finetune"`` (default: the smaller half of the topics), ``"pretrain"`` or ``"all"``.
        n_train: training samples (drawn with ``seed`` from the domain's chunks; None = all but the validation ones).
        n_val: held-out validation samples of the same domain.
        batch_size: batch size of both loaders.
        vocab_size: vocabulary of the locally trained BPE tokenizer (:attr:`tokenizer`).
        seed: sampling seed.
        shuffle: shuffle the training loader (turn off for bit-exact resume tests).

    Example::

        dm = PydocTextDataModule(n_train=64, n_val=64)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))  # {"input_ids": (16, 64), "labels": (16, 64)}
    """

    def __init__(
        self,
        seq_len: int = 64,
        domain: Domain = "finetune",
        n_train: int | None = 64,
        n_val: int = 128,
        batch_size: int = 16,
        vocab_size: int = 1024,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        if seq_len < 2:
            raise ValueError(f"`seq_len` must be >= 2, got {seq_len}.")
        if n_train is not None and n_train < 1:
            raise ValueError(f"`n_train` must be >= 1 or None, got {n_train}.")
        if n_val < 1 or batch_size < 1:
            raise ValueError(f"`n_val` and `batch_size` must be >= 1, got {n_val} and {batch_size}.")
        self.save_hyperparameters()
        self.seq_len, self.domain, self.n_train, self.n_val = seq_len, domain, n_train, n_val
        self.batch_size, self.vocab_size, self.seed, self.shuffle = batch_size, vocab_size, seed, shuffle
        self.train_dataset: TokenChunks | None = None
        self.val_dataset: TokenChunks | None = None

    @property
    def tokenizer(self):  # -> transformers.PreTrainedTokenizerFast
        return build_tokenizer(self.vocab_size)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        chunks = pydoc_chunks(self.seq_len, self.domain, self.vocab_size)
        order = torch.randperm(chunks.shape[0], generator=torch.Generator().manual_seed(self.seed))
        n_train = chunks.shape[0] - self.n_val if self.n_train is None else self.n_train
        if n_train + self.n_val > chunks.shape[0]:
            raise ValueError(
                f"the {self.domain!r} domain has {chunks.shape[0]} chunks of {self.seq_len} tokens, fewer than"
                f" n_train + n_val = {n_train + self.n_val}; lower them or `seq_len`."
            )
        self.val_dataset = TokenChunks(chunks[order[: self.n_val]])
        self.train_dataset = TokenChunks(chunks[order[self.n_val : self.n_val + n_train]])

    def train_dataloader(self) -> DataLoader:
        assert self.train_dataset is not None, "call setup('fit') first"
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        assert self.val_dataset is not None, "call setup('fit') first"
        return DataLoader(self.val_dataset, batch_size=self.batch_size)
