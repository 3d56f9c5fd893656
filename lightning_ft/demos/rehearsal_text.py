"""Rehearsal on text: a tiny causal LM pre-trained on one half of the pydoc topics forgets it while fine-tuning on the
other half; rehearsal of pre-training chunks (random or mix-cd) and FLOW weighting against plain fine-tuning.

The "pretrain" topics of :func:`~lightning_ft.demos.text.pydoc_chunks` are task A, the "finetune" topics task B.
One tiny GPT-2 is pre-trained on task A (its training chunks are the rehearsal pool), then fine-tuned on a sample of
task B with each of :data:`TEXT_KINDS`. Retention is the mean next-token loss on held-out task-A chunks after
fine-tuning (lower is better), next to the held-out task-B loss.

mix-cd needs a per-sample "correct" for a generative model: the library's reconstruction is greedy next-token accuracy
at or above a threshold (:func:`~lightning_ft.rehearsal.causal_lm_correct`, 0.5 by default). A tiny model reaches
0.5 on almost no chunk, so here the threshold is the base model's median accuracy over the pool (half the pool is
prior-correct, and a rehearsed chunk is "forgotten" when its accuracy drops below that median).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_ft._internal.modules import eval_mode
from lightning_ft.demos._common import cpu_trainer
from lightning_ft.demos.models import CausalLMModule
from lightning_ft.demos.text import (
    PydocTextDataModule,
    TokenChunks,
    _domain_of,
    build_tokenizer,
    pydoc_chunks,
    pydoc_topics,
)
from lightning_ft.rehearsal.callbacks import RehearsalDataModule, RehearsalFeedback
from lightning_ft.rehearsal.flow import FLOWWeightedLoss, FLOWWeighting
from lightning_ft.rehearsal.functional import (
    causal_lm_correct,
    flow_weighted_token_loss,
    greedy_token_accuracy,
    sequence_nll,
)
from lightning_ft.rehearsal.statistics import ReferenceStatistics, WithSampleIds

__all__ = [
    "TEXT_KINDS",
    "RehearsalLM",
    "RehearsalTextConfig",
    "TextBase",
    "base_losses",
    "base_module",
    "finetune_text",
    "mean_loss",
    "pretrain_text",
]

TEXT_KINDS = ("no_rehearsal", "random", "mixcd", "flow", "flow_mixcd")
_STRATEGY = {"random": "random", "mixcd": "mixcd", "flow_mixcd": "mixcd"}


@dataclass
class RehearsalTextConfig:
    """Every knob of the text case.

    ``base_seed`` fixes the pre-trained model, its task-A split and pool (shared by every seed); ``seed`` draws the
    task-B sample and its validation chunks, the fine-tuning order and the rehearsal draws.
    """

    seed: int = 0
    base_seed: int = 0
    vocab_size: int = 1024
    seq_len: int = 64
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_val: int = 128
    pretrain_epochs: int = 10
    pretrain_lr: float = 2e-3
    n_train: int = 384
    finetune_epochs: int = 5
    lr: float = 4e-3
    batch_size: int = 32
    replay_per_step: int = 4
    correct_threshold: float | None = None  # None: the base model's median greedy accuracy over the pool
    # None: the pool is task A's training chunks; s < seq_len: also every window starting s, 2s, ... tokens into a
    # training chunk whose successor in the text is a training chunk too (a pool about seq_len / s times larger that
    # overlaps no held-out chunk)
    pool_stride: int | None = None
    kinds: tuple[str, ...] = field(default_factory=lambda: TEXT_KINDS)

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(TEXT_KINDS)
        if unknown:
            raise ValueError(f"`kinds` must be a subset of {TEXT_KINDS}, got unknown {sorted(unknown)}.")
        if self.pool_stride is not None and not 0 < self.pool_stride < self.seq_len:
            raise ValueError(f"`pool_stride` must be None or in [1, seq_len={self.seq_len}), got {self.pool_stride}.")

    def model_kwargs(self) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab_size,
            "n_positions": max(128, self.seq_len),
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "dropout": 0.0,  # the per-sample "correct" of a training pass is then the eval-mode one
        }


class RehearsalLM(FLOWWeightedLoss, CausalLMModule):
    """:class:`CausalLMModule` for rehearsal and FLOW: on batches with a ``sample_id`` entry, ``training_step``
    returns ``{"loss", "per_sample": {"sample_id", "correct", "loss"}}`` for
    :class:`~lightning_ft.rehearsal.RehearsalFeedback` (``correct``: :func:`~lightning_ft.rehearsal.causal_lm_correct`
    at :attr:`correct_threshold`, from the logits of the training pass; ``loss``: each sample's mean token NLL).

    With :attr:`flow_weighting` set, the token loss is FLOW-weighted (sequence or token level); FLOW + rehearsal:
    ``FLOWWeighting(..., unweighted_from=len(task_b))`` (what :class:`~lightning_ft.rehearsal.FLOWReweighting` sets up
    on a :class:`~lightning_ft.rehearsal.RehearsalDataModule`) or :attr:`num_finetune` keep weight 1 for the rehearsed
    pool samples. Batches without ids train with the plain token mean.
    """

    num_finetune: int | None = None
    correct_threshold: float = 0.5

    def _weights(self, ids: Tensor, per_sample: Tensor, token_nll: Tensor) -> Tensor:
        flow = self.flow_weighting
        weights = torch.ones_like(token_nll if flow is not None and flow.level == "token" else per_sample)
        if flow is None:
            return weights
        finetune = ids < self.num_finetune if self.num_finetune is not None else torch.ones_like(ids, dtype=torch.bool)
        weights[finetune] = flow.weights_for(ids[finetune]).to(weights.dtype)
        return weights

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Any:
        if "sample_id" not in batch:
            return super().training_step(batch, batch_idx)
        ids, labels = batch["sample_id"], batch["labels"]
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        per_sample, token_nll, mask = sequence_nll(logits, labels)
        loss = flow_weighted_token_loss(token_nll, mask, self._weights(ids, per_sample, token_nll))
        self.log("train_loss", loss, prog_bar=True)
        correct = causal_lm_correct(logits.detach(), labels, self.correct_threshold)
        return {"loss": loss, "per_sample": {"sample_id": ids, "correct": correct, "loss": per_sample.detach()}}


# the rehearsal sampler shards the fine-tuning data itself; evaluation is done here, not by the trainer
_trainer = partial(cpu_trainer, use_distributed_sampler=False, limit_val_batches=0)


@dataclass
class TextBase:
    """The pre-trained model and what every fine-tuning run shares: its state, the task-A pool (its training chunks)
    and held-out chunks, the pool's reference statistics and the correctness threshold."""

    state: dict[str, Tensor]
    pool: TokenChunks
    val_a: Tensor
    pool_statistics: ReferenceStatistics
    correct_threshold: float
    seconds: float
    pool_topics: Tensor | None = None  # the pydoc topic (index among the "pretrain" topics) of every pool chunk


@torch.no_grad()
def mean_loss(module: CausalLMModule, tokens: Tensor, batch_size: int = 128) -> float:
    """Mean next-token NLL of ``module`` over ``(N, T)`` token chunks (eval mode; each submodule's mode restored)."""
    with eval_mode(module):
        return torch.cat([sequence_nll(module(chunk), chunk)[0] for chunk in tokens.split(batch_size)]).mean().item()


@torch.no_grad()
def _pool_statistics(
    module: CausalLMModule, pool: TokenChunks, threshold: float | None, batch_size: int = 128
) -> tuple[ReferenceStatistics, float]:
    """One eval pass over the pool: each chunk's mean NLL and greedy accuracy; "correct" is accuracy >= ``threshold``
    (None: the median accuracy), as :func:`causal_lm_correct` (every chunk is fully supervised)."""
    losses, accuracies = [], []
    with eval_mode(module):
        for chunk in pool.tokens.split(batch_size):
            logits = module(chunk)
            losses.append(sequence_nll(logits, chunk)[0])
            accuracies.append(greedy_token_accuracy(logits, chunk)[0])
    accuracy = torch.cat(accuracies)
    threshold = float(accuracy.median()) if threshold is None else threshold
    ids = torch.arange(accuracy.numel())  # WithSampleIds(pool) ids: the pool positions
    return ReferenceStatistics(ids, torch.cat(losses).float(), accuracy >= threshold), threshold


def _chunk_topics(config: RehearsalTextConfig) -> Tensor:
    """The topic index of every chunk of ``pydoc_chunks(seq_len, "pretrain", vocab_size)``, in its order."""
    tokenizer = build_tokenizer(config.vocab_size)
    texts = [text for name, text in pydoc_topics().items() if _domain_of(name, 0.25) == "pretrain"]
    counts = [len(tokenizer(text)["input_ids"]) // config.seq_len for text in texts]
    return torch.repeat_interleave(torch.arange(len(texts)), torch.tensor(counts))


def _pool(config: RehearsalTextConfig, data: PydocTextDataModule) -> tuple[TokenChunks, Tensor]:
    """The rehearsal pool and its chunks' topics: the training chunks of task A (in the data module's order), then with
    ``pool_stride`` the shifted windows over pairs of consecutive training chunks of one topic."""
    assert data.train_dataset is not None
    chunks = pydoc_chunks(config.seq_len, "pretrain", config.vocab_size)
    topics = _chunk_topics(config)
    assert topics.numel() == chunks.shape[0], "the topic count must follow pydoc_chunks"
    order = torch.randperm(chunks.shape[0], generator=torch.Generator().manual_seed(config.base_seed))
    train = order[config.n_val :]  # as PydocTextDataModule(n_train=None) splits them
    assert torch.equal(chunks[train], data.train_dataset.tokens), "the pool must be the data module's training chunks"
    if config.pool_stride is None:
        return data.train_dataset, topics[train]
    is_train = torch.zeros(chunks.shape[0], dtype=torch.bool)
    is_train[train] = True
    first = torch.arange(chunks.shape[0] - 1)
    first = first[is_train[:-1] & is_train[1:] & (topics[:-1] == topics[1:])]  # train chunk i followed by train i+1
    pairs = torch.cat([chunks[first], chunks[first + 1]], dim=1)
    offsets = range(config.pool_stride, config.seq_len, config.pool_stride)
    windows = torch.cat([pairs[:, o : o + config.seq_len] for o in offsets])
    tokens = torch.cat([data.train_dataset.tokens, windows])
    return TokenChunks(tokens), torch.cat([topics[train], topics[first].repeat(len(offsets))])


def _task_b(config: RehearsalTextConfig) -> PydocTextDataModule:
    data = PydocTextDataModule(
        seq_len=config.seq_len,
        domain="finetune",
        n_train=config.n_train,
        n_val=config.n_val,
        batch_size=config.batch_size,
        vocab_size=config.vocab_size,
        seed=config.seed,
    )
    data.setup("fit")
    return data


def _module(config: RehearsalTextConfig, lr: float) -> RehearsalLM:
    return RehearsalLM(lr=lr, seed=config.base_seed, **config.model_kwargs())


def base_module(config: RehearsalTextConfig, base: TextBase) -> RehearsalLM:
    """A fresh module holding the pre-trained weights, at the fine-tuning learning rate and the base's correctness
    threshold."""
    module = _module(config, config.lr)
    module.load_state_dict(base.state)
    module.correct_threshold = base.correct_threshold
    return module


def pretrain_text(config: RehearsalTextConfig) -> TextBase:
    """Pre-train the tiny GPT-2 on task A (``config.base_seed``) and compute the pool's reference statistics."""
    start = time.perf_counter()
    pl.seed_everything(config.base_seed, verbose=False)
    data = PydocTextDataModule(
        seq_len=config.seq_len,
        domain="pretrain",
        n_train=None,
        n_val=config.n_val,
        batch_size=config.batch_size,
        vocab_size=config.vocab_size,
        seed=config.base_seed,
    )
    data.setup("fit")
    assert data.train_dataset is not None and data.val_dataset is not None
    module = _module(config, config.pretrain_lr)
    _trainer(config.pretrain_epochs).fit(module, data)
    pool, topics = _pool(config, data)
    stats, threshold = _pool_statistics(module, pool, config.correct_threshold)
    return TextBase(
        state={k: v.clone() for k, v in module.state_dict().items()},
        pool=pool,
        val_a=data.val_dataset.tokens,
        pool_statistics=stats,
        correct_threshold=threshold,
        seconds=time.perf_counter() - start,
        pool_topics=topics,
    )


def finetune_text(config: RehearsalTextConfig, base: TextBase, kind: str) -> dict[str, Any]:
    """Fine-tune the base on a task-B sample (``config.seed``) with one of :data:`TEXT_KINDS`; returns the task-A and
    task-B validation losses after fine-tuning (and the rehearsed chunks' forgotten share for rehearsal kinds)."""
    if kind not in TEXT_KINDS:
        raise ValueError(f"`kind` must be one of {TEXT_KINDS}, got {kind!r}.")
    pl.seed_everything(config.seed, verbose=False)
    module = base_module(config, base)
    data = _task_b(config)
    assert data.train_dataset is not None and data.val_dataset is not None
    task_b = WithSampleIds(data.train_dataset)
    row: dict[str, Any] = {"kind": kind, "seed": config.seed}
    start = time.perf_counter()
    if kind.startswith("flow"):
        stats = ReferenceStatistics.compute(module, DataLoader(task_b, batch_size=128), task="causal_lm")
        # sequence level, tau = median reference loss; with rehearsal the pool chunks (ids after task B's) keep weight 1
        module.flow_weighting = FLOWWeighting(stats, unweighted_from=None if kind == "flow" else len(task_b))
        row["tau"] = module.flow_weighting.tau
        row["flow_mean_weight"] = float(module.flow_weighting.weights.mean())
    if kind == "no_rehearsal":
        _trainer(config.finetune_epochs).fit(module, data)
    elif kind == "flow":
        loader = DataLoader(task_b, batch_size=config.batch_size, shuffle=True)
        _trainer(config.finetune_epochs).fit(module, loader)
    else:
        mixed = RehearsalDataModule(
            data,
            base.pool,
            strategy=_STRATEGY[kind],  # type: ignore[arg-type]
            replay_per_step=config.replay_per_step,
            pool_statistics=base.pool_statistics,
            task="causal_lm",
            seed=config.seed,
        )
        _trainer(config.finetune_epochs, [RehearsalFeedback()]).fit(module, mixed)
        assert mixed.sampler is not None
        row["cd_hit_rate"] = mixed.sampler.hit_rate
    row["seconds"] = time.perf_counter() - start
    row["task_a_loss"] = mean_loss(module, base.val_a)
    row["task_b_loss"] = mean_loss(module, data.val_dataset.tokens)
    return row


def base_losses(config: RehearsalTextConfig, base: TextBase) -> dict[str, float]:
    """Task-A and task-B validation losses of the pre-trained model (task B: ``config.seed``'s held-out chunks)."""
    module = base_module(config, base)
    data = _task_b(config)
    assert data.val_dataset is not None
    return {"task_a_loss": mean_loss(module, base.val_a), "task_b_loss": mean_loss(module, data.val_dataset.tokens)}
