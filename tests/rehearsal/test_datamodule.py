"""Replay budget options of RehearsalDataModule and CollateralDamageSampler: the ratio schedule, `replay_transform`."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_ft.rehearsal import CollateralDamageSampler, RehearsalFeedback
from tests.helpers.data import rehearsal_datamodule
from tests.helpers.models import tiny_mlp_classifier
from tests.helpers.resume import quiet_trainer

NUM_FINETUNE = 128  # rehearsal_datamodule: 128 task-B samples, batch 16, pool of 200


def schedule_sampler(**kwargs) -> CollateralDamageSampler:
    gen = torch.Generator().manual_seed(0)
    defaults = {
        "pool_loss": torch.rand(300, generator=gen),
        "pool_correct": torch.ones(300, dtype=torch.bool),
        "num_finetune": 100,
        "batch_size": 10,
        "replay_schedule": [(0.0, 0.5), (1.0, 0.0)],
        "schedule_batches": 20,
    }
    return CollateralDamageSampler(**{**defaults, **kwargs})


def replay_counts(sampler: CollateralDamageSampler) -> list[int]:
    return [sum(i >= sampler.num_finetune for i in batch) for batch in sampler]


def carried(shares: list[float], batch_size: int, first: int = 0) -> list[int]:
    """Per-batch pool counts at these shares with the fractions carried over (issue 12): the first n batches hold
    round(E(n)) pool samples, E(n) the sum of batch_size * share / (1 - share); the counts of batches ``first`` on."""
    total, rounded, counts = 0.0, 0, []
    for share in shares:
        total += batch_size * share / (1 - share)
        counts.append(math.floor(total + 0.5) - rounded)
        rounded = math.floor(total + 0.5)
    return counts[first:]


def test_schedule_interpolates_the_share_over_the_fit_and_holds_after_the_end():
    sampler = schedule_sampler()
    first = replay_counts(sampler)
    # progress b / 20, share 0.5 (1 - progress): 10 * share / (1 - share) pool samples expected, fractions carried
    shares = [0.5 - b / 40 for b in range(20)]
    assert first == carried(shares, 10)[:10] and first[0] == 10 and first[-1] == 4
    sampler.set_epoch(1)
    second = replay_counts(sampler)
    assert second == carried(shares, 10)[10:] and second[-1] == 0
    sampler.set_epoch(5)  # past the end: the last point's share
    assert replay_counts(sampler) == [0] * 10
    # a point after 0 holds its share before it; several points are piecewise linear
    held = schedule_sampler(replay_schedule=[(0.5, 0.2), (0.75, 0.5), (1.0, 0.5)])
    assert [held.replay_count(b) for b in (0, 1, 2, 3, 15, 20, 40)] == [3, 2, 3, 2, 10, 10, 10]  # 2.5 per batch
    assert held.replay == 2


def test_schedule_counts_are_the_same_on_every_rank():
    counts = [replay_counts(schedule_sampler(rank=r, world_size=2, num_finetune=101)) for r in range(2)]
    assert counts[0] == counts[1] and len(counts[0]) == 6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"replay_per_step": 2}, "not both"),
        ({"schedule_batches": None}, "schedule_batches"),
        ({"replay_schedule": [(0.0, 0.2), (1.0, 1.0)]}, "ratio"),
        ({"replay_schedule": [(0.0, 0.2), (1.5, 0.1)]}, "progress"),
        ({"replay_schedule": [(0.8, 0.2), (0.2, 0.1)]}, "non-decreasing"),
        ({"replay_schedule": []}, "empty"),
        ({"replay_schedule": [0.1, 0.2]}, "pairs"),
    ],
)
def test_schedule_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedule_sampler(**kwargs)


class RecordBatches(Callback):
    def __init__(self) -> None:
        self.replay_counts: list[int] = []
        self.replay_inputs: list[torch.Tensor] = []
        self.finetune_inputs: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, _, ids = batch
        replay = ids >= NUM_FINETUNE
        self.replay_counts.append(int(replay.sum()))
        self.replay_inputs.append(x[replay])
        self.finetune_inputs.append(x[~replay])


def fit(data, feedback: bool = True, **trainer_kwargs) -> RecordBatches:
    record = RecordBatches()
    callbacks = [RehearsalFeedback(), record] if feedback else [record]
    trainer = quiet_trainer(callbacks=callbacks, use_distributed_sampler=False, **trainer_kwargs)
    trainer.fit(tiny_mlp_classifier(), data)
    return record


def test_datamodule_schedule_runs_over_the_whole_fit():
    data = rehearsal_datamodule(replay_per_step=None, replay_schedule=[[0.0, 0.5], [1.0, 0.0]])
    record = fit(data, max_epochs=2)
    assert data.sampler is not None and data.sampler.schedule_batches == 16  # 2 epochs x 8 batches
    assert record.replay_counts == carried([0.5 - b / 32 for b in range(16)], 16)
    assert record.replay_counts[0] == 16 and record.replay_counts[-1] == 0
    # max_steps shorter than max_epochs sets the length (in batches: steps x accumulation)
    data = rehearsal_datamodule(replay_per_step=None, replay_schedule=[[0.0, 0.5], [1.0, 0.0]])
    record = fit(data, max_epochs=2, max_steps=3, accumulate_grad_batches=2)
    assert data.sampler.schedule_batches == 6
    assert record.replay_counts == carried([0.5 - b / 12 for b in range(6)], 16)


def test_schedule_and_shuffle_advance_without_feedback():
    """Baseline strategies need no RehearsalFeedback: Lightning's own set_epoch reaches the sampler."""
    data = rehearsal_datamodule(strategy="random", replay_per_step=None, replay_schedule=[[0.0, 0.5], [1.0, 0.0]])
    record = fit(data, feedback=False, max_epochs=2)
    assert data.sampler.epoch == 1
    assert record.replay_counts == carried([0.5 - b / 32 for b in range(16)], 16)


