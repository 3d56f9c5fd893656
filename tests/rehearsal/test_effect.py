"""Effect on a real small run: mix-cd rehearsal keeps task A that plain fine-tuning on task B forgets.

An MLP learns digits (task A, 1,200 images, 30 epochs), then fine-tunes 15 epochs on 600 inverted digits with labels
shifted by 3 (task B). With a RehearsalDataModule (pool = the task-A training images, 2 pool samples per batch of 32,
6% of each batch) and RehearsalFeedback, the model keeps most of task A; without rehearsal it forgets it (means over 3
seeds of the fine-tuning).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_ft.demos.digits import load_digits_tensors
from lightning_ft.demos.vision import ImageClassifier
from lightning_ft.rehearsal import RehearsalDataModule, RehearsalFeedback
from tests.helpers.resume import quiet_trainer

pytestmark = pytest.mark.slow


def accuracy(module: ImageClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    module.eval()
    with torch.no_grad():
        value = (module(x).argmax(-1) == y).float().mean().item()
    module.train()  # Lightning keeps a module's eval mode through a later fit(): hand back train mode
    return value


def test_mixcd_rehearsal_retains_task_a():
    x, y = load_digits_tensors(8)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train_idx, test_idx = perm[:1200], perm[1200:]
    pl.seed_everything(0, verbose=False)
    base = ImageClassifier(arch="mlp", lr=0.05)
    task_a = TensorDataset(x[train_idx], y[train_idx])
    quiet_trainer(max_epochs=30, deterministic=False).fit(base, DataLoader(task_a, batch_size=32, shuffle=True))
    state = base.state_dict()
    a_before = accuracy(base, x[test_idx], y[test_idx])
    xb, yb = 1 - x, (y + 3) % 10
    task_b = TensorDataset(xb[train_idx[:600]], yb[train_idx[:600]])

    def finetune(rehearse: bool, seed: int) -> tuple[ImageClassifier, RehearsalDataModule | None]:
        pl.seed_everything(seed, verbose=False)
        module = ImageClassifier(arch="mlp", lr=0.05)
        module.load_state_dict(state)
        data = pl.LightningDataModule.from_datasets(train_dataset=task_b, batch_size=32)
        if not rehearse:
            quiet_trainer(max_epochs=15, deterministic=False).fit(module, data)
            return module, None
        mixed = RehearsalDataModule(data, task_a, replay_per_step=2, seed=seed)
        trainer = quiet_trainer(max_epochs=15, deterministic=False, callbacks=[RehearsalFeedback()])
        trainer.fit(module, mixed)
        return module, mixed

    # 3 seeds of the fine-tuning (order, draws): one run's task-B accuracy varies by several points
    runs = [(finetune(False, seed)[0], *finetune(True, seed)) for seed in range(3)]
    a_plain = sum(accuracy(plain, x[test_idx], y[test_idx]) for plain, _, _ in runs) / 3
    a_rehearsed = sum(accuracy(module, x[test_idx], y[test_idx]) for _, module, _ in runs) / 3
    b_plain = sum(accuracy(plain, xb[test_idx], yb[test_idx]) for plain, _, _ in runs) / 3
    b_rehearsed = sum(accuracy(module, xb[test_idx], yb[test_idx]) for _, module, _ in runs) / 3
    assert a_before >= 0.9, a_before
    assert a_plain <= 0.5, f"negative control: plain fine-tuning should forget task A ({a_plain})"
    assert a_rehearsed >= a_plain + 0.3, (a_plain, a_rehearsed)
    assert b_rehearsed >= b_plain - 0.1, (b_plain, b_rehearsed)  # task B is still learned
    for _, _, mixed in runs:
        assert mixed is not None and mixed.sampler is not None and int(mixed.sampler.seen.sum()) > 0
        assert 0.0 < mixed.sampler.hit_rate < 1.0  # the feedback saw collateral damage, and not only that
