"""The layers TSBD works on: the automatic choice (convolutions of a CNN, linear layers of a transformer or MLP), never
the classifier head by default; and the strategies it refuses.

The head is what ``get_classifier()`` returns on a timm model, what ``get_output_embeddings()`` returns on a Hugging
Face model, and otherwise the last ``Linear`` (or ``transformers`` ``Conv1D``) registered in the model when it comes
after every other neuron layer (``SmallBNCNN.fc``, the last layer of an ``nn.Sequential`` MLP).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from lightning_ft._internal.neurons import LAYER_TYPES, NeuronLayer, find_neuron_layers, layer_type

__all__ = ["AUTO_MIN_CONVS", "check_layer_types", "check_strategy", "classifier_heads", "tsbd_layers"]

AUTO_MIN_CONVS = 2  # layer_types=None picks the convolutions when the model has at least this many eligible ones


def _head_modules(module: nn.Module) -> list[nn.Module]:
    """The head(s) a timm or Hugging Face model declares, or []."""
    heads: Any = None
    timm_model = hasattr(module, "pretrained_cfg") or type(module).__module__.startswith("timm.")
    if timm_model and callable(getattr(module, "get_classifier", None)):
        heads = module.get_classifier()
    elif hasattr(module, "config") and callable(getattr(module, "get_output_embeddings", None)):  # transformers
        heads = module.get_output_embeddings()
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    return [h for h in heads if isinstance(h, nn.Module)]


def classifier_heads(model: nn.Module) -> set[str]:
    """Qualified names of the neuron layers that make up ``model``'s classifier head (see the module docstring)."""
    names = {id(m): n for n, m in model.named_modules()}
    heads: set[str] = set()
    for module in model.modules():
        for head in _head_modules(module):
            if id(head) in names:
                prefix = names[id(head)]
                heads.update(n for n, m in head.named_modules(prefix=prefix) if layer_type(m) in LAYER_TYPES)
    if heads:
        return heads
    last: tuple[str, str] | None = None
    for name, module in model.named_modules():
        kind = layer_type(module)
        if kind in LAYER_TYPES:
            last = (name, kind)
    if last is not None and last[1] in ("linear", "hf_conv1d"):
        heads.add(last[0])
    return heads


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
            ``transformers`` Conv1D layers (ViTs, language models, MLPs; a ViT's only conv is its patch embedding).
        include, exclude: regexes on layer names (:func:`~lightning_ft._internal.neurons.find_neuron_layers`).
        exclude_head: leave the classifier head out (:func:`classifier_heads`).

    Raises:
        ValueError: when no layer is eligible; the message says what the model has and what to pass.
    """
    heads = classifier_heads(model) if exclude_head else set()

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


def _unsupported_strategies() -> tuple[type, ...]:
    import lightning.pytorch.strategies as strategies

    names = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
    return tuple(getattr(strategies, name) for name in names if hasattr(strategies, name))


def check_strategy(strategy: object, owner: str) -> None:
    """Raise a clear error when ``strategy`` shards the parameters (FSDP, DeepSpeed, model parallel): TSBD reads and
    edits whole weights (stage 1 copies, unlearns and zeroes them; stage 2 perturbs and clips whole tensors)."""
    if isinstance(strategy, _unsupported_strategies()):
        raise ValueError(
            f"{owner} does not support {type(strategy).__name__}: it reads and edits whole, unsharded weights, which"
            " would be wrong on sharded parameters. Use strategy='ddp' (or a single device)."
        )