def test_max_steps_with_a_short_last_accumulation():
    # 8 batches per epoch, accumulation 3: steps end after batches 3, 6, 8 (the epoch's short last one), 11, 14, 16
    data = rehearsal_datamodule(replay_per_step=None, replay_schedule=[[0.0, 0.5], [1.0, 0.0]])
    record = fit(data, max_epochs=5, max_steps=6, accumulate_grad_batches=3)
    assert data.sampler.schedule_batches == 16 == len(record.replay_counts)
    assert record.replay_counts == carried([0.5 - b / 32 for b in range(16)], 16)


def test_datamodule_schedule_follows_limit_train_batches():
    data = rehearsal_datamodule(replay_per_step=None, replay_schedule=[[0.0, 0.5], [1.0, 0.0]])
    record = fit(data, max_epochs=3, limit_train_batches=2)  # 2 of 8 batches per epoch: 6 in the fit
    assert data.sampler.schedule_batches == 6 and data.sampler.epoch_batches == 2
    assert record.replay_counts == carried([0.5 - b / 12 for b in range(6)], 16)


def test_datamodule_schedule_needs_an_end():
    data = rehearsal_datamodule(replay_per_step=None, replay_schedule=[[0.0, 0.5], [1.0, 0.0]])
    with pytest.raises(ValueError, match="max_epochs or max_steps"):
        fit(data, max_epochs=-1, max_steps=-1, limit_train_batches=2)


def test_replay_transform_applies_to_pool_inputs_only_and_not_to_the_statistics():
    plain = rehearsal_datamodule()
    pl.seed_everything(0, verbose=False)
    fit(plain, max_epochs=1)
    data = rehearsal_datamodule(replay_transform=torch.neg)
    pl.seed_everything(0, verbose=False)
    record = fit(data, max_epochs=1)
    assert all(int(c) == 4 for c in record.replay_counts)
    replay = torch.cat(record.replay_inputs)
    finetune = torch.cat(record.finetune_inputs)
    assert bool((replay <= 0).all()) and bool((replay < 0).any())  # digits are in [0, 1]: negated
    assert bool((finetune >= 0).all())
    # the reference statistics come from the untransformed pool: the same as without the transform
    assert torch.equal(data.pool_statistics.loss, plain.pool_statistics.loss)


def test_replay_transform_on_mapping_samples_gets_the_whole_sample():
    from lightning_ft.rehearsal.datamodule import _ReplayTransformed

    pool = [{"input_ids": torch.tensor([1, 2])}, {"input_ids": torch.tensor([3])}]
    shifted = _ReplayTransformed(pool, lambda s: {**s, "input_ids": s["input_ids"] + 10})
    assert len(shifted) == 2 and shifted[1]["input_ids"].tolist() == [13]
    pairs = _ReplayTransformed([(torch.ones(2), 3)], torch.neg)
    assert pairs[0][0].tolist() == [-1.0, -1.0] and pairs[0][1] == 3 and isinstance(pairs[0], tuple)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"replay_schedule": [[0.0, 1.5]], "replay_per_step": None}, "ratio"),
        ({"replay_schedule": [[0.0, 0.2]]}, "not both"),  # with the helper's replay_per_step
        ({"budget": "flops"}, "budget"),
        ({"budget": "tokens"}, "replay_per_step"),
    ],
)
def test_bad_budget_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rehearsal_datamodule(**kwargs)


def test_replay_transform_must_be_callable():
    with pytest.raises(ValueError, match="callable"):
        rehearsal_datamodule(replay_transform="flip")
