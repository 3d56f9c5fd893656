"""Tiny models built from configs (no download) and the locally trained tokenizer."""

from __future__ import annotations

from typing import Any

from lightning_ft.demos.models import CausalLMModule, tiny_causal_lm
from lightning_ft.demos.text import build_tokenizer
from lightning_ft.demos.vision import ImageClassifier

__all__ = ["TINY_LM", "tiny_classifier", "tiny_lm", "tiny_lm_module", "tiny_mlp_classifier", "tokenizer"]

# 1 layer, width 32: a few ms per step on CPU; vocabulary of the pydoc BPE tokenizer
TINY_LM: dict[str, Any] = {"vocab_size": 1024, "n_positions": 64, "n_embd": 32, "n_layer": 1, "n_head": 2}


def tiny_lm(**overrides: Any):  # -> transformers.GPT2LMHeadModel
    """A 1-layer GPT-2 causal LM, dropout 0 (deterministic), random init with ``seed``."""
    return tiny_causal_lm(**{**TINY_LM, "dropout": 0.0, **overrides})


def tiny_lm_module(**overrides: Any) -> CausalLMModule:
    """:class:`CausalLMModule` around :func:`tiny_lm` (lr 3e-3, dropout 0)."""
    return CausalLMModule(**{**TINY_LM, "lr": 3e-3, "dropout": 0.0, **overrides})


def tokenizer(vocab_size: int = 1024):
    """The byte-level BPE tokenizer trained locally on CPython's pydoc topics."""
    return build_tokenizer(vocab_size)


def tiny_classifier(**overrides: Any) -> ImageClassifier:
    """A width-4 BN-CNN digits classifier (28 conv neurons), SGD lr 0.05."""
    return ImageClassifier(**{"width": 4, "lr": 0.05, **overrides})


def tiny_mlp_classifier(**overrides: Any) -> ImageClassifier:
    """An MLP (64-32-32-10) digits classifier, SGD lr 0.05."""
    return ImageClassifier(**{"arch": "mlp", "width": 4, "lr": 0.05, **overrides})
