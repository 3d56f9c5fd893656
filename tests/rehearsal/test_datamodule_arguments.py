"""RehearsalDataModule's arguments (issue 12): bad sampler arguments fail at construction, before the pool statistics
pass; the DataLoader, sampler and statistics-pass arguments reach their destinations; the pool pass is sharded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from lightning_ft.rehearsal import ReferenceStatistics, RehearsalDataModule
from tests.helpers.data import rehearsal_datamodule
from tests.helpers.models import tiny_mlp_classifier
from tests.helpers.resume import quiet_trainer

NUM_FINETUNE, POOL = 128, 200  # rehearsal_datamodule


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"replay_ratio": 1.5, "replay_per_step": None}, r"`replay_ratio` must be in \[0, 1\), got 1.5"),
        ({"strategy": "mir"}, r"`strategy` must be one of \('mixcd'.*got 'mir'"),
        ({"epsilon": 2}, r"`epsilon` must be in \[0, 1\], got 2"),
        ({"alpha_init": 1.5}, r"`alpha_init` must be in \[0, 1\], got 1.5"),
        ({"beta": 0.0}, r"`beta` must be in \(0, 1\], got 0.0"),
        ({"alpha_min": -0.1}, r"`alpha_min` must be >= 0, got -0.1"),
        ({"num_bins": 0}, r"`num_bins` must be an integer >= 1, got 0"),
        ({"replay_per_step": -1}, r"`replay_per_step` must be an integer >= 0 or None, got -1"),
        ({"pool_groups": [0, 1, 2]}, r"`pool_groups` must hold one integer group per pool sample \(200\)"),
        ({"task": "seq2seq"}, r"`task` must be one of \('classification', 'causal_lm'\), got 'seq2seq'"),
        ({"statistics_batch_size": 0}, r"`statistics_batch_size` must be an integer >= 1, got 0"),
        ({"lm_correct_threshold": 2.0}, r"`lm_correct_threshold` must be in \[0, 1\], got 2.0"),
        ({"correct_fn": "argmax"}, r"`correct_fn` must be callable or None, got 'argmax'"),
        ({"prefetch_factor": 0}, r"`prefetch_factor` must be an integer >= 1 or None, got 0"),
        ({"persistent_workers": "yes"}, r"`persistent_workers` must be True, False or None, got 'yes'"),
        ({"worker_init_fn": 3}, r"`worker_init_fn` must be callable"),
        ({"generator": 0}, r"`generator` must be a torch.Generator or None, got int"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rehearsal_datamodule(**kwargs)


def test_good_groups_and_token_budget_are_accepted_at_construction():
    rehearsal_datamodule(pool_groups=[i % 3 for i in range(POOL)], num_bins=2)
    rehearsal_datamodule(budget="tokens", replay_per_step=None, replay_ratio=0.1)


def _given_statistics(pool_size: int = POOL) -> ReferenceStatistics:
    gen = torch.Generator().manual_seed(0)
    return ReferenceStatistics(torch.arange(pool_size), torch.rand(pool_size, generator=gen), torch.ones(pool_size))


class _Inner:
    """A fine-tuning data module stand-in whose train_dataloader is the given DataLoader."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.val_dataloader = self.test_dataloader = self.predict_dataloader = lambda: []

    def train_dataloader(self) -> DataLoader:
        return self.loader


def _init_worker(worker_id: int) -> None:  # a module-level function: picklable for worker processes
    torch.manual_seed(worker_id)


def _datamodule(loader: DataLoader, **kwargs) -> RehearsalDataModule:
    pool = TensorDataset(torch.zeros(POOL, 3), torch.zeros(POOL, dtype=torch.long))
    return RehearsalDataModule(
        _Inner(loader),  # type: ignore[arg-type]
        pool,
        pool_statistics=_given_statistics(),
        replay_per_step=2,
        **kwargs,
    )


def _finetune_loader(**kwargs) -> DataLoader:
    data = TensorDataset(torch.arange(40, dtype=torch.float32).unsqueeze(1).repeat(1, 3), torch.zeros(40).long())
    return DataLoader(data, batch_size=8, **kwargs)


