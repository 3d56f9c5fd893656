"""CollateralDamageSampler: batch layout, sharding, uniformity, the collateral-damage hit rate, baselines, state."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import (
    BatchSampler,
    ConcatDataset,
    DataLoader,
    DistributedSampler,
    SequentialSampler,
    TensorDataset,
)

from lightning_ft.rehearsal import (
    STRATEGIES,
    CollateralDamageSampler,
    LossPriorityPolicy,
    RandomPolicy,
    ReplayBatchSampler,
    ReplayBudget,
)

M = 1000


@pytest.fixture(scope="module")
def pool():
    gen = torch.Generator().manual_seed(0)
    loss = torch.rand(M, generator=gen) * 3
    correct = torch.rand(M, generator=gen) > 0.2
    return loss, correct


def make(pool, **kwargs):
    loss, correct = pool
    defaults = {"num_finetune": 100, "batch_size": 10, "replay_per_step": 10}
    return CollateralDamageSampler(pool_loss=loss, pool_correct=correct, **{**defaults, **kwargs})


def test_batches_hold_the_shard_then_the_replay(pool):
    sampler = make(pool, replay_per_step=None, replay_ratio=0.2, num_finetune=95)
    assert sampler.replay == 2  # 10 fine-tuning samples, 20% of the batch: r = 10 * 0.2 / 0.8 = 2.5 -> 2 (draw())
    batches = list(sampler)
    assert len(batches) == len(sampler) == 10
    finetune = [i for b in batches for i in b if i < 95]
    assert sorted(finetune) == list(range(95))  # every fine-tuning sample once per epoch
    for k, batch in enumerate(batches):  # the half sample carries over: 3, 2, 3, 2, ... pool samples
        r = 3 if k % 2 == 0 else 2
        assert all(i >= 95 for i in batch[-r:]) and all(i < 95 for i in batch[:-r])
        assert sampler.is_replay(torch.tensor(batch)).sum() == r
    assert len(make(pool, num_finetune=95, drop_last=True)) == 9


def test_works_as_a_dataloader_batch_sampler(pool):
    finetune = TensorDataset(torch.zeros(100, 2), torch.zeros(100, dtype=torch.long))
    replay = TensorDataset(torch.ones(M, 2), torch.ones(M, dtype=torch.long))
    loader = DataLoader(ConcatDataset([finetune, replay]), batch_sampler=make(pool))
    x, y = next(iter(loader))
    assert x.shape == (20, 2) and y[:10].eq(0).all() and y[10:].eq(1).all()


def test_ranks_get_equal_padded_shards_and_the_epoch_reshuffles(pool):
    shards, lengths = [], []
    for rank in range(3):
        sampler = make(pool, num_finetune=100, rank=rank, world_size=3)
        shards.append([i for b in sampler for i in b if i < 100])
        lengths.append(len(sampler))
    assert set().union(*shards) == set(range(100))
    # padded like DistributedSampler: 34 per rank, the first 2 of the epoch's order twice, so every rank runs 4 steps
    assert [len(s) for s in shards] == [34, 34, 34] and lengths == [4, 4, 4]
    assert sum(map(len, shards)) - len(set().union(*shards)) == 2
    sampler = make(pool)
    first = [b[:10] for b in sampler]
    sampler.set_epoch(1)
    assert [b[:10] for b in sampler] != first


def test_equal_rates_without_exploration_are_uniform_over_prior_correct_samples(pool):
    correct = pool[1]
    sampler = make(pool, epsilon=0.0, num_bins=10)
    draws = torch.cat([sampler.draw(1000) for _ in range(40)])
    assert bool(correct[draws].all()), "mix-cd never rehearses prior-incorrect samples by default"
    # chi-square goodness of fit of the bin counts against bin sizes (9 degrees of freedom, p = 0.001: 27.88)
    counts = torch.bincount(sampler.bin_of[draws], minlength=sampler.num_bins).float()
    expected = sampler.bin_sizes.float() / sampler.bin_sizes.sum() * draws.numel()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.88, chi2
    # and within the pool: every eligible sample about equally often
    per_sample = torch.bincount(draws, minlength=M)[correct].float()
    assert per_sample.min() > 0 and per_sample.std() / per_sample.mean() < 0.2


def _hit_rate(sampler, cd_bin_of, correct, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    rates = []
    for _ in range(steps):
        pos = sampler.draw()
        forgot = (cd_bin_of[pos] == 3) & correct[pos] & (torch.rand(pos.numel(), generator=gen) < 0.9)
        sampler.update(pos, forgot)
        rates.append(forgot.float().mean().item())
    return sum(rates[-50:]) / 50


def test_mixcd_finds_the_forgotten_bin_within_bounded_steps(pool):
    """One bin has a collateral-damage rate of 0.9, the others 0: mix-cd's hit rate rises well above random."""
    correct = pool[1]
    cd_bin_of = make(pool).bin_of
    random_rate = _hit_rate(make(pool, strategy="random"), cd_bin_of, correct, 150)
    mixcd = make(pool)
    mixcd_rate = _hit_rate(mixcd, cd_bin_of, correct, 150)
    assert random_rate < 0.15
    assert mixcd_rate > 0.6 and mixcd_rate > 4 * random_rate, (mixcd_rate, random_rate)
    assert mixcd.alpha[3] > 0.5 and mixcd.alpha[torch.arange(10) != 3].max() < 0.1
    assert mixcd.probabilities()[3] > 0.6
    assert mixcd.hit_rate == pytest.approx(float(mixcd.forgot.sum()) / float(mixcd.seen.sum()))


