"""FLOW: upweight the samples the pre-trained model already finds easy (Sanyal et al., ICML 2025).

The weights ``w_i = exp(-l_i(theta*) / tau)`` come from one pass of the frozen pre-trained model
(:class:`~lightning_ft.rehearsal.ReferenceStatistics`) and never change; ``tau`` defaults to the median reference
loss, so a median sample gets ``e^-1``, a sample the model fits perfectly 1, and a sample at three times the median
about 0.05. Fine-tuning then minimises the weighted loss.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_ft.rehearsal.functional import (
    Normalize,
    flow_temperature,
    flow_weighted_loss,
    flow_weighted_token_loss,
    flow_weights,
)
from lightning_ft.rehearsal.statistics import ReferenceStatistics

__all__ = ["FLOWWeightedLoss", "FLOWWeighting"]

Level = Literal["sequence", "token"]


class FLOWWeighting:
    """FLOW's static per-sample (or per-token) weights, looked up by sample id.

    Args:
        statistics: reference statistics of the pre-trained model on the fine-tuning set (with ``token_nll`` for
            ``level="token"``).
        tau: temperature > 0; None: the median reference loss (sequence level: of per-sample losses; token level: of
            supervised per-token losses), as in the official code.
        level: ``"sequence"`` (one weight per sample) or ``"token"`` (causal LMs: ``w_t = exp(-nll_t / tau)``).
        normalize: ``"none"`` (paper and code: the effective learning rate shrinks by the mean weight) or
            ``"mean1"`` (weights divided by their mean).
        unweighted_from: sample ids from this one on keep weight 1 and need no statistics: the rehearsed pool
            samples of a :class:`~lightning_ft.rehearsal.RehearsalDataModule` (whose ids follow the fine-tuning
            set's: pass its number of fine-tuning samples), for FLOW on the fine-tuning samples only. None: every
            sample is weighted.

    Example::

        stats = ReferenceStatistics.compute(pretrained, DataLoader(WithSampleIds(task_b), batch_size=256))
        flow = FLOWWeighting(stats)
        loss = flow.loss(per_sample_ce, batch_sample_ids(batch))  # inside training_step

    Reference: Sanyal, Prairie, Das, Kavis, Sanghavi, "Upweighting Easy Samples in Fine-Tuning Mitigates
    Forgetting", ICML 2025, arXiv:2502.02797.
    """

    def __init__(
        self,
        statistics: ReferenceStatistics,
        tau: float | None = None,
        level: Level = "sequence",
        normalize: Normalize = "none",
        unweighted_from: int | None = None,
    ) -> None:
        if unweighted_from is not None and (
            isinstance(unweighted_from, bool) or not isinstance(unweighted_from, int) or unweighted_from < 0
        ):
            raise ValueError(f"`unweighted_from` must be an integer >= 0 or None, got {unweighted_from!r}.")
        if level not in ("sequence", "token"):
            raise ValueError(f'`level` must be "sequence" or "token", got {level!r}.')
        if level == "token" and statistics.token_nll is None:
            raise ValueError(
                "level='token' needs per-token reference losses: compute the statistics with"
                " task='causal_lm', store_token_nll=True."
            )
        self.statistics, self.level, self.normalize = statistics, level, normalize
        self.unweighted_from = unweighted_from
        ref = statistics.loss if level == "sequence" else statistics.token_nll
        assert ref is not None
        self.tau = flow_temperature(ref) if tau is None else float(tau)
        self.weights = flow_weights(ref, self.tau, normalize)  # (N,) or (N, T - 1); NaN (unsupervised) -> 0

    def weights_for(self, sample_ids: Tensor) -> Tensor:
        """The weights of a batch's samples, on the ids' device: ``(B,)`` or ``(B, T - 1)``; 1 for ids from
        ``unweighted_from`` on."""
        if self.unweighted_from is None:
            return self.weights[self.statistics.positions(sample_ids)].to(sample_ids.device)
        ids = torch.as_tensor(sample_ids)
        weighted = (ids < self.unweighted_from).cpu()
        out = self.weights.new_ones((ids.shape[0], *self.weights.shape[1:]))
        if bool(weighted.any()):
            out[weighted] = self.weights[self.statistics.positions(ids.cpu()[weighted])]
        return out.to(ids.device)

    def loss(self, per_sample_loss: Tensor, sample_ids: Tensor) -> Tensor:
        """Sequence level: ``mean(w_i * loss_i)`` over the batch."""
        if self.level != "sequence":
            raise ValueError("level='token' weights per token: use token_loss(token_nll, mask, sample_ids).")
        return flow_weighted_loss(per_sample_loss, self.weights_for(sample_ids))

    def token_loss(self, token_nll: Tensor, mask: Tensor, sample_ids: Tensor) -> Tensor:
        """Causal LMs: ``sum(w * nll) / #supervised tokens`` with per-sample or per-token weights."""
        weights = self.weights_for(sample_ids)
        if weights.dim() == 2 and weights.shape != token_nll.shape:
            raise ValueError(
                f"per-token weights {tuple(weights.shape)} do not match the batch's token losses"
                f" {tuple(token_nll.shape)}: compute the statistics on the same sequence length."
            )
        return flow_weighted_token_loss(token_nll, mask, weights)

    def __repr__(self) -> str:
        n = len(self.statistics)
        extra = "" if self.unweighted_from is None else f", unweighted_from={self.unweighted_from}"
        return f"FLOWWeighting(level={self.level!r}, tau={self.tau:.4g}, normalize={self.normalize!r}, n={n}{extra})"


class FLOWWeightedLoss:
    """LightningModule mixin: ``self.flow_loss(...)`` weights per-sample losses with FLOW, or averages them plainly
    when no weighting is set (so one module serves both runs).

    Example::

        class Classifier(FLOWWeightedLoss, pl.LightningModule):
            def training_step(self, batch, batch_idx):
                x, y, ids = batch
                losses = F.cross_entropy(self(x), y, reduction="none")
                return self.flow_loss(losses, ids)


        model = Classifier()
        model.flow_weighting = FLOWWeighting(ReferenceStatistics.compute(model, loader))
    """

    flow_weighting: FLOWWeighting | None = None

    def flow_loss(self, per_sample_loss: Tensor, sample_ids: Tensor) -> Tensor:
        """FLOW-weighted batch loss (sequence level), or the plain mean without ``flow_weighting``."""
        if self.flow_weighting is None:
            return per_sample_loss.mean()
        return self.flow_weighting.loss(per_sample_loss, sample_ids)

    def flow_token_loss(self, token_nll: Tensor, mask: Tensor, sample_ids: Tensor) -> Tensor:
        """FLOW-weighted token loss (sequence or token level), or the plain token mean without ``flow_weighting``."""
        if self.flow_weighting is None:
            return token_nll.masked_fill(~mask, 0.0).sum() / mask.sum().clamp_min(1)
        return self.flow_weighting.token_loss(token_nll, mask, sample_ids)
