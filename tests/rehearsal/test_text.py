"""The text case's LM module (``lightning_ft.demos.rehearsal_text.RehearsalLM``) with a causal-LM
``RehearsalDataModule`` and ``RehearsalFeedback``: the per-sample contract of ``training_step`` and the sampler's
updates, for plain rehearsal and FLOW + mix-cd (a plumbing test, not an effect test)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_ft.demos._common import cpu_trainer
from lightning_ft.demos.rehearsal_text import RehearsalLM
from lightning_ft.demos.text import PydocTextDataModule, TokenChunks, pydoc_chunks
from lightning_ft.rehearsal import (
    FLOWWeighting,
    ReferenceStatistics,
    RehearsalDataModule,
    RehearsalFeedback,
    WithSampleIds,
)
from tests.helpers.models import TINY_LM

pytestmark = pytest.mark.slow

N_TRAIN, BATCH, REPLAY, EPOCHS = 16, 8, 2, 2


class Outputs(pl.Callback):
    """Keeps every training step's outputs and batch."""

    def __init__(self) -> None:
        self.steps: list[tuple[Any, Any]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.steps.append((outputs, batch))


@pytest.mark.parametrize("kind", ["random", "flow_mixcd"])
def test_lm_module_feeds_the_sampler_through_rehearsal_feedback(kind):
    torch.manual_seed(0)
    module = RehearsalLM(**TINY_LM, lr=1e-3, dropout=0.0)
    data = PydocTextDataModule(seq_len=32, n_train=N_TRAIN, n_val=8, batch_size=BATCH, seed=0)
    pool = TokenChunks(pydoc_chunks(32, "pretrain")[:40])
    kwargs: dict[str, Any] = {"strategy": "random"}
    module.correct_threshold = 0.0  # every chunk of the training pass counts as correct
    if kind == "flow_mixcd":
        # a random model reaches greedy accuracy 0.5 on no chunk: count every pool chunk as prior-correct, and every
        # chunk of the training pass as wrong (threshold above 1), so each rehearsed chunk is reported as forgotten
        loader = DataLoader(WithSampleIds(pool), batch_size=16)
        stats = ReferenceStatistics.compute(module, loader, task="causal_lm", lm_correct_threshold=0.0)
        kwargs = {"strategy": "mixcd", "pool_statistics": stats, "num_bins": 4}
        module.correct_threshold = 1.5
        data.setup("fit")
        assert data.train_dataset is not None
        task_b = DataLoader(WithSampleIds(data.train_dataset), batch_size=16)
        module.flow_weighting = FLOWWeighting(ReferenceStatistics.compute(module, task_b, task="causal_lm"))
        module.num_finetune = N_TRAIN
    mixed = RehearsalDataModule(data, pool, replay_per_step=REPLAY, task="causal_lm", **kwargs)
    outputs = Outputs()
    cpu_trainer(EPOCHS, [RehearsalFeedback(), outputs], use_distributed_sampler=False, limit_val_batches=0).fit(
        module, mixed
    )

    steps = EPOCHS * (N_TRAIN // BATCH)
    assert len(outputs.steps) == steps
    for out, batch in outputs.steps:
        per_sample = out["per_sample"]
        ids = batch["sample_id"]
        assert torch.equal(per_sample["sample_id"], ids) and ids.shape == (BATCH + REPLAY,)
        assert int((ids >= N_TRAIN).sum()) == REPLAY  # the pool's ids follow the fine-tuning set's
        assert per_sample["correct"].dtype == torch.bool and per_sample["correct"].shape == ids.shape
        assert per_sample["loss"].shape == ids.shape and not per_sample["loss"].requires_grad
        assert bool(torch.isfinite(per_sample["loss"]).all()) and bool(torch.isfinite(out["loss"]))
        # "correct" is the library's predicate at the module's threshold (0: all, above 1: none)
        assert bool(per_sample["correct"].all()) == (kind == "random")
        assert bool(per_sample["correct"].any()) == (kind == "random")

    sampler = mixed.sampler
    assert sampler is not None and mixed.pool_statistics is not None
    assert int(sampler.seen.sum()) == steps * REPLAY  # every rehearsed chunk was reported
    if kind == "random":
        assert int(sampler.forgot.sum()) == 0  # nothing is prior-correct at threshold 0.5 for a random model
    else:
        assert int(sampler.forgot.sum()) == steps * REPLAY and sampler.hit_rate == 1.0
