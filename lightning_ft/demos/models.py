"""Tiny models for demos and tests: a GPT-2-style causal LM built from a config (no download)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_ft.memorisation.functional import goldfish_mask
from lightning_ft.memorisation.regularizer import NGramRegularizedLM, NGramRegularizer

__all__ = ["CausalLMModule", "GoldfishCausalLMModule", "RegularizedCausalLMModule", "tiny_causal_lm"]


def tiny_causal_lm(
    vocab_size: int = 1024,
    n_positions: int = 128,
    n_embd: int = 128,
    n_layer: int = 2,
    n_head: int = 4,
    seed: int = 0,
    dropout: float = 0.1,
):  # -> transformers.GPT2LMHeadModel
    """A randomly initialised GPT-2 causal LM from a small config (no weights are downloaded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


class CausalLMModule(pl.LightningModule):
    """A causal-LM LightningModule around :func:`tiny_causal_lm` (AdamW); logs ``train_loss``, ``val_loss``,
    ``val_ppl``.

    Args:
        vocab_size, n_positions, n_embd, n_layer, n_head: GPT-2 config.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        seed: initialisation seed.
        dropout: GPT-2 residual, embedding and attention dropout.
    """

    def __init__(
        self,
        vocab_size: int = 1024,
        n_positions: int = 128,
        n_embd: int = 128,
        n_layer: int = 2,
        n_head: int = 4,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = tiny_causal_lm(vocab_size, n_positions, n_embd, n_layer, n_head, seed, dropout)
        self.lr, self.weight_decay = lr, weight_decay

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        val = self.trainer.callback_metrics.get("val_loss")
        if val is not None:
            self.log("val_ppl", math.exp(min(float(val), 50.0)))

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class RegularizedCausalLMModule(NGramRegularizedLM, CausalLMModule):
    """:class:`CausalLMModule` trained with cross-entropy + the n-gram regulariser (reference: the initial weights).

    Args:
        reg_weight: lambda.
        reg_gamma: confidence gate.
        reg_delta: margin.
        reg_ngram_sizes: n-gram sizes.
        reg_variant: ``"A"`` or ``"B"``.
        **kwargs: :class:`CausalLMModule` arguments.
    """

    def __init__(
        self,
        reg_weight: float = 1.0,
        reg_gamma: float = 0.5,
        reg_delta: float = 0.0,
        reg_ngram_sizes: Sequence[int] = (4,),
        reg_variant: str = "A",
        vocab_size: int = 1024,
        n_positions: int = 128,
        n_embd: int = 128,
        n_layer: int = 2,
        n_head: int = 4,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(vocab_size, n_positions, n_embd, n_layer, n_head, lr, weight_decay, seed, dropout)
        self.configure_ngram_regularizer(
            NGramRegularizer(reg_ngram_sizes, gamma=reg_gamma, delta=reg_delta, weight=reg_weight, variant=reg_variant)  # type: ignore[arg-type]
        )

    def reset_reference(self) -> None:
        """Take the current weights as the reference (call after loading pre-trained weights)."""
        ref = self.ngram_reference_model
        assert ref is not None
        ref.load_state_dict(self.model.state_dict())

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.regularized_lm_loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss


class GoldfishCausalLMModule(CausalLMModule):
    """:class:`CausalLMModule` trained with the Goldfish loss (Hans et al. 2024): about ``1/k`` of the target tokens,
    chosen by a hash of the ``h`` preceding targets, are left out of the loss.

    Args:
        goldfish_k: drop frequency.
        goldfish_h: hash context width.
        **kwargs: :class:`CausalLMModule` arguments.
    """

    def __init__(
        self,
        goldfish_k: int = 4,
        goldfish_h: int = 13,
        vocab_size: int = 1024,
        n_positions: int = 128,
        n_embd: int = 128,
        n_layer: int = 2,
        n_head: int = 4,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(vocab_size, n_positions, n_embd, n_layer, n_head, lr, weight_decay, seed, dropout)
        self.goldfish_k, self.goldfish_h = goldfish_k, goldfish_h

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        labels = goldfish_mask(batch["labels"], k=self.goldfish_k, h=self.goldfish_h)
        loss = self.model(input_ids=batch["input_ids"], labels=labels).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss
