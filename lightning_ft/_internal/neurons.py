"""Neuron discovery: the output channels of Conv1d/Conv2d, Linear, ``transformers``' Conv1D and BatchNorm layers.

Shared by the backdoor family (TSBD's neuron-weight changes) and the pruning family (channel masks). A neuron is one
output channel; its weights are the corresponding slice of the layer's weight (``fan_in`` sub-weights).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

__all__ = ["GATE_LAYER_TYPES", "LAYER_TYPES", "NeuronLayer", "classifier_heads", "find_neuron_layers"]

LAYER_TYPES = ("conv", "linear", "hf_conv1d")
GATE_LAYER_TYPES = (*LAYER_TYPES, "bn")  # BatchNorm channels count as neurons for channel masks (pruning, RNP)


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2 style): weight (in_features, out_features); matched by name so that
    # transformers need not be imported
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(module.weight, Tensor)


def layer_type(module: nn.Module) -> str | None:
    """The neuron-layer type of ``module`` (one of :data:`GATE_LAYER_TYPES`), or None."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if _is_hf_conv1d(module):
        return "hf_conv1d"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
        return "bn"
    return None


@dataclass(frozen=True)
class NeuronLayer:
    """One layer whose output channels are neurons.

    Attributes:
        name: the module's qualified name in the model.
        module: the module.
        kind: ``"conv"``, ``"linear"``, ``"hf_conv1d"`` or ``"bn"`` (an affine BatchNorm; its weight is ``gamma``).
        out_dim: the weight dimension that indexes output channels (0, or 1 for ``transformers``' Conv1D).
    """

    name: str
    module: nn.Module
    kind: str
    out_dim: int

    @property
    def weight(self) -> Tensor:
        return self.module.weight  # type: ignore[return-value]

    @property
    def num_neurons(self) -> int:
        return int(self.weight.shape[self.out_dim])

    def per_neuron(self, tensor: Tensor) -> Tensor:
        """View a weight-shaped tensor as ``(num_neurons, fan_in)`` (a copy only for Conv1D's transposed layout)."""
        return tensor.movedim(self.out_dim, 0).reshape(self.num_neurons, -1)

    def from_per_neuron(self, tensor: Tensor) -> Tensor:
        """Inverse of :meth:`per_neuron`: a ``(num_neurons, fan_in)`` tensor back in the weight's layout."""
        moved_shape = list(self.weight.movedim(self.out_dim, 0).shape)
        return tensor.reshape(moved_shape).movedim(0, self.out_dim)


def find_neuron_layers(
    model: nn.Module,
    types: Sequence[str] = ("conv",),
    include: Sequence[str] = (),
    exclude: Sequence[str] = ("shortcut", "downsample"),
    allowed: Sequence[str] = LAYER_TYPES,
) -> list[NeuronLayer]:
    """The layers of ``model`` whose output channels count as neurons, in module order.

    Args:
        model: any ``nn.Module``.
        types: subset of ``allowed``. TSBD uses ``("conv",)``.
        include: regular expressions; when given, a layer's name must match one of them (``re.search``).
        exclude: regular expressions; a layer whose name matches one is skipped (TSBD skips shortcut convs).
        allowed: the types a caller supports: :data:`LAYER_TYPES`, or :data:`GATE_LAYER_TYPES` with ``"bn"``.

    Raises:
        ValueError: on an unknown type or when no layer is eligible (the message lists what the model has).
    """
    unknown = set(types) - set(allowed)
    if unknown or not types:
        raise ValueError(f"`types` must be a non-empty subset of {tuple(allowed)}, got {tuple(types)!r}.")
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    layers = []
    seen: list[str] = []
    for name, module in model.named_modules():
        kind = layer_type(module)
        if kind is None or kind not in allowed:
            continue
        seen.append(f"{name or '<root>'} ({kind})")
        if kind not in types:
            continue
        if inc and not any(p.search(name) for p in inc):
            continue
        if any(p.search(name) for p in exc):
            continue
        layers.append(NeuronLayer(name, module, kind, 1 if kind == "hf_conv1d" else 0))
    if not layers:
        listed = ", ".join(seen[:12]) + (" ..." if len(seen) > 12 else "") if seen else "none"
        raise ValueError(
            f"no eligible layer: types={tuple(types)}, include={tuple(include)}, exclude={tuple(exclude)}; the model"
            f" has these layers: {listed}. Widen `types` (e.g. add 'linear') or relax the patterns."
        )
    return layers


def classifier_heads(model: nn.Module) -> list[str]:
    """Names of the classifier-head layers of ``model`` (conv, linear or ``transformers`` Conv1D modules).

    The heads are what timm's ``get_classifier()`` and Hugging Face's ``get_output_embeddings()`` return, and the
    ``classifier``/``score`` modules of Hugging Face models (``*ForImageClassification``,
    ``*ForSequenceClassification``), for every submodule that has them (a ``LightningModule`` wrapping the model
    included). When none of these names a layer (a plain ``nn.Module``, a timm backbone built with ``num_classes=0``
    under your own head), the head is the model's last conv/linear layer in module order (``fc`` of a CNN, the last
    ``Linear`` of an MLP).
    """
    by_id = {id(m): name for name, m in model.named_modules()}
    heads: list[str] = []
    for module in model.modules():
        found: list[Any] = []
        for attr in ("get_classifier", "get_output_embeddings"):
            getter = getattr(module, attr, None)
            if callable(getter):
                result = getter()
                found.extend(result if isinstance(result, (tuple, list)) else [result])
        if hasattr(module, "config"):  # transformers models: classification heads are attributes
            found.extend(getattr(module, attr, None) for attr in ("classifier", "score"))
        for head in found:
            if not isinstance(head, nn.Module):
                continue
            for sub in head.modules():  # a head may be a block (timm's ClassifierHead holds its `fc`)
                name = by_id.get(id(sub))
                if name is not None and layer_type(sub) in LAYER_TYPES and name not in heads:
                    heads.append(name)
    if heads:
        return heads
    last = [name for name, m in model.named_modules() if layer_type(m) in LAYER_TYPES]
    return last[-1:]
