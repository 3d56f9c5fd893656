"""Forward passes and losses run by callbacks themselves, one convention for every family.

Callbacks that run their own forward passes (TSBD's clean unlearning and perturbed pass, RNP's unlearning and mask
recovery, ...) accept models as users have them:

- the forward output may be a tensor of logits, a mapping with a ``"logits"`` entry, an HF ``ModelOutput`` (or any
  object with a ``logits`` attribute), or a tuple whose first element is the logits;
- inputs that are mappings (``{"input_ids": ..., "attention_mask": ...}``) are passed as keyword arguments;
- floating inputs are cast to the model's floating dtype (``precision="bf16-true"`` keeps the weights in bf16 while
  the data loader yields float32);
- **the user's loss**: a model (the ``LightningModule``) that defines ``lightning_ft_loss(batch) -> Tensor`` has that
  method called wherever a callback needs the training loss of a batch; without it the loss is cross-entropy of the
  logits against the batch's labels. This is the one documented way to give every callback your loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ft._internal.batches import inputs_and_labels

__all__ = ["LOSS_HOOK", "cast_inputs", "has_user_loss", "logits_of", "model_dtype", "model_logits", "model_loss"]

LOSS_HOOK = "lightning_ft_loss"


def logits_of(output: Any) -> Tensor:
    """The logits of a forward output: a tensor, a mapping with ``logits``, an object with ``.logits`` (HF
    ``ModelOutput``) or a tuple/list whose first element is the logits."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    keys = f" with keys {sorted(output)}" if isinstance(output, Mapping) else ""
    raise TypeError(
        "lightning-ft reads logits from the model's forward output: a tensor, a mapping with a 'logits' entry, an"
        f" object with a `.logits` attribute (HF ModelOutput) or a tuple starting with the logits; got a"
        f" {type(output).__name__}{keys}. Return one of these from forward."
    )


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of ``model``'s first floating parameter (float32 when it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def cast_inputs(inputs: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """``inputs`` (a tensor, or a mapping, tuple or list of them) on ``device``; floating tensors also cast to
    ``dtype`` (integer ids, labels and masks keep theirs)."""
    if isinstance(inputs, Tensor):
        inputs = inputs.to(device)
        return inputs.to(dtype) if inputs.is_floating_point() else inputs
    if isinstance(inputs, Mapping):
        return {k: cast_inputs(v, device, dtype) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(cast_inputs(v, device, dtype) for v in inputs)
    return inputs


def model_logits(model: nn.Module, inputs: Any) -> Tensor:
    """Forward ``inputs`` through ``model`` (keyword arguments for a mapping) and return the logits, with floating
    inputs moved to the model's device and dtype."""
    inputs = cast_inputs(inputs, _device(model), model_dtype(model))
    output = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return logits_of(output)


def has_user_loss(model: nn.Module) -> bool:
    """Whether ``model`` defines the ``lightning_ft_loss(batch)`` hook."""
    return callable(getattr(model, LOSS_HOOK, None))


def model_loss(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The training loss of ``batch`` under ``model``: ``model.lightning_ft_loss(batch)`` when defined (the batch moved
    to the model's device, floating tensors cast to its dtype, as Lightning does before ``training_step``), else
    cross-entropy of the logits against the batch's labels (mean over samples; for ``(batch, seq, classes)`` logits
    over every position).

    Returns ``(loss, logits, labels)``; logits and labels are None when the user's hook computed the loss.
    """
    if has_user_loss(model):
        # the batch as training_step gets it: on the model's device, floating tensors in its dtype
        loss = getattr(model, LOSS_HOOK)(cast_inputs(batch, _device(model), model_dtype(model)))
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise TypeError(
                f"{type(model).__name__}.{LOSS_HOOK}(batch) must return a scalar tensor, got"
                f" {type(loss).__name__}{'' if not isinstance(loss, Tensor) else f' of shape {tuple(loss.shape)}'}."
            )
        return loss, None, None
    x, y = inputs_and_labels(batch)
    logits = model_logits(model, x)
    y = y.to(logits.device)
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    return loss, logits, y
