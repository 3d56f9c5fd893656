"""Effect on a real small run: learned channel masks keep a pruned network working where ModelPruning collapses.

A digits BN-CNN (width 16, 16x16) is trained dense for 8 epochs, then fine-tuned 4 epochs while 70% of its conv
channels are pruned (77 of 112), by Lightning's ModelPruning (L1 structured, one shot after the first epoch) or by
LearnedMaskPruning (sigmoid gates on the BatchNorms, the demo's pipeline). Measured on seeds 0 / 1 (1 thread):
ModelPruning 0.171 / 0.126 test accuracy, learned masks 0.762 / 0.777. The run is pinned to 1 thread: with 2 the
convolutions round differently and seed 0 gave 0.554 for the learned masks, so the bounds leave room for that.
"""

from __future__ import annotations

import pytest
import torch

from lightning_ft.demos.pruning import PruningDemoConfig, finetune, pretrain

pytestmark = pytest.mark.slow


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.xfail(
    strict=True,
    reason="issue 13: with the installed torch/Lightning the one-shot ModelPruning baseline reaches 0.64 and learned"
    " masks 0.67 at 70% (seed 0), not the +0.25 margin this test was written for; issue 13 rebuilds the pruning"
    " baselines and controls. Strict: the test fails again as soon as the margin is back.",
)
def test_learned_masks_beat_model_pruning_at_70_percent(one_thread):
    config = PruningDemoConfig(width=16, pretrain_epochs=8, finetune_epochs=4, sparsity=0.7, seed=0)
    state = pretrain(config)
    baseline = finetune(config, state, "model_pruning")
    learned = finetune(config, state, "learned")
    # the learned model really is 70% pruned: 77 of the 112 BatchNorm channels removed by export
    assert sum(learned["export"]["removed"].values()) == 77
    assert learned["exported_acc"] == pytest.approx(learned["acc"], abs=1e-6)
    assert learned["acc"] >= 0.5, learned
    assert learned["acc"] >= baseline["acc"] + 0.25, (learned["acc"], baseline["acc"])
