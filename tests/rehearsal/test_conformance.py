"""The rehearsal family under the settings real fine-tuning runs use (issue 10): mid-epoch resume, dataloader reloads,
reuse for a second fit, metrics in ``callback_metrics``, loop settings, bf16 precisions and model outputs, sharded
strategies."""

from __future__ import annotations

import itertools
from collections import deque
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from lightning_ft.demos.vision import ImageClassifier
from lightning_ft.rehearsal import (
    CollateralDamageSampler,
    FLOWReweighting,
    ReferenceStatistics,
    RehearsalDataModule,
    RehearsalFeedback,
    WithSampleIds,
)
from tests.helpers.data import digits, flow_datamodule, rehearsal_datamodule
from tests.helpers.kinds import DictClassifier, OutputClassifier
from tests.helpers.models import tiny_mlp_classifier
from tests.helpers.resume import quiet_trainer

NUM_FINETUNE = 128  # rehearsal_datamodule: 128 task-B samples in batches of 16 (8 per epoch), pool of 200


class RecordIds(Callback):
    """The sample ids of every training batch, with the global step it ended at."""

    def __init__(self) -> None:
        self.batches: dict[int, list[int]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.batches[trainer.global_step] = batch[2].tolist()


def _params(module: torch.nn.Module) -> Tensor:
    return torch.cat([p.detach().float().flatten() for p in module.parameters()])


def _same_sampler_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["epoch"] == b["epoch"] and a["position"] == b["position"]
    assert a["policy"].keys() == b["policy"].keys()
    for key in ("alpha", "seen", "forgot"):
        assert key not in a["policy"] or torch.equal(a["policy"][key], b["policy"][key]), key


def _rehearsal_fit(data: RehearsalDataModule, callbacks: list[Callback], ckpt_path: str | None = None, **kwargs: Any):
    pl.seed_everything(0, verbose=False)
    module = tiny_mlp_classifier()
    trainer = quiet_trainer(callbacks=callbacks, use_distributed_sampler=False, **{"max_epochs": 2, **kwargs})
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer, module


# --- 1. mid-epoch resume -----------------------------------------------------------------------------------------


def _with_workers(data: RehearsalDataModule, num_workers: int) -> RehearsalDataModule:
    """``data`` whose wrapped module's training loader has ``num_workers`` workers (they draw batches ahead)."""
    if num_workers:
        inner = data.datamodule.train_dataloader()
        data.datamodule = pl.LightningDataModule.from_datasets(
            train_dataset=inner.dataset, batch_size=inner.batch_size, num_workers=num_workers
        )
    return data


@pytest.mark.parametrize(
    ("strategy", "step", "num_workers"), [("mixcd", 3, 0), ("mixcd", 11, 0), ("random", 5, 0), ("mixcd", 3, 2)]
)
def test_mid_epoch_resume_equals_the_uninterrupted_fit(tmp_path: Path, strategy: str, step: int, num_workers: int):
    """Resuming from ``every_n_train_steps`` checkpoints in the middle of epoch 0 or 1 (8 batches an epoch) used to
    crash (AssertionError in RehearsalFeedback); it continues with the next batch of the interrupted epoch and ends
    with the uninterrupted fit's parameters, batches and sampler state, also when loader workers drew batches ahead
    of the checkpoint."""

    def checkpoint() -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")

    full_record, full_feedback = RecordIds(), RehearsalFeedback(log_every_n_steps=1)
    full_data = _with_workers(rehearsal_datamodule(strategy=strategy), num_workers)
    _, full_module = _rehearsal_fit(full_data, [full_feedback, full_record, checkpoint()], enable_checkpointing=True)

    saved = torch.load(tmp_path / f"step={step}.ckpt", weights_only=False)["RehearsalDataModule"]["sampler"]
    assert saved["position"] == step % 8
    assert (saved["pending"] is not None) == (num_workers > 0)  # the workers' batches drawn ahead, drawn again below
    record, feedback = RecordIds(), RehearsalFeedback(log_every_n_steps=1)
    data = _with_workers(rehearsal_datamodule(strategy=strategy), num_workers)
    trainer, module = _rehearsal_fit(
        data, [feedback, record, checkpoint()], ckpt_path=str(tmp_path / f"step={step}.ckpt"), enable_checkpointing=True
    )
    assert trainer.global_step == 16
    assert record.batches == {s: ids for s, ids in full_record.batches.items() if s > step}
    assert torch.equal(_params(module), _params(full_module))
    _same_sampler_state(data.sampler.state_dict(), full_data.sampler.state_dict())
    # one copy of the sampler state per checkpoint: the data module's
    assert feedback.state_dict() == {"sampler_saved_by": "RehearsalDataModule"}


def _own_loader() -> DataLoader:
    """Your own DataLoader with a CollateralDamageSampler (no RehearsalDataModule): the feedback checkpoints it."""
    x, y = digits()
    data = ConcatDataset(
        [
            WithSampleIds(TensorDataset(1 - x[:128], (y[:128] + 3) % 10)),
            WithSampleIds(TensorDataset(x[200:400], y[200:400]), offset=NUM_FINETUNE),
        ]
    )
    loss = torch.rand(200, generator=torch.Generator().manual_seed(0))
    sampler = CollateralDamageSampler(NUM_FINETUNE, loss, loss < 0.8, batch_size=16, replay_per_step=4, num_bins=4)
    return DataLoader(data, batch_sampler=sampler)


def test_mid_epoch_resume_of_a_sampler_in_your_own_loader(tmp_path: Path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1, filename="{step}")
    pl.seed_everything(0, verbose=False)
    full_module, full_loader, full_feedback = tiny_mlp_classifier(), _own_loader(), RehearsalFeedback()
    trainer = quiet_trainer(max_epochs=2, callbacks=[full_feedback, checkpoint], enable_checkpointing=True)
    trainer.fit(full_module, full_loader)
    pl.seed_everything(0, verbose=False)
    module, loader, feedback = tiny_mlp_classifier(), _own_loader(), RehearsalFeedback()
    trainer = quiet_trainer(max_epochs=2, callbacks=[feedback])
    trainer.fit(module, loader, ckpt_path=str(tmp_path / "step=5.ckpt"))
    assert torch.equal(_params(module), _params(full_module))
    _same_sampler_state(feedback.state_dict()["sampler"], full_feedback.state_dict()["sampler"])
    _same_sampler_state(loader.batch_sampler.state_dict(), full_loader.batch_sampler.state_dict())


def _run(samplers: list[CollateralDamageSampler], ahead: int, save_at: int = -1):
    """Every rank's batches of one epoch through a loader that draws ``ahead`` batches ahead of the training, with the
    same (all-gathered) feedback to every rank; rank 0's state when ``save_at`` batches were trained."""
    iterators = [iter(s) for s in samplers]
    prefetched = [deque(itertools.islice(it, ahead)) for it in iterators]
    trained: list[list[list[int]]] = [[] for _ in samplers]
    state = None
    while prefetched[0]:
        if len(trained[0]) == save_at:
            state = samplers[0].state_dict(consumed=save_at)
        batches = [queue.popleft() for queue in prefetched]
        for out, batch in zip(trained, batches, strict=True):
            out.append(batch)
        n = samplers[0].num_finetune
        positions = np.asarray([i - n for batch in batches for i in batch if i >= n])
        for sampler in samplers:
            sampler.update(positions, positions % 3 == 0)
        for it, queue in zip(iterators, prefetched, strict=True):
            following = next(it, None)
            if following is not None:
                queue.append(following)
    return trained, state


@pytest.mark.parametrize("strategy", ["mixcd", "loss_priority"])
def test_batches_drawn_ahead_of_a_checkpoint_are_drawn_again_on_every_rank(strategy: str):
    """A loader with workers draws batches ahead of the training; ``state_dict(consumed=k)`` makes a restored sampler
    draw the untrained ones again as they were (with the draw probabilities they were drawn with), on every rank
    from rank 0's state, then continue the same stream."""
    gen = torch.Generator().manual_seed(0)
    loss, correct = torch.rand(300, generator=gen), torch.rand(300, generator=gen) < 0.8

    def make(rank: int) -> CollateralDamageSampler:
        return CollateralDamageSampler(
            101, loss, correct, batch_size=8, replay_per_step=3, strategy=strategy, rank=rank, world_size=2
        )

    ahead, consumed = 3, 2
    originals = [make(rank) for rank in range(2)]
    full, state = _run(originals, ahead, save_at=consumed)
    assert state is not None and state["position"] == consumed and len(state["pending"]) == ahead
    restored = [make(rank) for rank in range(2)]
    for sampler in restored:
        sampler.load_state_dict(state)
    resumed, _ = _run(restored, ahead)
    assert resumed == [batches[consumed:] for batches in full]
    for a, b in zip(originals, restored, strict=True):
        _same_sampler_state(a.state_dict(), b.state_dict())


def test_a_state_saved_at_the_end_of_an_epoch_continues_with_the_next_epoch():
    loss = torch.rand(50, generator=torch.Generator().manual_seed(0))
    sampler = CollateralDamageSampler(40, loss, torch.ones(50, dtype=torch.bool), batch_size=8)
    list(sampler)
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (0, 5)
    sampler.set_epoch(1)
    expected = list(sampler)
    restored = CollateralDamageSampler(40, loss, torch.ones(50, dtype=torch.bool), batch_size=8)
    restored.load_state_dict(state)
    assert restored.epoch == 1
    restored.set_epoch(1)  # Lightning sets the epoch it starts: the same one, nothing changes
    assert list(restored) == expected


def test_drawing_too_far_ahead_of_a_checkpoint_is_a_clear_error():
    sampler = CollateralDamageSampler(2000, torch.rand(50), torch.ones(50, dtype=torch.bool), batch_size=1)
    iterator = iter(sampler)
    for _ in range(100):
        next(iterator)
    with pytest.raises(RuntimeError, match="ahead of the training"):
        sampler.state_dict(consumed=10)


# --- 2. reloads, reuse, loop settings ------------------------------------------------------------------------------


def test_reloading_the_dataloaders_keeps_the_sampler_state():
    """``reload_dataloaders_every_n_epochs=1`` used to rebuild the sampler every epoch, silently resetting mix-cd's
    rates and counts; the reloaded fit now equals the one without reloads."""
    plain_data, plain_feedback = rehearsal_datamodule(), RehearsalFeedback()
    _, plain = _rehearsal_fit(plain_data, [plain_feedback], max_epochs=3)
    data, feedback = rehearsal_datamodule(), RehearsalFeedback()
    _, reloaded = _rehearsal_fit(data, [feedback], max_epochs=3, reload_dataloaders_every_n_epochs=1)
    assert int(data.sampler.seen.sum()) == 3 * 8 * 4
    _same_sampler_state(data.sampler.state_dict(), plain_data.sampler.state_dict())
    assert torch.equal(_params(reloaded), _params(plain))


class SeededStart(Callback):
    """Re-seeds the module's weights at setup: a different starting model for a second fit."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def setup(self, trainer, pl_module, stage) -> None:  # type: ignore[no-untyped-def]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for p in pl_module.parameters():
                p.data.normal_(0, 0.3)


def test_a_datamodule_and_feedback_reused_for_a_second_fit_behave_like_fresh_ones():
    """The second fit starts from another model: its pool statistics and sampler must be its own (the data module
    used to keep the first fit's statistics)."""
    data, feedback = rehearsal_datamodule(), RehearsalFeedback()
    _rehearsal_fit(data, [feedback])
    _, second = _rehearsal_fit(data, [feedback, SeededStart(1)])
    fresh_data, fresh_feedback = rehearsal_datamodule(), RehearsalFeedback()
    _, reference = _rehearsal_fit(fresh_data, [fresh_feedback, SeededStart(1)])
    assert torch.equal(data.pool_statistics.loss, fresh_data.pool_statistics.loss)
    _same_sampler_state(data.sampler.state_dict(), fresh_data.sampler.state_dict())
    assert feedback.state_dict() == fresh_feedback.state_dict()
    assert torch.equal(_params(second), _params(reference))


def test_given_pool_statistics_are_kept_for_a_second_fit():
    stats = ReferenceStatistics(torch.arange(200), torch.rand(200), torch.ones(200, dtype=torch.bool))
    data = rehearsal_datamodule(pool_statistics=stats)
    _rehearsal_fit(data, [RehearsalFeedback()], max_epochs=1)
    _rehearsal_fit(data, [RehearsalFeedback()], max_epochs=1)
    assert data.pool_statistics is stats


@pytest.mark.parametrize(
    ("kwargs", "batches", "steps"),
    [({"accumulate_grad_batches": 2}, 16, 8), ({"limit_train_batches": 3}, 6, 6)],
)
def test_loop_settings(kwargs: dict[str, Any], batches: int, steps: int):
    data, feedback = rehearsal_datamodule(), RehearsalFeedback(log_every_n_steps=1)
    trainer, module = _rehearsal_fit(data, [feedback], **kwargs)
    assert trainer.global_step == steps
    assert int(data.sampler.seen.sum()) == 4 * batches  # every batch's 4 rehearsed samples reported
    assert torch.isfinite(_params(module)).all()


# --- 3. metrics ----------------------------------------------------------------------------------------------------


def test_metrics_reach_callback_metrics_and_can_be_monitored(tmp_path: Path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="rehearsal/cd_hit_rate_total", mode="min", save_top_k=1)
    trainer, _ = _rehearsal_fit(
        rehearsal_datamodule(), [RehearsalFeedback(log_every_n_steps=1), checkpoint], enable_checkpointing=True
    )
    metrics = trainer.callback_metrics
    assert {"rehearsal/cd_hit_rate", "rehearsal/replay_loss", "rehearsal/alpha_0"} <= set(metrics)
    assert checkpoint.best_model_path

    pl.seed_everything(0, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "flow", monitor="flow/tau", mode="max", save_top_k=1)
    trainer = quiet_trainer(max_epochs=1, callbacks=[FLOWReweighting(), checkpoint], enable_checkpointing=True)
    trainer.fit(tiny_mlp_classifier(), flow_datamodule())
    assert {"flow/tau", "flow/mean_weight"} <= set(trainer.callback_metrics)
    assert checkpoint.best_model_path


# --- 4. precision and model outputs ---------------------------------------------------------------------------------


KINDS = {"tensor": ImageClassifier, "dict": DictClassifier, "model_output": OutputClassifier}  # built as MLPs
MLP = {"arch": "mlp", "width": 4, "lr": 0.05}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_statistics_passes_read_dict_and_model_output_returns(kind: str):
    """The pool statistics pass and FLOW's pass used to fail on dict returns (no logits read from them)."""
    pl.seed_everything(0, verbose=False)
    data = rehearsal_datamodule()
    trainer = quiet_trainer(max_epochs=1, callbacks=[RehearsalFeedback()], use_distributed_sampler=False)
    trainer.fit(KINDS[kind](**MLP), data)
    pl.seed_everything(0, verbose=False)
    flow = FLOWReweighting()
    quiet_trainer(max_epochs=1, callbacks=[flow]).fit(KINDS[kind](**MLP), flow_datamodule())
    reference = ReferenceStatistics.compute(ImageClassifier(**MLP), _pool_loader())
    assert torch.allclose(data.pool_statistics.loss, reference.loss)
    assert flow.statistics is not None and len(flow.statistics) == NUM_FINETUNE


def _pool_loader() -> DataLoader:
    return DataLoader(WithSampleIds(rehearsal_datamodule().pool), batch_size=256)


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_bf16_precisions(precision: str):
    """Under ``bf16-true`` the statistics passes used to feed float32 inputs to bf16 weights (dtype mismatch); they
    now cast the inputs, and run under the Trainer's autocast for ``bf16-mixed``."""
    pl.seed_everything(0, verbose=False)
    data = rehearsal_datamodule()
    trainer = quiet_trainer(
        max_epochs=1, callbacks=[RehearsalFeedback()], use_distributed_sampler=False, precision=precision
    )
    module = tiny_mlp_classifier()
    trainer.fit(module, data)
    assert trainer.global_step == 8 and torch.isfinite(_params(module)).all()
    assert data.pool_statistics.loss.dtype == torch.float32 and torch.isfinite(data.pool_statistics.loss).all()
    reference = ReferenceStatistics.compute(tiny_mlp_classifier(), _pool_loader())
    assert torch.allclose(data.pool_statistics.loss, reference.loss, atol=0.1, rtol=0.05)

    pl.seed_everything(0, verbose=False)
    flow = FLOWReweighting()
    trainer = quiet_trainer(max_epochs=1, callbacks=[flow], precision=precision)
    module = tiny_mlp_classifier()
    trainer.fit(module, flow_datamodule())
    assert trainer.global_step == 8 and torch.isfinite(_params(module)).all()
    assert torch.isfinite(flow.statistics.loss).all() and trainer.callback_metrics["flow/tau"] > 0


def test_statistics_progress_bar_follows_the_trainer(capsys):
    quiet_trainer(max_epochs=1, callbacks=[FLOWReweighting()]).fit(tiny_mlp_classifier(), flow_datamodule())
    assert "FLOW reference statistics" not in capsys.readouterr().err
    trainer = quiet_trainer(max_epochs=1, callbacks=[FLOWReweighting()], enable_progress_bar=True)
    trainer.fit(tiny_mlp_classifier(), flow_datamodule())
    assert "FLOW reference statistics" in capsys.readouterr().err


# --- 5. sharded strategies -----------------------------------------------------------------------------------------


def _sharded() -> list[Any]:
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    # uninitialised instances: only their type matters to the check (real ones need GPUs or deepspeed)
    return [object.__new__(FSDPStrategy), object.__new__(DeepSpeedStrategy)]


@pytest.mark.parametrize("strategy", _sharded(), ids=["fsdp", "deepspeed"])
def test_sharded_strategies_are_refused_at_setup(strategy: Any):
    trainer = quiet_trainer()
    trainer._accelerator_connector.strategy = strategy
    name = type(strategy).__name__
    for callback in (RehearsalFeedback(), FLOWReweighting()):
        with pytest.raises(ValueError, match=f"does not support {name}"):
            callback.setup(trainer, tiny_mlp_classifier(), "fit")
    data = rehearsal_datamodule()
    data.trainer = trainer
    with pytest.raises(ValueError, match=f"pool_statistics.*does not support {name}"):
        data.setup("fit")
    stats = ReferenceStatistics(torch.arange(200), torch.rand(200), torch.ones(200, dtype=torch.bool))
    given = rehearsal_datamodule(pool_statistics=stats)
    given.trainer = trainer
    given.setup("fit")  # nothing to compute: the sampler itself is data-side only
