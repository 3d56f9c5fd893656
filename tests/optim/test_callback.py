"""DynamicBoostedAnnealing in a fit: what the hook sees and does (also under 16-mixed with a grad scaler), where the
global gradient comes from, its checks, and a dense-gradient resume."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ft.optim import DynamicBoostedAnnealing, GlobalGradient, LinearCorrection, boost_coefficient
from lightning_ft.optim.dba import estimate_global_gradient
from tests.helpers.resume import fit_and_resume, quiet_trainer

IN, OUT = 16, 3


def _regression(seed: int, n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    return TensorDataset(x, x @ torch.randn(OUT, IN, generator=g).T)


class Regressor(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.lr = nn.Linear(IN, OUT), lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)

    def lightning_ft_loss(self, batch: Any) -> torch.Tensor:
        return nn.functional.mse_loss(self(batch[0]), batch[1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.lightning_ft_loss(batch)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _domain() -> DataLoader:
    return DataLoader(_regression(1), batch_size=16)


def _general() -> DataLoader:
    return DataLoader(_regression(2), batch_size=16)


class GradSpy(pl.Callback):
    """Records every parameter's gradient in ``on_after_backward`` and ``on_before_optimizer_step``."""

    def __init__(self) -> None:
        self.after_backward: list[dict[str, torch.Tensor]] = []
        self.before_step: list[dict[str, torch.Tensor]] = []

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.after_backward.append({n: p.grad.clone() for n, p in pl_module.named_parameters()})

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.before_step.append({n: p.grad.clone() for n, p in pl_module.named_parameters()})


@pytest.mark.parametrize("amp", [False, True], ids=["32-true", "16-mixed-grad-scaler"])
def test_each_step_is_the_corrected_boosted_unscaled_gradient(amp):
    """Callbacks run in list order: the spy before DBA sees the domain gradient, the one after it the boosted one.
    Under 16-mixed with a grad scaler (a CPU GradScaler: Lightning unscales before ``on_before_optimizer_step``, as on
    CUDA) the boost is added to the unscaled gradient."""
    before, after = GradSpy(), GradSpy()
    dba = DynamicBoostedAnnealing(_general(), general_batches=2, k0=0.7, gamma=0.5, c_min=0.5, c_max=2.0)
    plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=256.0))] if amp else []
    trainer = quiet_trainer(max_epochs=1, callbacks=[before, dba, after], plugins=plugins, deterministic=False)
    trainer.fit(Regressor(), _domain())
    assert dba.steps == trainer.global_step == 4 and dba.ghat is not None
    correction = LinearCorrection(0.5, 0.5, 2.0)
    for t, (g, boosted) in enumerate(zip(before.before_step, after.before_step, strict=True)):
        if amp:  # on_after_backward still sees the scaled gradient, the step hook the unscaled one
            scaled = before.after_backward[t]["lin.weight"]
            assert scaled.abs().max() > 100 * g["lin.weight"].abs().max()
        k = boost_coefficient(t, 4, 0.7)
        c = correction(dba.ghat.cosine(g))
        for name in g:
            torch.testing.assert_close(boosted[name], c * (g[name] + k * dba.ghat.to_dense(name)))
    for key in ("dba/k", "dba/cos", "dba/c", "dba/ghat_norm"):
        assert key in trainer.callback_metrics


def test_global_gradient_path_is_written_then_reused_without_general_data(tmp_path):
    path = tmp_path / "ghat" / "base.pt"
    first = DynamicBoostedAnnealing(_general(), general_batches=3, global_gradient_path=str(path))
    quiet_trainer(max_epochs=1, callbacks=[first]).fit(Regressor(), _domain())
    assert path.exists()
    second = DynamicBoostedAnnealing(global_gradient_path=str(path))
    quiet_trainer(max_epochs=1, callbacks=[second]).fit(Regressor(), _domain())
    assert first.ghat is not None and second.ghat is not None
    for name in first.ghat.names:
        assert torch.equal(first.ghat.to_dense(name), second.ghat.to_dense(name))


class WithGeneralData(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return _domain()

    def general_dataloader(self) -> DataLoader:
        return _general()


def test_general_data_from_the_data_modules_method():
    dba = DynamicBoostedAnnealing(general_batches=2)
    quiet_trainer(max_epochs=1, callbacks=[dba]).fit(Regressor(), WithGeneralData())
    assert dba.ghat is not None and dba.ghat.batches == 2


def test_missing_general_data_and_a_foreign_global_gradient_are_clear_errors():
    with pytest.raises(ValueError, match="general_dataloader"):
        quiet_trainer(max_epochs=1, callbacks=[DynamicBoostedAnnealing()]).fit(Regressor(), _domain())
    mse = lambda model, batch: nn.functional.mse_loss(model(batch[0]), batch[1])  # noqa: E731
    other = estimate_global_gradient(nn.Sequential(nn.Linear(IN, OUT)), _general(), loss_fn=mse)
    with pytest.raises(ValueError, match="same base model"):
        quiet_trainer(max_epochs=1, callbacks=[DynamicBoostedAnnealing(global_gradient=other)]).fit(
            Regressor(), _domain()
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k0": -1.0}, "k0"),
        ({"k0": "big"}, "k0"),
        ({"decay": "cosine"}, "decay"),
        ({"c_min": 0.0}, "c_min"),
        ({"rank": 0}, "rank"),
        ({"general_batches": 0}, "general_batches"),
        ({"task": "seq2seq"}, "task"),
        ({"global_gradient": {"w": 1}}, "global_gradient"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DynamicBoostedAnnealing(**kwargs)


def test_a_dense_global_gradient_resumes_exactly(tmp_path):
    def make_callbacks() -> list[pl.Callback]:
        return [DynamicBoostedAnnealing(_general(), general_batches=3, k0=0.5, total_steps=12)]

    (full, full_cbs), (resumed, resumed_cbs) = fit_and_resume(
        Regressor, lambda: WithGeneralData(), make_callbacks, max_epochs=3, stop_epoch=1, tmp_path=tmp_path
    )
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert full_cbs[0].steps == resumed_cbs[0].steps == 12
    assert isinstance(resumed_cbs[0].ghat, GlobalGradient) and not resumed_cbs[0].ghat.factors
