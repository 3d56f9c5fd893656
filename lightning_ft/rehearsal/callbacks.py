"""The rehearsal family's Lightning pieces, under their former module (kept for imports that name it):
:mod:`~lightning_ft.rehearsal.datamodule`, :mod:`~lightning_ft.rehearsal.feedback` and
:mod:`~lightning_ft.rehearsal.flow_callback`."""

from lightning_ft.rehearsal.datamodule import RehearsalDataModule, num_tokens
from lightning_ft.rehearsal.feedback import RehearsalFeedback
from lightning_ft.rehearsal.flow_callback import FLOWReweighting

__all__ = ["FLOWReweighting", "RehearsalDataModule", "RehearsalFeedback", "num_tokens"]