def test_loader_arguments_reach_the_mixed_batch_loader():
    generator = torch.Generator().manual_seed(3)
    data = _datamodule(
        _finetune_loader(num_workers=1),
        persistent_workers=True,
        prefetch_factor=3,
        worker_init_fn=_init_worker,
        generator=generator,
    )
    loader = data.train_dataloader()
    assert loader.num_workers == 1
    assert loader.persistent_workers is True and loader.prefetch_factor == 3
    assert loader.worker_init_fn is _init_worker and loader.generator is generator
    # None: the wrapped module's loader settings
    inner = _finetune_loader(num_workers=1, persistent_workers=True, prefetch_factor=4, worker_init_fn=_init_worker)
    loader = _datamodule(inner).train_dataloader()
    assert loader.persistent_workers is True and loader.prefetch_factor == 4 and loader.worker_init_fn is _init_worker
    batches = list(loader)  # a worker process loads the mixed batches
    assert len(batches) == 5 and all(b[2].shape == (10,) for b in batches)


def test_sampler_arguments_shuffle_and_alpha_init_reach_the_sampler():
    data = _datamodule(_finetune_loader(), shuffle=False, alpha_init=0.5)
    data.train_dataloader()
    assert data.sampler is not None and data.sampler.shuffle is False
    assert torch.equal(data.sampler.alpha, torch.full_like(data.sampler.alpha, 0.5))
    first = next(iter(data.sampler))
    assert first[:8] == list(range(8))  # not shuffled: the fine-tuning data in order


@pytest.mark.parametrize(("loader_shuffle", "expected"), [(False, False), (True, True)])
def test_shuffle_defaults_to_the_wrapped_loaders(loader_shuffle, expected):
    """Issue 12: shuffle defaulted to True whatever the wrapped train_dataloader() did; None now inherits it."""
    data = _datamodule(_finetune_loader(shuffle=loader_shuffle))
    data.train_dataloader()
    assert data.sampler is not None and data.sampler.shuffle is expected
    assert (next(iter(data.sampler))[:8] == list(range(8))) is not expected


def test_a_custom_fine_tuning_sampler_needs_an_explicit_shuffle():
    weighted = WeightedRandomSampler(torch.ones(40), 40)
    data = _datamodule(_finetune_loader(sampler=weighted))
    with pytest.raises(ValueError, match="shuffle=True or shuffle=False"):
        data.train_dataloader()
    data = _datamodule(_finetune_loader(sampler=weighted), shuffle=True)
    data.train_dataloader()
    assert data.sampler is not None and data.sampler.shuffle is True


def test_statistics_arguments_reach_the_pool_pass(monkeypatch):
    calls = []
    compute = ReferenceStatistics.compute

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return compute(*args, **kwargs)

    monkeypatch.setattr(ReferenceStatistics, "compute", spy)

    def even_ids(logits, batch):  # the pool's ids are its positions
        return batch[-1] % 2 == 0

    data = rehearsal_datamodule(correct_fn=even_ids, lm_correct_threshold=0.3, strategy="random")
    quiet_trainer(max_epochs=1, limit_train_batches=1, use_distributed_sampler=False).fit(tiny_mlp_classifier(), data)
    (kwargs,) = calls
    assert kwargs["lm_correct_threshold"] == 0.3 and kwargs["correct_fn"] is even_ids
    assert torch.equal(data.pool_statistics.correct, torch.arange(POOL) % 2 == 0)


def test_the_statistics_loader_passes_only_this_ranks_shard():
    from lightning_ft.rehearsal.datamodule import _reference_loader

    dataset = list(range(11))
    one = _reference_loader(dataset, 4, None, 0, None)
    assert [int(i) for b in one for i in b] == dataset
    shards = [
        [
            int(i)
            for b in _reference_loader(dataset, 4, None, 0, SimpleNamespace(world_size=2, global_rank=r))
            for i in b
        ]
        for r in range(2)
    ]
    assert shards == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 0]]  # DistributedSampler's padding: compute() dedups it


@pytest.mark.parametrize(
    ("loader", "kwargs", "match"),
    [
        ({}, {"persistent_workers": True}, "need loader workers"),
        ({}, {"prefetch_factor": 2}, "need loader workers"),
        ({"num_workers": 40}, {"prefetch_factor": 2}, "read 80 batches ahead"),
    ],
)
def test_worker_settings_fail_before_the_pool_statistics_pass(loader, kwargs, match, monkeypatch):
    def no_pass(*args, **kwargs):
        raise AssertionError("the pool statistics pass ran before the loader settings were checked")

    monkeypatch.setattr(ReferenceStatistics, "compute", no_pass)
    pool = TensorDataset(torch.zeros(POOL, 3), torch.zeros(POOL, dtype=torch.long))
    data = RehearsalDataModule(_Inner(_finetune_loader(**loader)), pool, replay_per_step=2, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        data.train_dataloader()
