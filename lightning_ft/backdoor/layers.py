"""The layers TSBD works on: the automatic choice (convolutions of a CNN, linear layers of a transformer or MLP), never
the classifier head by default; and the strategies it refuses.

The head is what ``get_classifier()`` returns on a timm model, what ``get_output_embeddings()`` returns on a Hugging
Face model, and otherwise the last ``Linear`` (or ``transformers`` ``Conv1D``) registered in the model when it comes
after every other neuron layer (``SmallBNCNN.fc``, the last layer of an ``nn.Sequential`` MLP).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightning_ft._internal.neurons import LAYER_TYPES, NeuronLayer, classifier_heads, find_neuron_layers

__all__ = [
    "AUTO_MIN_CONVS",
    "SMALL_LAYER_SHARE",
    "check_layer_types",
    "layer_share",
    "tsbd_layers",
    "weight_parameters",
]

AUTO_MIN_CONVS = 2  # layer_types=None picks the convolutions when the model has at least this many eligible ones
SMALL_LAYER_SHARE = 0.10
"""The callbacks warn at setup when their layers hold less than this share of the model's weights
(:func:`layer_share`)."""


def tsbd_layers(
    model: nn.Module,
    layer_types: Sequence[str] | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = ("shortcut", "downsample"),
    exclude_head: bool = True,
) -> list[NeuronLayer]:
    """The neuron layers TSBD selects from, in module order.

    Args:
        model: the model (or the ``LightningModule`` holding it).
        layer_types: subset of ``("conv", "linear", "hf_conv1d")``; None (auto): the convolutions when the model has
            at least :data:`AUTO_MIN_CONVS` eligible ones (CNNs; the paper's choice), else the linear and
            ``transformers`` Conv1D layers (ViTs, MLPs, transformer classifiers; a ViT's only conv is its patch
            embedding).
        include, exclude: regexes on layer names (:func:`~lightning_ft._internal.neurons.find_neuron_layers`).
        exclude_head: leave the classifier head out (:func:`~lightning_ft._internal.neurons.classifier_heads`).

    Raises:
        ValueError: when no layer is eligible; the message says what the model has and what to pass.
    """
    heads = set(classifier_heads(model)) if exclude_head else set()

    def find(types: Sequence[str], raise_if_empty: bool) -> list[NeuronLayer]:
        try:
            found = find_neuron_layers(model, types, include, exclude)
        except ValueError:
            if raise_if_empty:
                raise
            return []
        layers = [layer for layer in found if layer.name not in heads]
        if not layers and raise_if_empty:
            raise ValueError(
                f"no eligible layer: with layer_types={tuple(types)}, include={tuple(include)},"
                f" exclude={tuple(exclude)} the only candidates are the classifier head {sorted(heads)}, which TSBD"
                " leaves out. Widen `layer_types`/`include`, or pass `exclude_head=False` to select the head too."
            )
        return layers

    if layer_types is not None:
        return find(layer_types, True)
    convs = find(("conv",), False)
    if len(convs) >= AUTO_MIN_CONVS:
        return convs
    try:
        return find(("linear", "hf_conv1d"), True)
    except ValueError as error:
        raise ValueError(
            f"layer_types=None (auto) found {len(convs)} eligible convolution(s) (fewer than {AUTO_MIN_CONVS}) and no"
            f" linear layer outside the classifier head: {error} Pass `layer_types` (e.g. ['conv'] or ['linear']) and"
            " `include` naming the layers to work on."
        ) from None


def check_layer_types(layer_types: Sequence[str] | None) -> None:
    """Validate a ``layer_types`` argument: None (auto) or a non-empty subset of :data:`LAYER_TYPES`."""
    if layer_types is None:
        return
    if isinstance(layer_types, str) or not layer_types or set(layer_types) - set(LAYER_TYPES):
        raise ValueError(
            f"`layer_types` must be None (auto) or a non-empty subset of {LAYER_TYPES}, got {layer_types!r}."
        )


def weight_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weights of ``model``: its parameters with two or more dimensions (linear, conv and embedding weights,
    attention projections; not biases, norm scales or 1-D tokens), each shared parameter once, in module order."""
    return [(name, p) for name, p in model.named_parameters() if p.dim() >= 2]


def layer_share(model: nn.Module, layers: Sequence[NeuronLayer]) -> float:
    """The share of ``model``'s weights (:func:`weight_parameters`, by element count) that ``layers`` hold, in [0, 1]
    (1.0 for a model without weights)."""
    total = sum(p.numel() for _, p in weight_parameters(model))
    chosen = {id(layer.weight): layer.weight.numel() for layer in layers}
    return sum(chosen.values()) / total if total else 1.0
