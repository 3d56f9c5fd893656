"""Effect test on a real small run: TSBD removes a BadNets backdoor that vanilla fine-tuning keeps.

Digits upsampled to 16x16, BadNets 3x3 bottom-right patch, 10% all-to-one poisoning (target 0), a BN-CNN trained 30
epochs; the defender fine-tunes on 63 clean training images (5%) with SGD 0.01 for 20-21 epochs.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_ft.backdoor import (
    ActivenessAwareFineTuning,
    BadNets,
    NeuronWeightChangeReinit,
    PoisonedDataset,
    triggered_test_set,
)
from lightning_ft.demos.digits import load_digits_tensors
from lightning_ft.demos.vision import ImageClassifier
from tests.helpers.resume import quiet_trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup():
    x, y = load_digits_tensors(16)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train_idx, test_idx = perm[:1258], perm[1258:]
    train = TensorDataset(x[train_idx], y[train_idx])
    attack = BadNets(size=3)
    poisoned = PoisonedDataset(train, attack, ratio=0.1, target=0, seed=0)
    triggered = triggered_test_set(TensorDataset(x[test_idx], y[test_idx]), attack, target=0)
    triggered_x = torch.stack([triggered[i][0] for i in range(len(triggered))])
    clean_idx = [i for i in range(len(train)) if not poisoned.is_poisoned(i)][:63]  # 5% of the training split
    clean = [train[i] for i in clean_idx]

    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(lr=0.05, weight_decay=5e-4)
    loader = DataLoader([poisoned[i] for i in range(len(poisoned))], batch_size=64, shuffle=True)
    quiet_trainer(max_epochs=30, deterministic=False).fit(model, loader)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def evaluate(module: ImageClassifier) -> tuple[float, float]:
        module.eval()
        with torch.no_grad():
            acc = (module(x[test_idx]).argmax(-1) == y[test_idx]).float().mean().item()
            asr = (module(triggered_x).argmax(-1) == 0).float().mean().item()
        module.train()  # Lightning keeps a module's eval mode through a later fit(): always hand back train mode
        return acc, asr

    return state, clean, evaluate


def defended(state, clean, epochs: int, callbacks) -> ImageClassifier:
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(lr=0.01)
    module.load_state_dict(state)
    loader = DataLoader(clean, batch_size=32, shuffle=True)
    quiet_trainer(max_epochs=epochs, callbacks=callbacks, deterministic=False).fit(module, loader)
    return module


def test_tsbd_removes_the_backdoor_that_vanilla_finetuning_keeps(setup):
    state, clean, evaluate = setup
    backdoored = ImageClassifier()
    backdoored.load_state_dict(state)
    acc_bd, asr_bd = evaluate(backdoored)
    assert asr_bd >= 0.9 and acc_bd >= 0.85, (acc_bd, asr_bd)

    acc_ft, asr_ft = evaluate(defended(state, clean, 20, []))
    assert asr_ft >= 0.9, f"negative control: vanilla fine-tuning should keep the backdoor (ASR {asr_ft})"
    assert acc_ft >= 0.85, acc_ft

    stage1 = NeuronWeightChangeReinit(neuron_ratio=0.3, lr_unlearn=1e-3, progress_bar=False)
    acc_tsbd, asr_tsbd = evaluate(defended(state, clean, 21, [stage1, ActivenessAwareFineTuning()]))
    assert asr_tsbd <= 0.10, (acc_tsbd, asr_tsbd, stage1.report)
    assert acc_tsbd >= 0.85, (acc_tsbd, asr_tsbd, stage1.report)
