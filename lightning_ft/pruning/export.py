"""Physically remove pruned channels where the graph allows it, and report the parameter and FLOP reduction.

A channel is *pruned* when its output is exactly zero: a BatchNorm channel with ``gamma = beta = 0``, or (without a
BatchNorm after it) a conv/linear output row with zero weights and zero bias, as :func:`make_permanent` leaves them.
It can be removed when the channel's only consumer is the next conv/linear layer through operations that map 0 to 0
(ReLU, GELU, SiLU, pooling, dropout, flatten). :func:`export` finds such chains in three places:

* ``nn.Sequential`` containers: ``conv/linear [BatchNorm] [zero-preserving ops] conv/linear``;
* ResNet-style blocks with ``conv1``/``bn1``/``conv2`` (and ``conv2``/``bn2``/``conv3``) attributes (timm, torchvision);
* MLP blocks with ``fc1``/``fc2`` (timm ``Mlp``) or ``c_fc``/``c_proj`` (GPT-2's Conv1D);

plus chains the caller names (``chains=[(producer, batchnorm or None, consumer)]``). Pruned channels elsewhere (e.g.
feeding a residual sum) stay as zeros and are listed in the report as not removed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ft._internal.modules import eval_mode
from lightning_ft._internal.neurons import layer_type
from lightning_ft.pruning.gates import find_gates, make_permanent

__all__ = ["Chain", "ExportReport", "count_flops", "count_parameters", "export", "find_chains"]

_ZERO_PRESERVING = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Tanh,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Identity,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
_ZERO_PRESERVING_NAMES = {"NewGELUActivation", "GELUActivation", "FastGELUActivation", "SiLUActivation", "DropPath"}


@dataclass
class ExportReport:
    """What :func:`export` did.

    Attributes:
        params_before, params_after: parameter counts.
        flops_before, flops_after: forward FLOPs on the example input (``torch.utils.flop_counter``), or None.
        removed: channels physically removed, per producer layer.
        not_removed: pruned channels left in place as zeros (no removable chain), per layer.
    """

    params_before: int
    params_after: int
    flops_before: int | None = None
    flops_after: int | None = None
    removed: dict[str, int] = field(default_factory=dict)
    not_removed: dict[str, int] = field(default_factory=dict)

    @property
    def param_reduction(self) -> float:
        """Share of parameters removed."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def flop_reduction(self) -> float | None:
        """Share of forward FLOPs removed (None without an example input)."""
        if self.flops_before is None or self.flops_after is None or not self.flops_before:
            return None
        return 1.0 - self.flops_after / self.flops_before

    def to_dict(self) -> dict[str, Any]:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "param_reduction": self.param_reduction,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "flop_reduction": self.flop_reduction,
            "removed": dict(self.removed),
            "not_removed": dict(self.not_removed),
        }


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, example_input: Any) -> int:
    """Forward FLOPs of ``model`` on ``example_input`` (a tensor, tuple of positional args, or dict of kwargs),
    counted in eval mode by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        _eval_forward(model, example_input)
    return int(counter.get_total_flops())


@torch.no_grad()
def _eval_forward(model: nn.Module, example_input: Any) -> Tensor:
    """The eval-mode output of ``model`` on ``example_input`` as one tensor (``logits`` of a ModelOutput)."""
    with eval_mode(model):
        if isinstance(example_input, dict):
            out = model(**example_input)
        elif isinstance(example_input, tuple):
            out = model(*example_input)
        else:
            out = model(example_input)
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    first = out[0] if isinstance(out, (tuple, list)) else None
    if isinstance(first, Tensor):
        return first
    raise TypeError(f"cannot compare the model's outputs of type {type(out).__name__}")


@dataclass
class Chain:
    """A producer layer whose output channels feed only ``consumer`` (through ``bn`` and zero-preserving ops)."""

    producer: str
    bn: str | None
    consumer: str


def _zero_preserving(module: nn.Module) -> bool:
    if isinstance(module, nn.Flatten):
        return True  # a channel becomes consecutive features (handled by the consumer's shrink)
    return isinstance(module, _ZERO_PRESERVING) or type(module).__name__ in _ZERO_PRESERVING_NAMES


def _is_bn(module: nn.Module | None) -> bool:
    return layer_type(module) == "bn" if module is not None else False


def _is_weight_layer(module: nn.Module | None) -> bool:
    kind = layer_type(module) if module is not None else None
    if kind is None or kind == "bn":
        return False
    return getattr(module, "groups", 1) == 1  # grouped/depthwise convs couple channels: left alone


def find_chains(model: nn.Module) -> list[Chain]:
    """The ``(producer, batchnorm or None, consumer)`` chains :func:`export` finds in ``model``'s structure (before
    the ``chains`` a caller adds): the channels it may remove."""
    chains = []
    for prefix, parent in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(parent, nn.Sequential):
            children = list(parent.named_children())
            for i, (name, module) in enumerate(children):
                if not _is_weight_layer(module):
                    continue
                j, bn = i + 1, None
                if j < len(children) and _is_bn(children[j][1]):
                    bn, j = children[j][0], j + 1
                while j < len(children) and _zero_preserving(children[j][1]):
                    j += 1
                if j < len(children) and _is_weight_layer(children[j][1]):
                    chains.append(Chain(dot + name, dot + bn if bn else None, dot + children[j][0]))
        for a, b, c, act in (("conv1", "bn1", "conv2", "act1"), ("conv2", "bn2", "conv3", "act2")):
            if _is_weight_layer(getattr(parent, a, None)) and _is_weight_layer(getattr(parent, c, None)):
                between = [getattr(parent, n, None) for n in (act, "aa", "drop_block")]
                if all(m is None or _zero_preserving(m) for m in between if isinstance(m, nn.Module)):
                    chains.append(Chain(dot + a, dot + b if _is_bn(getattr(parent, b, None)) else None, dot + c))
        for a, c in (("fc1", "fc2"), ("c_fc", "c_proj")):
            if _is_weight_layer(getattr(parent, a, None)) and _is_weight_layer(getattr(parent, c, None)):
                between = [getattr(parent, n, None) for n in ("act", "drop", "drop1", "norm")]
                if all(_zero_preserving(m) for m in between if isinstance(m, nn.Module)):
                    chains.append(Chain(dot + a, None, dot + c))
    return chains


def _out_rows(module: nn.Module) -> tuple[Tensor, int]:
    return module.weight, 1 if layer_type(module) == "hf_conv1d" else 0


def _pruned_channels(producer: nn.Module, bn: nn.Module | None) -> Tensor:
    """Boolean mask of the producer's channels whose output (after the BatchNorm, if any) is exactly zero."""
    if bn is not None:
        return (bn.weight == 0) & (bn.bias == 0)
    weight, dim = _out_rows(producer)
    zero = (weight.movedim(dim, 0).reshape(weight.shape[dim], -1) == 0).all(1)
    bias = getattr(producer, "bias", None)
    if isinstance(bias, Tensor):
        zero &= bias == 0
    return zero


