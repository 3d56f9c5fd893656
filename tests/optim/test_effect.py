"""DBA's effect on a small case where general and domain gradients conflict: a linear regression pre-trained half-way
toward the general targets, fine-tuned with SGD on conflicting domain targets. The boost keeps the general loss
clearly lower than plain fine-tuning; the no-information control (a random direction of the same norm per parameter)
does not. A callback that did nothing would fail the first assertion. (With the reconstructed dynamic correction on,
``gamma=0.5``, the larger steps on conflicting gradients cancel the benefit here: it is off by default.)"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ft.optim import DynamicBoostedAnnealing
from tests.helpers.resume import quiet_trainer

FEATURES, OUTPUTS, N = 32, 4, 256
_g = torch.Generator().manual_seed(0)
W_GENERAL, W_DOMAIN = torch.randn(OUTPUTS, FEATURES, generator=_g), torch.randn(OUTPUTS, FEATURES, generator=_g)
X_GENERAL, X_DOMAIN = torch.randn(N, FEATURES, generator=_g), torch.randn(N, FEATURES, generator=_g)
GENERAL = TensorDataset(X_GENERAL, X_GENERAL @ W_GENERAL.T)
DOMAIN = TensorDataset(X_DOMAIN, X_DOMAIN @ W_DOMAIN.T)


class Regression(pl.LightningModule):
    """Linear regression starting half-way to the general solution (so the general gradient is informative)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(FEATURES, OUTPUTS, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(0.5 * W_GENERAL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)

    def lightning_ft_loss(self, batch: Any) -> torch.Tensor:
        return nn.functional.mse_loss(self(batch[0]), batch[1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.lightning_ft_loss(batch)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


@torch.no_grad()
def _loss(module: Regression, data: TensorDataset) -> float:
    return nn.functional.mse_loss(module(data.tensors[0]), data.tensors[1]).item()


def _fit(callbacks: list[pl.Callback]) -> Regression:
    pl.seed_everything(0, verbose=False)
    module = Regression()
    loader = DataLoader(DOMAIN, batch_size=32, shuffle=True)
    quiet_trainer(max_epochs=4, callbacks=callbacks).fit(module, loader)
    return module


def test_dba_keeps_general_loss_lower_than_fine_tuning_and_a_random_direction_does_not():
    start_domain = _loss(Regression(), DOMAIN)
    vanilla = _fit([])
    dba = DynamicBoostedAnnealing(DataLoader(GENERAL, batch_size=32), general_batches=4, k0=1.0)
    boosted = _fit([dba])
    assert dba.ghat is not None and dba.steps == 32
    control = DynamicBoostedAnnealing(global_gradient=dba.ghat.to("cpu").randomized(seed=0), k0=1.0)
    randomised = _fit([control])
    general = {name: _loss(m, GENERAL) for name, m in [("vanilla", vanilla), ("dba", boosted), ("random", randomised)]}
    assert general["dba"] < 0.85 * general["vanilla"], general
    assert general["random"] > 0.95 * general["vanilla"], general
    assert _loss(boosted, DOMAIN) < 0.5 * start_domain  # it still fine-tunes
