"""Issue 12 section 1: small per-device batches keep their replay share (fractional counts carried over), mix-cd's
count-weighted rate update, and the warning when training_step reports no pool sample ids."""

from __future__ import annotations

import itertools
import warnings
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from lightning_ft.demos.vision import ImageClassifier
from lightning_ft.rehearsal import CollateralDamageSampler, RehearsalFeedback
from tests.helpers.data import rehearsal_datamodule
from tests.helpers.resume import quiet_trainer

POOL = 60


def sampler(batch_size: int, **kwargs) -> CollateralDamageSampler:
    gen = torch.Generator().manual_seed(0)
    defaults = {
        "num_finetune": batch_size * 150,  # 150 batches per epoch
        "pool_loss": torch.rand(POOL, generator=gen),
        "pool_correct": torch.ones(POOL, dtype=torch.bool),
        "batch_size": batch_size,
        "num_bins": 4,
    }
    return CollateralDamageSampler(**{**defaults, **kwargs})


def counts(s: CollateralDamageSampler) -> list[int]:
    return [sum(i >= s.num_finetune for i in batch) for batch in s]


@pytest.mark.parametrize("batch_size", [1, 2, 4, 8])
@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.12])
def test_small_batches_keep_the_replay_share(batch_size, ratio):
    """Rounded per batch, batch 4 at 10% rehearsed nothing, and batch 4 at 12% one sample per batch (a 20% share)."""
    s = sampler(batch_size, replay_ratio=ratio)
    realised = counts(s)
    s.set_epoch(1)
    realised += counts(s)
    expected = np.arange(1, len(realised) + 1) * batch_size * ratio / (1 - ratio)
    # every prefix of the fit within one pool sample of the ratio's expectation
    assert np.abs(np.cumsum(realised) - expected).max() <= 1.0
    replay, finetune = sum(realised), batch_size * len(realised)
    assert abs(replay - ratio * (replay + finetune)) <= 1.0  # the realised share r / (b + r), within one sample
    assert replay > 0


def test_a_scheduled_ratio_carries_its_fractions_too():
    s = sampler(4, replay_schedule=[(0.0, 0.25), (0.5, 0.05)], schedule_batches=300)
    realised = counts(s)
    s.set_epoch(1)
    realised += counts(s)
    shares = [s.replay_share(b) for b in range(300)]
    expected = np.cumsum([4 * r / (1 - r) for r in shares])
    assert np.abs(np.cumsum(realised) - expected).max() <= 1.0
    assert np.cumsum(realised)[-1] == round(expected[-1]) == round(s.expected_replay(300))


def test_carried_counts_are_the_same_on_every_rank_and_after_a_mid_epoch_resume():
    ranks = [sampler(4, replay_ratio=0.1, rank=r, world_size=2) for r in range(2)]
    assert counts(ranks[0]) == counts(ranks[1])
    whole = sampler(4, replay_ratio=0.12)
    whole.set_epoch(1)
    expected = counts(whole)
    interrupted = sampler(4, replay_ratio=0.12)
    interrupted.set_epoch(1)
    iterator = iter(interrupted)
    first = [sum(i >= interrupted.num_finetune for i in next(iterator)) for _ in range(37)]
    restored = sampler(4, replay_ratio=0.12)
    restored.load_state_dict(interrupted.state_dict())
    assert first + counts(restored) == expected


# ------------------------------------------------------------------------------------------------ count-weighted EMA
def _bin_positions(s: CollateralDamageSampler, k: int, n: int) -> np.ndarray:
    return np.flatnonzero(s.bin_of.numpy() == k)[:n]