def _shrink_out(module: nn.Module, keep: Tensor) -> None:
    kind = layer_type(module)
    if kind == "bn":
        module.weight = nn.Parameter(module.weight.data[keep].clone())
        module.bias = nn.Parameter(module.bias.data[keep].clone())
        for buf in ("running_mean", "running_var"):
            if getattr(module, buf, None) is not None:
                setattr(module, buf, getattr(module, buf)[keep].clone())
        module.num_features = int(keep.sum())
        return
    weight, dim = _out_rows(module)
    module.weight = nn.Parameter(weight.data.index_select(dim, keep.nonzero().flatten()).clone())
    if isinstance(getattr(module, "bias", None), Tensor):
        module.bias = nn.Parameter(module.bias.data[keep].clone())
    n = int(keep.sum())
    if kind == "conv":
        module.out_channels = n
    elif kind == "linear":
        module.out_features = n
    else:  # transformers' Conv1D
        module.nf = n


def _shrink_in(module: nn.Module, keep: Tensor, channels: int) -> None:
    kind = layer_type(module)
    weight = module.weight.data
    in_dim = 0 if kind == "hf_conv1d" else 1
    fan_in = weight.shape[in_dim]
    if fan_in % channels:
        raise ValueError(f"cannot map {channels} channels onto {fan_in} inputs of {type(module).__name__}")
    # a flatten between them makes each channel `fan_in // channels` consecutive inputs (channel-major order)
    keep_in = keep.repeat_interleave(fan_in // channels)
    module.weight = nn.Parameter(weight.index_select(in_dim, keep_in.nonzero().flatten()).clone())
    if kind == "conv":
        module.in_channels = int(keep_in.sum())
    elif kind == "linear":
        module.in_features = int(keep_in.sum())
    else:  # transformers' Conv1D
        module.nx = int(keep_in.sum())


@torch.no_grad()
def export(
    model: nn.Module,
    example_input: Any | None = None,
    chains: Sequence[tuple[str, str | None, str]] = (),
    inplace: bool = False,
) -> tuple[nn.Module, ExportReport]:
    """A smaller model with the pruned channels physically removed, and an :class:`ExportReport`.

    Gates still attached are first made permanent (:func:`make_permanent`). The exported model computes the same
    function as the pruned one (to float rounding), in train and eval mode.

    Args:
        model: a pruned model (gated, or made permanent).
        example_input: an input for the FLOP count and the output check (tensor, tuple of args or dict of kwargs);
            None skips both.
        chains: extra ``(producer, batchnorm or None, consumer)`` layer names whose channels may be removed, for
            chains the automatic search cannot see (e.g. a ``features`` Sequential followed by a ``fc`` attribute).
        inplace: shrink ``model`` itself instead of a deep copy.

    Example::

        small, report = export(model, example_input=torch.zeros(1, 1, 16, 16))
        print(f"{report.param_reduction:.0%} fewer parameters, {report.flop_reduction:.0%} fewer FLOPs")
    """
    if not inplace:
        model = copy.deepcopy(model)
    params_before = count_parameters(model) - sum(g.gate.num_neurons for g in find_gates(model))
    gated = make_permanent(model)
    report = ExportReport(params_before=params_before, params_after=params_before)
    report.flops_before = count_flops(model, example_input) if example_input is not None else None
    reference = _eval_forward(model, example_input) if example_input is not None else None
    modules = dict(model.named_modules())
    found = find_chains(model)
    automatic = {c.producer: c for c in found}
    for producer, bn, consumer in chains:
        for name, ok, what in (
            (producer, _is_weight_layer, "a conv/linear layer"),
            (bn, _is_bn, "an affine BatchNorm"),
            (consumer, _is_weight_layer, "a conv/linear layer"),
        ):
            if name is not None and (name not in modules or not ok(modules[name])):
                raise ValueError(f"chain entry {name!r} must name {what} of the model, as (producer, bn, consumer).")
        known = automatic.get(producer)
        if known is not None:
            if (known.bn, known.consumer) != (bn, consumer):
                raise ValueError(
                    f"chain {(producer, bn, consumer)} conflicts with the chain found in the model's structure"
                    f" {(known.producer, known.bn, known.consumer)}; drop it from `chains`."
                )
            continue
        found.append(Chain(producer, bn, consumer))
    done: set[str] = set()  # producers and BatchNorms whose channels were removed
    for chain in found:
        if chain.producer in done:
            continue
        producer, consumer = modules[chain.producer], modules[chain.consumer]
        bn = modules[chain.bn] if chain.bn else None  # not modules.get(""): that is the root module
        pruned = _pruned_channels(producer, bn)
        if not pruned.any() or pruned.all():
            continue  # nothing to remove, or a dead layer (kept, so the graph stays valid)
        keep = ~pruned
        channels = pruned.numel()
        _shrink_in(consumer, keep, channels)  # first: it raises before changing anything on a bad chain
        _shrink_out(producer, keep)
        if bn is not None:
            _shrink_out(bn, keep)
        report.removed[chain.producer] = int(pruned.sum())
        done.update(n for n in (chain.producer, chain.bn) if n)
    for name, n in gated.items():
        if n and name not in done:
            report.not_removed[name] = n
    report.params_after = count_parameters(model)
    if example_input is not None and reference is not None:
        tol = 1e-4 * float(reference.abs().max()) + 1e-5
        try:
            out = _eval_forward(model, example_input)
            diff = float((out - reference).abs().max()) if out.shape == reference.shape else float("inf")
        except RuntimeError as err:  # a shape mismatch further down the graph
            diff, cause = float("inf"), err
        else:
            cause = None
        if diff > tol:
            raise ValueError(
                f"the exported model's output differs from the pruned model's by {diff:.3g} (tolerance {tol:.3g}): a"
                f" removed chain is not a plain producer -> consumer link; check `chains` ({list(chains)})."
                + (" The model was shrunk in place." if inplace else "")
            ) from cause
        report.flops_after = count_flops(model, example_input)
    return model, report
