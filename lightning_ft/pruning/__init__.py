"""Pruning-mask family: learned per-neuron channel masks, RNP, make-permanent and export.

* Callbacks: :class:`LearnedMaskPruning` (gates learned jointly with fine-tuning toward a target sparsity) and
  :class:`ReconstructiveNeuronPruning` (RNP backdoor defense: unlearn, recover BatchNorm masks, prune).
* Functional core: :func:`attach_gates`, :func:`topk_keep_masks`, :func:`cubic_sparsity`, :func:`make_permanent`,
  :func:`export` (physical channel removal with a parameter/FLOP report), and RNP's three steps.
"""

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
from lightning_ft.pruning.rnp import ReconstructiveNeuronPruning, rnp_prune_, rnp_recover_masks, rnp_unlearn
from lightning_ft.pruning.schedule import cubic_sparsity

__all__ = [
    "GATE_TYPES",
    "Chain",
    "ExportReport",
    "GatedLayer",
    "LearnedMaskPruning",
    "NeuronGate",
    "ReconstructiveNeuronPruning",
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
    "rnp_prune_",
    "rnp_recover_masks",
    "rnp_unlearn",
    "topk_keep_masks",
]