def test_exploration_and_floor_keep_every_bin_alive(pool):
    sampler = make(pool, epsilon=0.1, alpha_min=0.01)
    sampler.alpha[:] = 0.0
    sampler.alpha[0] = 1.0
    pi = sampler.probabilities()
    assert torch.isclose(pi.sum(), torch.tensor(1.0)) and bool((pi > 0.009).all())


def test_baselines(pool):
    loss, correct = pool
    prior_correct = make(pool, strategy="random_prior_correct")
    assert bool(correct[torch.cat([prior_correct.draw(500) for _ in range(4)])].all())
    priority = make(pool, strategy="loss_priority", replay_per_step=7)
    drawn = torch.cat([priority.draw() for _ in range(3)])
    assert torch.equal(drawn, torch.argsort(loss, descending=True)[:21])  # highest reference loss first
    random = make(pool, strategy="random")
    assert not bool(correct[torch.cat([random.draw(500) for _ in range(4)])].all())  # it draws everything
    with_incorrect = make(pool, exclude_prior_incorrect=False, num_bins=10)
    assert with_incorrect.num_bins == 11 and int(with_incorrect.bin_sizes[-1]) == int((~correct).sum())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_state_round_trip_reproduces_the_stream(pool, strategy):
    sampler = make(pool, strategy=strategy)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):  # some history: rates and counts
        pos = sampler.draw()
        sampler.update(pos, torch.rand(pos.numel(), generator=gen) < 0.5)
    sampler.set_epoch(2)
    state = sampler.state_dict()
    expected = list(sampler)
    restored = make(pool, strategy=strategy)
    restored.load_state_dict(state)
    assert list(restored) == expected
    assert strategy != "mixcd" or torch.equal(restored.alpha, sampler.alpha)
    assert torch.equal(restored.seen, sampler.seen) and torch.equal(restored.forgot, sampler.forgot)


# the first batch's pool indices and, after 20 steps of feedback, the next draws: a change of these streams changes
# every benchmark number (re-pinned when issue 12 seeded every batch's draws by (seed, epoch, batch, rank))
PINNED = {
    "mixcd": ([603, 872, 344, 839], [676, 929, 442, 934]),
    "random": ([626, 841, 274, 871], [667, 927, 462, 964]),
    "random_prior_correct": ([638, 852, 291, 877], [681, 925, 480, 964]),
    "loss_priority": ([485, 437, 878, 630], [781, 923, 935, 234]),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pinned_stream_per_strategy(pool, strategy):
    """Regression pin (Avalanche #574): a fixed seed gives fixed draws for every strategy, with and without feedback."""
    loss, _ = pool
    sampler = make(pool, strategy=strategy)
    first = next(iter(sampler))[10:14]
    feedback = torch.Generator().manual_seed(1)
    for _ in range(20):
        positions = sampler.draw()
        sampler.update(positions, torch.rand(positions.numel(), generator=feedback) < loss[positions] / 3)
    assert (first, sampler.draw()[:4].tolist()) == PINNED[strategy]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"replay_ratio": 1.0}, "replay_ratio"),
        ({"replay_ratio": -0.1}, "replay_ratio"),
        ({"epsilon": 1.5}, "epsilon"),
        ({"strategy": "mir"}, "strategy"),
        ({"beta": 0.0}, "beta"),
        ({"num_bins": 0}, "num_bins"),
        ({"batch_size": 0}, "batch_size"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"alpha_min": -1.0}, "alpha_min"),
    ],
)
def test_bad_arguments(pool, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(pool, **kwargs)


def test_bad_pools():
    with pytest.raises(ValueError, match="empty"):
        CollateralDamageSampler(10, [], [], 4)
    with pytest.raises(ValueError, match="pool_correct"):
        CollateralDamageSampler(10, [0.1, 0.2], [True], 4)
    with pytest.raises(ValueError, match="NaN"):
        CollateralDamageSampler(10, [0.1, float("nan")], [True, True], 4)
    with pytest.raises(ValueError, match="nothing to rehearse"):
        CollateralDamageSampler(10, [0.1, 0.2], [False, False], 4)


def test_update_rejects_mismatched_or_out_of_range_positions(pool):
    sampler = make(pool)
    with pytest.raises(ValueError, match="forgot flags"):
        sampler.update(torch.tensor([1, 2]), torch.tensor([True]))
    with pytest.raises(ValueError, match="pool positions"):
        sampler.update(torch.tensor([M]), torch.tensor([True]))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    batch=st.integers(1, 16),
    world=st.integers(1, 4),
    replay=st.integers(0, 5),
    seed=st.integers(0, 10_000),
)
def test_bookkeeping_fuzz(pool, n, batch, world, replay, seed):
    loss, correct = pool
    seen_ft = []
    for rank in range(world):
        sampler = CollateralDamageSampler(
            n, loss[:50], correct[:50], batch, replay_per_step=replay, seed=seed, rank=rank, world_size=world
        )
        batches = list(sampler)
        assert len(batches) == len(sampler) == CollateralDamageSampler.num_batches(n, batch, world)
        for b in batches:
            assert len(b) - sum(i >= n for i in b) <= batch
            assert sum(i >= n for i in b) == replay
            assert all(n <= i < n + 50 for i in b if i >= n)
        seen_ft += [i for b in batches for i in b if i < n]
        pos = sampler.draw(7)
        before = sampler.seen.sum().item()
        sampler.update(pos, torch.ones(7, dtype=torch.bool))
        assert sampler.seen.sum().item() == before + 7 and sampler.forgot.sum().item() == before + 7
        assert bool(((sampler.alpha >= 0) & (sampler.alpha <= 1)).all())
    assert set(seen_ft) == set(range(n))  # every sample; padding repeats at most world - 1 of them
    assert len(seen_ft) == math.ceil(n / world) * world


def test_copies_keep_state_and_probabilities_are_a_copy(pool):
    import copy
    import pickle

    sampler = make(pool)
    for clone in (copy.deepcopy(sampler), pickle.loads(pickle.dumps(sampler))):
        positions = clone.draw()
        clone.update(positions, torch.ones(positions.numel(), dtype=torch.bool))
        assert int(clone.seen.sum()) == positions.numel() and clone.hit_rate == 1.0
        assert int(sampler.seen.sum()) == 0, "the original is untouched"
    pi = sampler.probabilities()
    pi.zero_()
    assert float(sampler.probabilities().sum()) == pytest.approx(1.0)


def test_ranks_rehearse_different_samples_with_identical_state(pool):
    samplers = [make(pool, rank=rank, world_size=2) for rank in range(2)]
    draws = [s.draw() for s in samplers]
    assert not torch.equal(draws[0], draws[1])
    gathered = torch.cat(draws)
    for s in samplers:  # every rank gets the all-gathered feedback
        s.update(gathered, torch.arange(gathered.numel()) % 3 == 0)
    a, b = (s.state_dict() for s in samplers)
    assert torch.equal(a["policy"]["alpha"], b["policy"]["alpha"]) and a["epoch"] == b["epoch"]
    assert torch.equal(samplers[0].probabilities(), samplers[1].probabilities())


