"""FLOW + rehearsal through the public API (issue 12): on a RehearsalDataModule, FLOWReweighting weights the
fine-tuning samples only (rehearsed pool samples keep weight 1), as the demo's former manual set-up did."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_ft.demos import rehearsal as demo
from lightning_ft.rehearsal import (
    FLOWReweighting,
    FLOWWeighting,
    ReferenceStatistics,
    RehearsalDataModule,
    RehearsalFeedback,
    WithSampleIds,
)
from tests.helpers.data import rehearsal_datamodule
from tests.helpers.models import tiny_mlp_classifier
from tests.helpers.resume import quiet_trainer

NUM_FINETUNE = 128  # rehearsal_datamodule: 128 task-B samples, batch 16, 4 pool samples per batch


class RecordWeights(Callback):
    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        ids = batch[2]
        self.batches.append((ids.clone(), pl_module.flow_weighting.weights_for(ids)))


@pytest.mark.parametrize("samples", ["auto", "finetune"])
def test_on_a_rehearsal_datamodule_pool_samples_get_weight_one(samples):
    torch.manual_seed(0)
    module = tiny_mlp_classifier()
    start = {k: v.clone() for k, v in module.state_dict().items()}
    data = rehearsal_datamodule()
    record = RecordWeights()
    callbacks = [RehearsalFeedback(), FLOWReweighting(samples=samples), record]
    quiet_trainer(max_epochs=1, limit_train_batches=3, callbacks=callbacks, use_distributed_sampler=False).fit(
        module, data
    )
    # FLOW's weights of the fine-tuning samples, set up by hand from the starting model
    reference = tiny_mlp_classifier()
    reference.load_state_dict(start)
    task_b = WithSampleIds(data.datamodule.train_dataloader().dataset)
    by_hand = FLOWWeighting(ReferenceStatistics.compute(reference, DataLoader(task_b, batch_size=256)))
    weighting = module.flow_weighting
    assert weighting.statistics.sample_ids.tolist() == list(range(NUM_FINETUNE))  # the pass covers them alone
    assert weighting.tau == pytest.approx(by_hand.tau, rel=1e-6)
    for ids, weights in record.batches:
        pool = ids >= NUM_FINETUNE
        assert int(pool.sum()) == 4
        assert torch.equal(weights[pool], torch.ones(4))
        torch.testing.assert_close(weights[~pool], by_hand.weights_for(ids[~pool]))
        assert float(weights[~pool].max()) < 1.0  # FLOW is active on the fine-tuning samples


def test_all_samples_weights_the_pool_too_and_finetune_needs_a_rehearsal_loader():
    data = rehearsal_datamodule()
    callback = FLOWReweighting(samples="all")
    quiet_trainer(max_epochs=1, limit_train_batches=1, callbacks=[callback], use_distributed_sampler=False).fit(
        tiny_mlp_classifier(), data
    )
    assert len(callback.statistics) == NUM_FINETUNE + 200
    with pytest.raises(ValueError, match=r"samples='finetune'.*batch sampler is a BatchSampler"):
        loader = DataLoader(WithSampleIds(data.datamodule.train_dataloader().dataset), batch_size=16)
        quiet_trainer(max_epochs=1, callbacks=[FLOWReweighting(samples="finetune")]).fit(tiny_mlp_classifier(), loader)
    with pytest.raises(ValueError, match="`samples` must be one of"):
        FLOWReweighting(samples="pool")


def test_unweighted_from_gives_weight_one_and_checks_its_value():
    stats = ReferenceStatistics(torch.arange(4), torch.tensor([0.5, 1.0, 2.0, 4.0]), torch.ones(4))
    flow = FLOWWeighting(stats, unweighted_from=4)
    ids = torch.tensor([0, 7, 3, 4])
    torch.testing.assert_close(
        flow.weights_for(ids), torch.stack([flow.weights[0], torch.tensor(1.0), flow.weights[3], torch.tensor(1.0)])
    )
    assert flow.loss(torch.ones(4), ids) == pytest.approx(float(flow.weights_for(ids).mean()))
    with pytest.raises(ValueError, match="`unweighted_from` must be an integer >= 0 or None, got -1"):
        FLOWWeighting(stats, unweighted_from=-1)


class _FormerFLOWClassifier(demo.FLOWClassifier):
    """The demo's former manual FLOW + rehearsal: ids from ``num_finetune`` on keep weight 1."""

    num_finetune: int | None = None

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y, ids = batch
        logits = self(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        finetune = ids < self.num_finetune
        weights = torch.ones_like(losses)
        weights[finetune] = self.flow_weighting.weights_for(ids[finetune]).to(losses.dtype)
        loss = (weights * losses).mean()
        per_sample = {"sample_id": ids, "correct": logits.detach().argmax(-1) == y, "loss": losses.detach()}
        return {"loss": loss, "per_sample": per_sample}


def _former_flow_mixcd(config, data, state) -> tuple[torch.nn.Module, dict[str, Any]]:
    pl.seed_everything(config.seed, verbose=False)
    module = _FormerFLOWClassifier(arch="mlp", lr=config.lr, seed=config.seed)
    module.load_state_dict(state)
    task_b = WithSampleIds(data["task_b"])
    module.flow_weighting = FLOWWeighting(ReferenceStatistics.compute(module, DataLoader(task_b, batch_size=256)))
    module.num_finetune = len(data["task_b"])
    inner = pl.LightningDataModule.from_datasets(train_dataset=data["task_b"], batch_size=config.batch_size)
    mixed = RehearsalDataModule(
        inner, data["task_a"], strategy="mixcd", replay_per_step=config.replay_per_step, seed=config.seed
    )
    demo._trainer(config.finetune_epochs, [RehearsalFeedback()]).fit(module, mixed)
    return module, {"tau": module.flow_weighting.tau, "cd_hit_rate": mixed.sampler.hit_rate}


def test_demo_flow_mixcd_equals_its_former_manual_set_up(monkeypatch):
    config = demo.RehearsalDemoConfig(pretrain_epochs=1, finetune_epochs=2, n_task_b=256, kinds=("flow_mixcd",))
    data = demo._data(config)
    state = demo.pretrain(config, data)
    evaluated = []
    accuracy = demo._accuracy
    monkeypatch.setattr(demo, "_accuracy", lambda module, x, y: evaluated.append(module) or accuracy(module, x, y))
    row = demo.finetune(config, data, state, "flow_mixcd")
    former, expected = _former_flow_mixcd(config, data, state)
    assert row["tau"] == pytest.approx(expected["tau"], rel=1e-6)
    assert row["cd_hit_rate"] == expected["cd_hit_rate"]
    for new, old in zip(evaluated[0].parameters(), former.parameters(), strict=True):
        torch.testing.assert_close(new, old, rtol=0, atol=1e-6)
    assert not torch.equal(next(former.parameters()), state[next(iter(state))]), "the fit trained"


def test_resuming_with_other_weighted_samples_is_refused(tmp_path):
    """A checkpoint's statistics cover the samples it weighted: resuming a samples='all' fit with the default 'auto'
    (fine-tuning samples only) would silently change the pool samples' weights."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(samples: str, ckpt: str | None = None, **kwargs: Any) -> None:
        checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
        callbacks = [RehearsalFeedback(), FLOWReweighting(samples=samples), checkpoint]
        trainer = quiet_trainer(
            callbacks=callbacks,
            use_distributed_sampler=False,
            enable_checkpointing=True,
            limit_train_batches=2,
            **kwargs,
        )
        trainer.fit(tiny_mlp_classifier(), rehearsal_datamodule(), ckpt_path=ckpt)

    fit("all", max_epochs=1)
    with pytest.raises(ValueError, match="unweighted_from=None -> 128"):
        fit("auto", max_epochs=2, ckpt=str(tmp_path / "last.ckpt"))
