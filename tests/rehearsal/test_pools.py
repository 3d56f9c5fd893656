"""Issue 12 section 2: pools too big for memory (a seeded subsample, an iterable pool), a pool with its own collate."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import IterableDataset, Subset, TensorDataset

from lightning_ft.demos.vision import ImageClassifier
from lightning_ft.rehearsal import RehearsalFeedback
from tests.helpers.data import rehearsal_datamodule
from tests.helpers.resume import quiet_trainer


def test_pool_size_rehearses_a_seeded_subset_and_its_statistics_only():
    whole = rehearsal_datamodule()
    data = rehearsal_datamodule(pool_size=50, seed=3)
    assert isinstance(data.pool, Subset) and len(data.pool) == 50
    again = rehearsal_datamodule(pool_size=50, seed=3)
    assert data.pool.indices == again.pool.indices, "the same subset on every rank"  # type: ignore[attr-defined]
    assert rehearsal_datamodule(pool_size=50, seed=4).pool.indices != data.pool.indices  # type: ignore[attr-defined]
    assert (
        rehearsal_datamodule(pool_size=10_000).pool is whole.pool
        or len(rehearsal_datamodule(pool_size=10_000).pool) == 200
    )
    feedback = RehearsalFeedback()
    quiet_trainer(callbacks=[feedback], use_distributed_sampler=False, max_epochs=1, limit_train_batches=4).fit(
        ImageClassifier(arch="mlp", width=4, lr=0.05), data
    )
    assert data.pool_statistics is not None and len(data.pool_statistics) == 50, "statistics of the subset only"
    assert data.sampler is not None and len(data.sampler.policy) == 50 and int(data.sampler.seen.sum()) == 16


def test_pool_groups_given_for_the_whole_pool_follow_the_subset():
    groups = list(range(200))
    data = rehearsal_datamodule(pool_size=20, pool_groups=[g % 5 for g in groups])
    kept = data.pool.indices  # type: ignore[attr-defined]
    assert data.sampler_kwargs["pool_groups"] == [k % 5 for k in kept]


class Stream(IterableDataset):
    """An endless stream of task-A digits (a streaming dataset stand-in): no length, no random access."""

    def __init__(self, base: TensorDataset) -> None:
        self.base = base

    def __iter__(self):  # type: ignore[no-untyped-def]
        i = 0
        while True:
            yield self.base[i % len(self.base)]
            i += 1


def test_an_iterable_pool_rehearses_its_first_pool_size_samples():
    pool = rehearsal_datamodule().pool
    data = rehearsal_datamodule(pool=Stream(pool), pool_size=30)  # type: ignore[arg-type]
    assert isinstance(data.pool, list) and len(data.pool) == 30
    assert torch.equal(data.pool[7][0], pool[7][0])
    quiet_trainer(
        callbacks=[RehearsalFeedback()], use_distributed_sampler=False, max_epochs=1, limit_train_batches=2
    ).fit(ImageClassifier(arch="mlp", width=4, lr=0.05), data)
    assert data.sampler is not None and int(data.sampler.seen.sum()) == 8
    with pytest.raises(ValueError, match="pool_size"):
        rehearsal_datamodule(pool=Stream(pool))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="iterable of samples"):
        rehearsal_datamodule(pool=42)  # type: ignore[arg-type]


class SplitBatches(ImageClassifier):
    """A training_step for ``{"finetune": (x, y, ids), "replay": (x, y, ids) | None}`` batches."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        assert set(batch) == {"finetune", "replay"}
        parts = [batch["finetune"]] + ([batch["replay"]] if batch["replay"] is not None else [])
        joined = tuple(torch.cat([part[k] for part in parts]) for k in range(3))
        self.replay_batches = getattr(self, "replay_batches", 0) + (batch["replay"] is not None)
        return super().training_step(joined, batch_idx)


def raw_pool(pool: TensorDataset) -> list[dict[str, Any]]:
    """The pool as raw records (a list of pixel values and an int label): the fine-tuning collate cannot batch them."""
    return [{"pixels": pool[i][0].flatten().tolist(), "label": int(pool[i][1])} for i in range(len(pool))]


def collate_records(samples: list[dict[str, Any]]) -> tuple[torch.Tensor, ...]:
    pixels = torch.tensor([s["pixels"] for s in samples]).view(len(samples), 1, 8, 8)
    return pixels, torch.tensor([s["label"] for s in samples]), torch.tensor([s["sample_id"] for s in samples])


def test_a_pool_with_its_own_collate_gives_split_batches_and_statistics_through_it():
    pool = rehearsal_datamodule().pool
    data = rehearsal_datamodule(pool=raw_pool(pool), pool_collate_fn=collate_records)
    module = SplitBatches(arch="mlp", width=4, lr=0.05)
    feedback = RehearsalFeedback()
    quiet_trainer(callbacks=[feedback], use_distributed_sampler=False, max_epochs=1, limit_train_batches=4).fit(
        module, data
    )
    assert data.pool_statistics is not None and len(data.pool_statistics) == len(pool)
    assert module.replay_batches == 4 and data.sampler is not None and int(data.sampler.seen.sum()) == 16
    loader = data.train_dataloader()
    batch = next(iter(loader))
    x, _, ids = batch["replay"]
    assert x.shape == (4, 1, 8, 8) and bool((ids >= 128).all()) and bool((batch["finetune"][2] < 128).all())
    with pytest.raises(ValueError, match="pool_collate_fn"):
        rehearsal_datamodule(pool_collate_fn=3)


def test_flow_on_a_pool_with_its_own_collate_weights_the_fine_tuning_samples():
    from lightning_ft.rehearsal import FLOWReweighting

    pool = rehearsal_datamodule().pool
    data = rehearsal_datamodule(pool=raw_pool(pool), pool_collate_fn=collate_records)
    module = SplitBatches(arch="mlp", width=4, lr=0.05)
    trainer = quiet_trainer(
        callbacks=[FLOWReweighting(), RehearsalFeedback()], use_distributed_sampler=False, max_epochs=1
    )
    trainer.fit(module, data)
    assert module.flow_weighting is not None and len(module.flow_weighting.statistics) == 128
    data = rehearsal_datamodule(pool=raw_pool(pool), pool_collate_fn=collate_records)
    with pytest.raises(ValueError, match="samples='auto'"):
        quiet_trainer(callbacks=[FLOWReweighting(samples="all")], use_distributed_sampler=False, max_epochs=1).fit(
            SplitBatches(arch="mlp", width=4, lr=0.05), data
        )