def test_pool_groups_bin_each_group_by_loss(pool):
    loss, correct = pool
    groups = torch.arange(M) % 4
    sampler = make(pool, num_bins=3, pool_groups=groups)
    assert sampler.num_bins == 12
    eligible = correct.nonzero().flatten()
    bins = sampler.bin_of[eligible]
    for k in range(12):  # every bin holds one group's samples, a third of that group's prior-correct ones
        members = eligible[bins == k]
        assert torch.unique(groups[members]).numel() == 1
        group = groups[members[0]]
        assert abs(members.numel() - int((groups[eligible] == group).sum()) / 3) <= 2
    # inside a group, the bins are ordered by reference loss
    g0 = eligible[groups[eligible] == 0]
    assert loss[g0][sampler.bin_of[g0] == 0].max() <= loss[g0][sampler.bin_of[g0] == 1].min()
    assert int(sampler.bin_sizes.sum()) == eligible.numel()


def test_pool_groups_must_be_integers_per_pool_sample(pool):
    with pytest.raises(ValueError, match="pool_groups"):
        make(pool, pool_groups=torch.zeros(M - 1, dtype=torch.long))
    with pytest.raises(ValueError, match="pool_groups"):
        make(pool, pool_groups=torch.rand(M))


def test_wraps_any_fine_tuning_batch_sampler_and_shards_through_distributed_sampler(pool):
    loss, correct = pool

    def fine_tuning(rank: int) -> BatchSampler:
        return BatchSampler(DistributedSampler(range(50), num_replicas=2, rank=rank, seed=3), 5, drop_last=False)

    replays = []
    for rank in range(2):
        inner = fine_tuning(rank)
        sampler = ReplayBatchSampler(inner, 50, RandomPolicy(loss, correct), ReplayBudget(5, replay_per_step=2))
        assert (sampler.rank, sampler.world_size) == (rank, 2), "taken from the DistributedSampler"
        batches = list(sampler)
        assert [b[:-2] for b in batches] == list(fine_tuning(rank)), "the wrapped batches, unchanged"
        assert all(50 <= i < 50 + M for b in batches for i in b[-2:])
        replays.append([b[-2:] for b in batches])
        sampler.set_epoch(1)
        assert inner.sampler.epoch == 1, "set_epoch reaches the wrapped sampler"
    assert replays[0] != replays[1], "the ranks draw their own pool samples"
    ordered = ReplayBatchSampler(
        BatchSampler(SequentialSampler(range(10)), 4, drop_last=False),
        10,
        LossPriorityPolicy(loss, correct),
        ReplayBudget(4, replay_per_step=1),
    )
    assert [b[:-1] for b in ordered] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError, match="ReplayPolicy"):
        ReplayBatchSampler(BatchSampler(SequentialSampler(range(10)), 4, False), 10, "mixcd", ReplayBudget(4))  # type: ignore[arg-type]


def test_a_state_of_the_previous_sampler_version_restores_rates_counts_and_position(pool):
    legacy = {
        "epoch": 1,
        "position": 3,
        "replay": None,
        "alpha": torch.linspace(0, 1, 10),
        "seen": torch.arange(10),
        "forgot": torch.zeros(10, dtype=torch.long),
        "cursor": 0,
        "generator": torch.Generator().get_state(),
    }
    sampler = make(pool)
    sampler.load_state_dict(legacy)
    assert torch.equal(sampler.alpha, legacy["alpha"]) and torch.equal(sampler.seen, legacy["seen"])
    assert sampler.epoch == 1 and len(list(sampler)) == len(sampler) - 3
    baseline = make(pool, strategy="random")
    baseline.load_state_dict({**legacy, "alpha": torch.ones(1), "seen": torch.tensor([5]), "forgot": torch.tensor([2])})
    assert baseline.hit_rate == pytest.approx(0.4)
