"""Rehearsal family: keep pretrained skills while fine-tuning.

* :class:`ReferenceStatistics`: one no-grad pass of the frozen starting model, per-sample loss and correctness (and
  per-token NLL for causal LMs) by stable sample id (:class:`WithSampleIds`), DDP-gathered, saved and loaded.
* FLOW (Sanyal et al., ICML 2025): :class:`FLOWWeighting` (``w = exp(-ref_loss / tau)``, ``tau`` = median) and the
  :class:`FLOWWeightedLoss` LightningModule mixin; :class:`FLOWReweighting` runs the statistics pass at the start of
  training and installs the weights; pure functions in :mod:`lightning_ft.rehearsal.functional`.
* :class:`ReplayBatchSampler`: wraps any fine-tuning batch sampler and appends pool samples to each batch, as many
  as a :class:`ReplayBudget` gives it and drawn by a :class:`ReplayPolicy` (:class:`MixCDPolicy`, :class:`RandomPolicy`,
  :class:`LossPriorityPolicy`; :func:`make_policy`), with draws seeded by (seed, epoch, batch, rank);
  :class:`CollateralDamageSampler` builds one from the pool statistics (mix-cd and its baselines), fed with which
  rehearsed samples were forgotten; :class:`RehearsalDataModule` wraps a fine-tuning data module
  and a pool into it (replay share by samples or tokens, with a schedule and replay-only transforms), and
  :class:`RehearsalFeedback` reports the forgotten samples from ``training_step`` outputs.
"""

from lightning_ft.rehearsal.budget import ReplayBudget
from lightning_ft.rehearsal.datamodule import RehearsalDataModule, num_tokens
from lightning_ft.rehearsal.feedback import RehearsalFeedback
from lightning_ft.rehearsal.flow import FLOWWeightedLoss, FLOWWeighting
from lightning_ft.rehearsal.flow_callback import FLOWReweighting
from lightning_ft.rehearsal.functional import (
    causal_lm_correct,
    flow_temperature,
    flow_weighted_loss,
    flow_weighted_token_loss,
    flow_weights,
    greedy_token_accuracy,
    sequence_nll,
)
from lightning_ft.rehearsal.policies import (
    LossPriorityPolicy,
    MixCDPolicy,
    RandomPolicy,
    ReplayPolicy,
    make_policy,
)
from lightning_ft.rehearsal.sampler import STRATEGIES, CollateralDamageSampler, ReplayBatchSampler
from lightning_ft.rehearsal.statistics import ReferenceStatistics, WithSampleIds, batch_sample_ids

__all__ = [
    "STRATEGIES",
    "CollateralDamageSampler",
    "FLOWReweighting",
    "FLOWWeightedLoss",
    "FLOWWeighting",
    "LossPriorityPolicy",
    "MixCDPolicy",
    "RandomPolicy",
    "ReferenceStatistics",
    "RehearsalDataModule",
    "RehearsalFeedback",
    "ReplayBatchSampler",
    "ReplayBudget",
    "ReplayPolicy",
    "WithSampleIds",
    "batch_sample_ids",
    "causal_lm_correct",
    "flow_temperature",
    "flow_weighted_loss",
    "flow_weighted_token_loss",
    "flow_weights",
    "greedy_token_accuracy",
    "make_policy",
    "num_tokens",
    "sequence_nll",
]
