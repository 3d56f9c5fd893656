"""Pure tensor functions of the rehearsal family: per-sample losses and FLOW's easy-sample weights."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_ft.memorisation.functional import token_logprobs

__all__ = [
    "causal_lm_correct",
    "flow_temperature",
    "flow_weighted_loss",
    "flow_weighted_token_loss",
    "flow_weights",
    "greedy_token_accuracy",
    "sequence_nll",
]

Normalize = Literal["none", "mean1"]


def sequence_nll(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor, Tensor]:
    """Causal-LM negative log-likelihood per token and per sample, over supervised positions.

    Labels follow the Hugging Face convention (aligned with the inputs, shifted here; FLOW's official code counts
    supervised tokens on the *unshifted* labels, an off-by-one we do not copy).

    Returns:
        ``(per_sample, token_nll, mask)``: the mean NLL over each sample's supervised next tokens ``(B,)`` (NaN for a
        sample without any), the per-token NLL ``(B, T - 1)`` (0 where unsupervised) and the supervision mask.
    """
    logp, mask = token_logprobs(logits, labels, ignore_index)
    token_nll = -logp
    counts = mask.sum(1)
    per_sample = token_nll.sum(1) / counts.clamp_min(1)
    per_sample = per_sample.masked_fill(counts == 0, float("nan"))
    return per_sample, token_nll, mask


def greedy_token_accuracy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Causal LMs: the share of each sample's supervised next tokens that the greedy (argmax) prediction gets right.

    Labels as in :func:`sequence_nll` (aligned with the inputs, shifted here).

    Returns:
        ``(accuracy, supervised)``: ``(B,)`` float accuracy (0 for a sample without a supervised token) and ``(B,)``
        bool, whether the sample has any supervised token.
    """
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(f"`logits` {tuple(logits.shape)} must be (B, T, V) with `labels` of shape (B, T).")
    targets = labels[:, 1:]
    mask = targets != ignore_index
    hits = (logits[:, :-1].argmax(-1) == targets) & mask
    return hits.sum(1) / mask.sum(1).clamp_min(1), mask.any(1)


def causal_lm_correct(logits: Tensor, labels: Tensor, threshold: float = 0.5, ignore_index: int = -100) -> Tensor:
    """Causal LMs: a sample is "correct" when its :func:`greedy_token_accuracy` reaches ``threshold`` (and it has a
    supervised token). Our reconstruction of mix-cd's correctness for generative tasks (unpublished); the same
    predicate as :meth:`~lightning_ft.rehearsal.ReferenceStatistics.compute`, so ``training_step`` can report
    ``correct`` for :class:`~lightning_ft.rehearsal.RehearsalFeedback` from its own logits."""
    accuracy, supervised = greedy_token_accuracy(logits, labels, ignore_index)
    return (accuracy >= threshold) & supervised


def flow_temperature(ref_loss: Tensor) -> float:
    """FLOW's default temperature: the median of the finite reference losses, the mean of the two middle values for
    an even count (as the official code's ``np.median``)."""
    finite = ref_loss[torch.isfinite(ref_loss)].float().flatten()
    if finite.numel() == 0:
        raise ValueError("no finite reference loss: cannot set FLOW's temperature (median); pass `tau` explicitly.")
    values = finite.sort().values
    k = values.numel()
    tau = float((values[(k - 1) // 2] + values[k // 2]) / 2)
    if not tau > 0:
        raise ValueError(
            f"the median reference loss is {tau}: FLOW's temperature must be > 0 (the pre-trained model already fits"
            " most samples perfectly); pass a positive `tau` explicitly."
        )
    return tau


def flow_weights(ref_loss: Tensor, tau: float | None = None, normalize: Normalize = "none") -> Tensor:
    """FLOW's static sample weights ``w = exp(-ref_loss / tau)`` (Sanyal et al. 2025, Algorithm 1).

    Args:
        ref_loss: reference (pre-trained model) losses, any shape (per sample, or per token).
        tau: temperature > 0; None: :func:`flow_temperature` of ``ref_loss``.
        normalize: ``"none"`` (paper and code) or ``"mean1"`` (weights divided by their mean over finite losses, so
            the effective learning rate is unchanged).

    Returns:
        Float32 weights of ``ref_loss``'s shape; NaN losses get weight 0 (as in the official code).
    """
    if normalize not in ("none", "mean1"):
        raise ValueError(f'`normalize` must be "none" or "mean1", got {normalize!r}.')
    if tau is None:
        tau = flow_temperature(ref_loss)
    elif not tau > 0:
        raise ValueError(f"`tau` must be > 0, got {tau}.")
    weights = torch.exp(-ref_loss.float() / tau)
    finite = torch.isfinite(weights)
    weights = torch.where(finite, weights, torch.zeros_like(weights))
    if normalize == "mean1":
        weights = weights / weights[finite].mean().clamp_min(torch.finfo(torch.float32).tiny)
    return weights


def flow_weighted_loss(per_sample_loss: Tensor, weights: Tensor) -> Tensor:
    """``mean(w_i * loss_i)`` over the batch (the official vision code's ``torch.mean(weights * losses)``)."""
    if per_sample_loss.shape != weights.shape:
        raise ValueError(
            f"`per_sample_loss` {tuple(per_sample_loss.shape)} and `weights` {tuple(weights.shape)} must match."
        )
    return (weights.to(per_sample_loss.dtype) * per_sample_loss).mean()


def flow_weighted_token_loss(token_nll: Tensor, mask: Tensor, weights: Tensor) -> Tensor:
    """``sum(w * nll) / #supervised tokens`` (the official language trainer's normalisation).

    ``weights`` are per sample ``(B,)`` (sequence level) or per token ``(B, T - 1)`` (token level).
    """
    if token_nll.shape != mask.shape:
        raise ValueError(f"`token_nll` {tuple(token_nll.shape)} and `mask` {tuple(mask.shape)} must match.")
    if weights.shape == token_nll.shape[:1]:
        weights = weights.unsqueeze(1)
    elif weights.shape != token_nll.shape:
        raise ValueError(
            f"`weights` {tuple(weights.shape)} must be per sample {tuple(token_nll.shape[:1])} or per token"
            f" {tuple(token_nll.shape)}."
        )
    weighted = (weights.to(token_nll.dtype) * token_nll).masked_fill(~mask, 0.0)
    return weighted.sum() / mask.sum().clamp_min(1)