def test_one_update_of_n_observations_equals_n_single_observation_updates():
    batched, single = sampler(4, beta=0.1, alpha_init=0.2), sampler(4, beta=0.1, alpha_init=0.2)
    positions = _bin_positions(batched, 2, 5)
    batched.update(positions, np.ones(5, dtype=bool))
    for p in positions:
        single.update(np.array([p]), np.array([True]))
    assert float(batched.alpha[2]) == pytest.approx(float(single.alpha[2]), abs=1e-6)
    assert float(batched.alpha[2]) == pytest.approx(0.9**5 * 0.2 + 1 - 0.9**5)
    # mixed outcomes: the mean over every order of n single-sample updates (alpha_init 0.9, 1 of 4 forgotten)
    flags = np.array([True, False, False, False])
    batched = sampler(4, beta=0.1, alpha_init=0.9)
    batched.update(_bin_positions(batched, 1, 4), flags)
    single_rates = []
    for order in set(itertools.permutations(flags.tolist())):
        s = sampler(4, beta=0.1, alpha_init=0.9)
        for p, flag in zip(_bin_positions(s, 1, 4), order, strict=True):
            s.update(np.array([p]), np.array([flag]))
        single_rates.append(float(s.alpha[1]))
    assert float(batched.alpha[1]) == pytest.approx(float(np.mean(single_rates)), abs=1e-6)
    keep = 0.9**4  # the documented formula: (1 - beta)^n alpha + (1 - (1 - beta)^n) rate
    assert float(batched.alpha[1]) == pytest.approx(keep * 0.9 + (1 - keep) * 0.25)


def test_rates_do_not_depend_on_world_size_or_replay_count():
    """The same observations: 1 rank over 2 steps, 2 ranks in one all-gathered step, 1 rank with twice the replay."""
    ref = sampler(4, alpha_init=0.5)
    positions = np.concatenate([_bin_positions(ref, k, 6) for k in range(4)])
    forgot = ref.bin_of.numpy()[positions] % 2 == 1  # bins 1 and 3 forgotten, 0 and 2 kept
    steps = sampler(4, alpha_init=0.5)
    half = positions.size // 2
    order = np.argsort(np.arange(positions.size) % 2, kind="stable")  # every bin in both halves
    steps.update(positions[order[:half]], forgot[order[:half]])
    steps.update(positions[order[half:]], forgot[order[half:]])
    ranks = [sampler(4, alpha_init=0.5, rank=r, world_size=2) for r in range(2)]
    for s in ranks:  # every rank receives the all-gathered observations of both
        s.update(
            np.concatenate([positions[order[:half]], positions[order[half:]]]),
            np.concatenate([forgot[order[:half]], forgot[order[half:]]]),
        )
    one = sampler(4, alpha_init=0.5)
    one.update(positions, forgot)
    for s in (steps, *ranks):
        assert torch.allclose(s.alpha, one.alpha, atol=1e-6), (s.alpha, one.alpha)
    assert torch.equal(ranks[0].alpha, ranks[1].alpha)


# ------------------------------------------------------------------------------------------------ no feedback warning
class LabelsAsIds(ImageClassifier):
    """A training_step that reports the labels where the sample ids belong."""

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        out = super().training_step(batch, batch_idx)
        out["per_sample"]["sample_id"] = batch[1]
        return out


def _fit(module: ImageClassifier, **data_kwargs) -> RehearsalFeedback:
    feedback = RehearsalFeedback()
    trainer = quiet_trainer(callbacks=[feedback], use_distributed_sampler=False, max_epochs=1, limit_train_batches=3)
    trainer.fit(module, rehearsal_datamodule(**data_kwargs))
    return feedback


def test_warns_when_an_epoch_reports_no_pool_sample_ids():
    with pytest.warns(UserWarning, match=r"no pool sample id .*not the labels"):
        _fit(LabelsAsIds(arch="mlp", width=4, lr=0.05))


@pytest.mark.parametrize("labels", [False, True])
def test_no_warning_with_real_ids_or_without_replay(labels):
    module = LabelsAsIds if labels else ImageClassifier
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # real ids: observations arrive; labels but nothing rehearsed (replay 0): nothing to observe
        _fit(module(arch="mlp", width=4, lr=0.05), replay_per_step=0 if labels else 4)
    assert not [w for w in caught if "no pool sample id" in str(w.message)]


