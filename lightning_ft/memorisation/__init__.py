"""Memorisation family: detect, stop and reduce memorisation of fine-tuning data.

See the method card ``lightning_ft/memorisation/README.md``.
"""

from lightning_ft.memorisation.callbacks import MemorisationEarlyStopping, MemorisationMonitor, find_causal_lm
from lightning_ft.memorisation.functional import (
    exact_match,
    goldfish_mask,
    matching_prefix_length,
    ngram_memorisation_score,
    ngram_regularizer,
    teacher_forced_accuracy,
    token_accuracy,
    token_logprobs,
)
from lightning_ft.memorisation.generation import greedy_continuations
from lightning_ft.memorisation.metrics import MemorisationScore
from lightning_ft.memorisation.probe import Probe, build_probe
from lightning_ft.memorisation.regularizer import (
    NGramRegularizedLM,
    NGramRegularizer,
    ReferenceLogProbDataset,
    compute_reference_logprobs,
)

__all__ = [
    "MemorisationEarlyStopping",
    "MemorisationMonitor",
    "MemorisationScore",
    "NGramRegularizedLM",
    "NGramRegularizer",
    "Probe",
    "ReferenceLogProbDataset",
    "build_probe",
    "compute_reference_logprobs",
    "exact_match",
    "find_causal_lm",
    "goldfish_mask",
    "greedy_continuations",
    "matching_prefix_length",
    "ngram_memorisation_score",
    "ngram_regularizer",
    "teacher_forced_accuracy",
    "token_accuracy",
    "token_logprobs",
]
