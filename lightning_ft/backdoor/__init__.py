"""Backdoor defense family (TSBD, RNP) and the attacks and metrics to evaluate it.

* Callbacks: :class:`NeuronWeightChangeReinit` (TSBD stage 1), :class:`ActivenessAwareFineTuning` (stage 2, gradient
  norm penalty or per-neuron gradient clipping), and :func:`tsbd` returning both;
  :class:`ReconstructiveNeuronPruning` (RNP: unlearn a copy, recover BatchNorm channel masks, prune).
* Functional core: clean unlearning, neuron-weight changes, selection and zero reinitialisation, the gradient mix and
  the per-neuron clipping, neuron discovery; RNP's three steps (:func:`rnp_unlearn`, :func:`rnp_recover_masks`,
  :func:`rnp_prune_`).
* Evaluation: BadNets/Blended attacks, all-to-one poisoning, ASR/RA metrics, DER/RIR.
"""

from lightning_ft._internal.neurons import NeuronLayer, find_neuron_layers
from lightning_ft.backdoor.activeness import (
    ActivenessAwareFineTuning,
    activeness_aware_gradients_,
    clip_neuron_gradients_,
)
from lightning_ft.backdoor.attacks import BadNets, Blended, PoisonedDataset, triggered_test_set
from lightning_ft.backdoor.callbacks import NeuronWeightChangeReinit, clean_unlearning
from lightning_ft.backdoor.functional import (
    defense_effectiveness_rating,
    neuron_weight_changes,
    robust_improvement_rating,
    select_reinit_weights,
    zero_reinit_,
)
from lightning_ft.backdoor.metrics import AttackSuccessRate, RobustAccuracy
from lightning_ft.backdoor.rnp import ReconstructiveNeuronPruning, rnp_prune_, rnp_recover_masks, rnp_unlearn
from lightning_ft.backdoor.tsbd import tsbd

__all__ = [
    "ActivenessAwareFineTuning",
    "AttackSuccessRate",
    "BadNets",
    "Blended",
    "NeuronLayer",
    "NeuronWeightChangeReinit",
    "PoisonedDataset",
    "ReconstructiveNeuronPruning",
    "RobustAccuracy",
    "activeness_aware_gradients_",
    "clean_unlearning",
    "clip_neuron_gradients_",
    "defense_effectiveness_rating",
    "find_neuron_layers",
    "neuron_weight_changes",
    "rnp_prune_",
    "rnp_recover_masks",
    "rnp_unlearn",
    "robust_improvement_rating",
    "select_reinit_weights",
    "triggered_test_set",
    "tsbd",
    "zero_reinit_",
]
