"""Backdoor defense family (TSBD) and the attacks and metrics to evaluate it.

This first part holds the functional core: BadNets/Blended attacks, all-to-one poisoning, ASR/RA metrics, DER/RIR,
and TSBD stage 1's neuron-weight-change ranking and zero reinitialisation. The Lightning callbacks
(``NeuronWeightChangeReinit``, ``ActivenessAwareFineTuning``) come next.
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

__all__ = [
    "ActivenessAwareFineTuning",
    "AttackSuccessRate",
    "BadNets",
    "Blended",
    "NeuronLayer",
    "NeuronWeightChangeReinit",
    "PoisonedDataset",
    "RobustAccuracy",
    "activeness_aware_gradients_",
    "clean_unlearning",
    "clip_neuron_gradients_",
    "defense_effectiveness_rating",
    "find_neuron_layers",
    "neuron_weight_changes",
    "robust_improvement_rating",
    "select_reinit_weights",
    "triggered_test_set",
    "zero_reinit_",
]