def test_the_carried_counts_index_the_batches_a_limited_epoch_consumes():
    """With limit_train_batches the fit's batch index counts the consumed batches (not the sampler's full epoch), so
    the first n batches of the fit rehearse round(E(n)) samples across epochs, schedule or not."""
    from tests.helpers.data import rehearsal_datamodule
    from tests.helpers.models import tiny_mlp_classifier
    from tests.helpers.resume import quiet_trainer

    data = rehearsal_datamodule(replay_per_step=None, replay_ratio=0.1)
    quiet_trainer(max_epochs=2, limit_train_batches=3, use_distributed_sampler=False).fit(tiny_mlp_classifier(), data)
    assert data.sampler.epoch_batches == 3


class _Group:
    """A 2-rank process group in one process: ``all_gather`` of a step's k-th call returns both ranks' k-th tensors
    (``reports[rank][k]``) stacked in rank order, after checking that the caller passed its own."""

    def __init__(self, reports: dict[int, list[torch.Tensor]]) -> None:
        self.reports = reports

    def strategy(self, rank: int) -> Any:
        group, calls = self, iter(range(len(self.reports[rank])))

        class Strategy:
            def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
                k = next(calls)
                assert torch.equal(tensor, group.reports[rank][k])
                return torch.stack([group.reports[0][k], group.reports[1][k]])

        return Strategy()


def test_two_ranks_feedback_keeps_rates_identical_and_equal_to_one_rank_with_the_same_observations():
    """Each rank draws its own pool samples and runs its own RehearsalFeedback; the all-gathered observations give
    both ranks the rates of one rank updated with the same observations per step (whatever their split)."""
    ranks = [sampler(4, replay_ratio=0.5, rank=r, world_size=2, alpha_init=0.5) for r in range(2)]
    one = sampler(4, replay_ratio=0.5, alpha_init=0.5)
    feedbacks = [RehearsalFeedback(log_every_n_steps=10_000) for _ in ranks]
    for feedback, s in zip(feedbacks, ranks, strict=True):
        feedback._sampler = s
    iterators = [iter(s) for s in ranks]
    for step in range(30):
        # rank 1 reports first at even steps: the result must not depend on which rank gathers first
        order = (1, 0) if step % 2 == 0 else (0, 1)
        batches = {r: torch.tensor(next(iterators[r])) for r in range(2)}
        # forgotten: pool samples whose position is a multiple of 3 (prior-correct: every sample here)
        correct = {r: (batches[r] - ranks[r].num_finetune) % 3 != 0 for r in range(2)}
        group = _Group({r: [batches[r], correct[r]] for r in range(2)})  # the feedback gathers ids, then flags
        for r in order:
            trainer = SimpleNamespace(global_step=1, world_size=2, strategy=group.strategy(r))
            outputs = {"loss": torch.tensor(0.0), "per_sample": {"sample_id": batches[r], "correct": correct[r]}}
            feedbacks[r].on_train_batch_end(trainer, None, outputs, None, step)  # type: ignore[arg-type]
        gathered = torch.cat([batches[0], batches[1]])
        flags = torch.cat([correct[0], correct[1]])
        pool = gathered >= one.num_finetune
        one.update(gathered[pool] - one.num_finetune, ~flags[pool])
    assert torch.equal(ranks[0].alpha, ranks[1].alpha) and torch.equal(ranks[0].seen, ranks[1].seen)
    assert torch.allclose(ranks[0].alpha, one.alpha, atol=1e-6)
    assert int(ranks[0].seen.sum()) == int(one.seen.sum()) > 0 and 0 < int(ranks[0].forgot.sum()) < int(one.seen.sum())
    assert float(ranks[0].alpha.max() - ranks[0].alpha.min()) > 0.05, "the observations moved the rates apart"
