"""Strategies for single-process tests of multi-process settings."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from lightning.pytorch.strategies import SingleDeviceStrategy

__all__ = ["SyncBatchNormStrategy"]


class SyncBatchNormStrategy(SingleDeviceStrategy):
    """Converts the BatchNorms in ``setup`` as ``DDPStrategy.setup`` does with ``sync_batchnorm=True`` (after the
    callbacks' ``setup`` and the checkpoint restore, before ``on_fit_start``), and reverts them at teardown. Without
    a process group ``SyncBatchNorm`` computes plain batch statistics, so this runs on one CPU process."""

    def __init__(self) -> None:
        super().__init__(device=torch.device("cpu"))
        self._converter = TorchSyncBatchNorm()  # (the Trainer resets `_layer_sync`)

    def setup(self, trainer: pl.Trainer) -> None:
        self.model = self._converter.apply(self.model)
        super().setup(trainer)

    def teardown(self) -> None:
        if self.lightning_module is not None:
            self._converter.revert(self.lightning_module)
        super().teardown()
