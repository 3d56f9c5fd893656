"""TSBD stage 1 as pure functions: neuron-weight changes (NWC), selection, zero reinitialisation; DER / RIR.

References:
    Lin, Liu, Wei, Li, Xiong. "Unveiling and Mitigating Backdoor Vulnerabilities based on Unlearning Weight Changes
    and Backdoor Activeness." NeurIPS 2024, arXiv:2405.20291; code ``linweiii/TSBD`` (``tsbd.py``).
    Wu et al. BackdoorBench (``utils/metric.py``: simplified defense effectiveness rate).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_ft._internal.neurons import NeuronLayer

__all__ = [
    "defense_effectiveness_rating",
    "neuron_weight_changes",
    "robust_improvement_rating",
    "select_reinit_weights",
    "zero_reinit_",
]


def neuron_weight_changes(
    original: nn.Module, unlearned: nn.Module, layers: Sequence[NeuronLayer]
) -> dict[str, Tensor]:
    """Per-sub-weight absolute changes ``|W_ul[j] - W_bd[j]|`` as ``(num_neurons, fan_in)`` tensors per layer.

    ``layers`` are found on ``original`` (:func:`~lightning_ft._internal.neurons.find_neuron_layers`); the same
    module names are looked up in ``unlearned`` (a deep copy, possibly in float32 when ``original`` is bf16: the
    changes are computed in at least float32). The neuron-weight change of neuron ``j`` is the row sum
    (raw L1, no normalisation, as in the official code): ``changes[name].sum(1)``.
    """
    modules = dict(unlearned.named_modules())
    out = {}
    for layer in layers:
        if layer.name not in modules:
            raise ValueError(f"layer {layer.name!r} is missing from the unlearned model; pass a deep copy.")
        other = modules[layer.name].weight
        if other.shape != layer.weight.shape:
            raise ValueError(
                f"layer {layer.name!r}: weight shapes differ {tuple(other.shape)} vs {tuple(layer.weight.shape)}."
            )
        # in at least float32: a float32 unlearned copy of a bf16 model is compared with the bf16 weights converted
        # to float32 (exact), i.e. with the copy's own starting point
        dtype = torch.promote_types(torch.promote_types(other.dtype, layer.weight.dtype), torch.float32)
        delta = other.detach().to(dtype) - layer.weight.detach().to(device=other.device, dtype=dtype)
        out[layer.name] = layer.per_neuron(delta.abs())
    return out


def select_reinit_weights(
    changes: dict[str, Tensor], neuron_ratio: float, subweight_ratio: float
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """TSBD's selection: the top ``neuron_ratio`` neurons by NWC (ranked over all layers together), then, among their
    pooled sub-weight changes, those at or above the ``k``-th largest value, ``k = int(len(pooled) * subweight_ratio)``.

    Ties at the threshold are all selected (so slightly more than ``k`` can be), as in ``zero_reinit_weight``.

    Returns:
        ``(masks, selected_neurons)``: per layer, a bool ``(num_neurons, fan_in)`` mask of the sub-weights to zero and
        a bool ``(num_neurons,)`` mask of the selected neurons.
    """
    if not 0.0 < neuron_ratio <= 1.0:
        raise ValueError(f"`neuron_ratio` must be in (0, 1], got {neuron_ratio}.")
    if not 0.0 < subweight_ratio <= 1.0:
        raise ValueError(f"`subweight_ratio` must be in (0, 1], got {subweight_ratio}.")
    if not changes:
        raise ValueError("`changes` is empty: no layer to rank.")
    names = list(changes)
    nwc = torch.cat([changes[n].sum(1) for n in names])
    owner = torch.cat([torch.full((changes[n].shape[0],), i, dtype=torch.long) for i, n in enumerate(names)])
    local = torch.cat([torch.arange(changes[n].shape[0]) for n in names])
    n_top = int(nwc.numel() * neuron_ratio)
    selected = {n: torch.zeros(changes[n].shape[0], dtype=torch.bool) for n in names}
    masks = {n: torch.zeros_like(changes[n], dtype=torch.bool) for n in names}
    if n_top == 0:
        return masks, selected
    # stable descending sort: equal NWC keeps module order, like Python's sorted(..., reverse=True) in the code
    order = torch.sort(nwc.cpu(), descending=True, stable=True).indices[:n_top]
    for idx in order.tolist():
        selected[names[owner[idx]]][local[idx]] = True
    pooled = torch.cat([changes[n][selected[n].to(changes[n].device)].flatten().cpu() for n in names])
    k = int(pooled.numel() * subweight_ratio)
    if k == 0:
        return masks, selected
    threshold = torch.topk(pooled, k).values[-1]
    for n in names:
        rows = selected[n].to(changes[n].device)
        # a weight the unlearning did not move is never zeroed (a zero threshold would tie with it)
        masks[n] = (changes[n] >= threshold.to(changes[n].device)) & (changes[n] > 0) & rows.unsqueeze(1)
    return masks, selected


@torch.no_grad()
def zero_reinit_(layers: Sequence[NeuronLayer], masks: dict[str, Tensor]) -> int:
    """Zero, in place, the sub-weights selected by ``masks`` (per-neuron layout) in ``layers``; returns how many.

    Works on the parameters themselves, so optimizer references stay valid and the zeroed weights stay trainable.
    """
    count = 0
    for layer in layers:
        mask = masks.get(layer.name)
        if mask is None:
            continue
        full = layer.from_per_neuron(mask.to(layer.weight.device))
        layer.weight.masked_fill_(full, 0.0)
        count += int(mask.sum())
    return count


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be a rate in [0, 1], got {value}.")


def defense_effectiveness_rating(asr_before: float, asr_after: float, acc_before: float, acc_after: float) -> float:
    """BackdoorBench's (simplified) defense effectiveness rating, in [0, 1]; 0.5 means no change.

    ``DER = (max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1) / 2``.

    Example::

        >>> round(defense_effectiveness_rating(1.0, 0.02, 0.93, 0.90), 4)
        0.975
    """
    for name, value in (("asr_before", asr_before), ("asr_after", asr_after)):
        _check_rate(name, value)
    for name, value in (("acc_before", acc_before), ("acc_after", acc_after)):
        _check_rate(name, value)
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1.0) / 2.0


def robust_improvement_rating(ra_before: float, ra_after: float, acc_before: float, acc_after: float) -> float:
    """BackdoorBench's robust improvement rating: ``(max(0, RA_after - RA_before) - max(0, ΔACC) + 1) / 2``."""
    for name, value in (("ra_before", ra_before), ("ra_after", ra_after), ("acc_before", acc_before)):
        _check_rate(name, value)
    _check_rate("acc_after", acc_after)
    return (max(0.0, ra_after - ra_before) - max(0.0, acc_before - acc_after) + 1.0) / 2.0
