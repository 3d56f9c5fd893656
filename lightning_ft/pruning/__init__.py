"""Pruning-mask family: learned per-neuron channel masks, make-permanent and export.

* Callback: :class:`LearnedMaskPruning` (gates learned jointly with fine-tuning toward a target sparsity).
* Functional core: :func:`attach_gates`, :func:`topk_keep_masks`, :func:`cubic_sparsity`, :func:`make_permanent`,
  :func:`export` (physical channel removal with a parameter/FLOP report).

RNP (:class:`~lightning_ft.backdoor.ReconstructiveNeuronPruning` and its three steps) moved to
:mod:`lightning_ft.backdoor`; importing it from here still works for one release, with a ``FutureWarning``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from lightning_ft.pruning.callbacks import LearnedMaskPruning
from lightning_ft.pruning.export import Chain, ExportReport, count_flops, count_parameters, export, find_chains
from lightning_ft.pruning.gates import (
    GATE_TYPES,
    GatedLayer,
    NeuronGate,
    attach_gates,
    find_gates,
    gate_penalty_grad,
    make_permanent,
    num_pruned,
    remove_gates,
    topk_keep_masks,
)
from lightning_ft.pruning.schedule import cubic_sparsity

__all__ = [
    "GATE_TYPES",
    "Chain",
    "ExportReport",
    "GatedLayer",
    "LearnedMaskPruning",
    "NeuronGate",
    "attach_gates",
    "count_flops",
    "count_parameters",
    "cubic_sparsity",
    "export",
    "find_chains",
    "find_gates",
    "gate_penalty_grad",
    "make_permanent",
    "num_pruned",
    "remove_gates",
    "topk_keep_masks",
]

# RNP moved to the backdoor family: the old names resolve, with a FutureWarning, for one release
_MOVED_TO_BACKDOOR = ("ReconstructiveNeuronPruning", "rnp_prune_", "rnp_recover_masks", "rnp_unlearn")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_BACKDOOR:
        warnings.warn(
            f"`lightning_ft.pruning.{name}` moved to `lightning_ft.backdoor` (RNP is a backdoor defense): use"
            f" `from lightning_ft.backdoor import {name}`. The old path will be removed in the next release.",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module("lightning_ft.backdoor"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
