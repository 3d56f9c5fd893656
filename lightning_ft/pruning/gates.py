"""Per-output-neuron gates: attach, read, fold into the weights (make permanent) and remove.

A gate multiplies one output channel of a Conv1d/Conv2d, Linear, ``transformers`` Conv1D or affine BatchNorm layer by
``z``, through a forward hook on the layer; its trainable score lives in a child module ``neuron_gate`` of the layer,
so the scores are ordinary parameters of the model: DDP all-reduces their gradients when they exist before the wrap,
and checkpoints hold them. Gating a BatchNorm's output (rather than the conv before it) is what lets a pruned channel
be exactly zero, in train and eval mode, and so be removed by :func:`~lightning_ft.pruning.export`.

Gate types:

* ``"sigmoid"`` (soft movement pruning, Sanh et al. 2020, structured): the forward value is the binary keep mask
  ``M`` (1 for kept neurons); the score ``s`` gets the straight-through gradient ``dL/dz``; the regulariser is
  ``mean(sigmoid(s))`` (L1 on sigmoid).
* ``"hard_concrete"`` (L0 gates, Louizos et al. 2018): in training ``z = clamp(sigmoid((logit(u) + log_alpha) / beta)
  * (zeta - gamma) + gamma, 0, 1)`` with ``u ~ U(0, 1)``; in eval the deterministic ``clamp(sigmoid(log_alpha) *
  (zeta - gamma) + gamma, 0, 1)``; times ``M``. The regulariser is the expected L0 norm
  ``mean(sigmoid(log_alpha - beta * log(-gamma / zeta)))``.

Which neurons ``M`` keeps is decided outside the gates (top-k on the scores, :func:`topk_keep_masks`), so the
sparsity is exact. A pruned neuron still receives the straight-through gradient ``dL/dz`` while the mask is being
learned, so it can come back when the operation after the gate has a nonzero slope at 0 (GELU, tanh, a linear
layer); after a ReLU that gradient is 0, the neuron's score only sees the regulariser, and its pruning is final.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_ft._internal.neurons import (
    GATE_LAYER_TYPES,
    NeuronLayer,
    classifier_heads,
    find_neuron_layers,
    layer_type,
)

__all__ = [
    "GATE_TYPES",
    "GatedLayer",
    "NeuronGate",
    "attach_gates",
    "ensure_gate_hooks",
    "find_gates",
    "fold_gates_into_state_dict",
    "gate_penalty_grad",
    "make_permanent",
    "num_pruned",
    "remove_gates",
    "topk_keep_masks",
]

GateType = Literal["sigmoid", "hard_concrete"]
GATE_TYPES = ("sigmoid", "hard_concrete")
GATE_ATTR = "neuron_gate"
# HardConcrete stretch and temperature (Louizos et al.; the values of the emmental and CoFi code)
HC_GAMMA, HC_ZETA, HC_BETA = -0.1, 1.1, 2.0 / 3.0
_HC_SHIFT = HC_BETA * math.log(-HC_GAMMA / HC_ZETA)
DEFAULT_INIT = {"sigmoid": 0.0, "hard_concrete": 3.0}


class NeuronGate(nn.Module):
    """The gate scores of one layer's output neurons and the current keep mask.

    Args:
        num_neurons: output channels of the gated layer.
        gate_type: ``"sigmoid"`` or ``"hard_concrete"``.
        init: initial score (default: 0 for sigmoid, 3 for HardConcrete, whose eval gate is then exactly 1).

    Attributes:
        scores: the trainable scores (``log_alpha`` for HardConcrete).
        mask: boolean keep mask, or None while nothing is pruned. Not a buffer: it is recomputed from the scores
            (identical on every rank), and DDP would otherwise broadcast it at every forward.
        noise: HardConcrete's ``u`` for the next training forward, or None to draw it from the global RNG.
    """

    def __init__(self, num_neurons: int, gate_type: GateType = "sigmoid", init: float | None = None) -> None:
        super().__init__()
        if gate_type not in GATE_TYPES:
            raise ValueError(f"`gate_type` must be one of {GATE_TYPES}, got {gate_type!r}.")
        self.gate_type = gate_type
        init = DEFAULT_INIT[gate_type] if init is None else float(init)
        self.scores = nn.Parameter(torch.full((num_neurons,), init))
        self.mask: Tensor | None = None
        self.noise: Tensor | None = None

    @property
    def num_neurons(self) -> int:
        return self.scores.numel()

    def deterministic(self) -> Tensor:
        """The eval-mode gate values, without the mask (no gradient)."""
        with torch.no_grad():
            if self.gate_type == "sigmoid":
                return torch.ones_like(self.scores)
            return (torch.sigmoid(self.scores) * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0.0, 1.0)

    def value(self) -> Tensor:
        """The gate values of the next forward (train: sampled for HardConcrete; eval: deterministic), masked,
        with the straight-through gradient to the scores."""
        s = self.scores
        if self.gate_type == "sigmoid":
            # forward: the binary keep mask; gradient: dL/dz straight through to s, pruned neurons included
            return s - s.detach() + (1.0 if self.mask is None else self.mask.to(s))
        if self.training:
            u = self.noise if self.noise is not None else torch.rand_like(s)
            u = u.to(s).clamp(1e-6, 1.0 - 1e-6)
            z = torch.sigmoid((torch.log(u) - torch.log1p(-u) + s) / HC_BETA)
            z = (z * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0.0, 1.0)
        else:
            z = (torch.sigmoid(s) * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0.0, 1.0)
        if self.mask is not None:
            z = z + (z * self.mask.to(z) - z).detach()  # pruned neurons: forward 0, gradient still flows
        return z

    @torch.no_grad()
    def eval_value(self) -> Tensor:
        """The eval-mode gate values, mask included (what :func:`make_permanent` folds into the weights)."""
        was_training = self.training
        self.eval()
        try:
            return self.value().detach()
        finally:
            self.train(was_training)

    @torch.no_grad()
    def pruned(self) -> Tensor:
        """Boolean per neuron: its eval-mode gate is 0 (masked, or a HardConcrete gate closed at 0)."""
        return self.eval_value() == 0

    def density(self) -> Tensor:
        """The differentiable regulariser per neuron: ``sigmoid(s)`` or HardConcrete's ``P(z > 0)``."""
        return torch.sigmoid(self.scores if self.gate_type == "sigmoid" else self.scores - _HC_SHIFT)

    def extra_repr(self) -> str:
        return f"num_neurons={self.num_neurons}, gate_type={self.gate_type!r}"


def _gate_hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    gate: NeuronGate = getattr(module, GATE_ATTR)
    z = gate.value().to(output.dtype)
    if _is_channel_last(module):
        return output * z
    return output * z.view(-1, *([1] * (output.dim() - 2)))


def _is_channel_last(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


class GatedLayer:
    """A gated layer: its name, module, gate and the hook handle (returned by :func:`attach_gates`)."""

    def __init__(self, layer: NeuronLayer, gate: NeuronGate) -> None:
        self.name, self.module, self.kind, self.out_dim = layer.name, layer.module, layer.kind, layer.out_dim
        self.gate = gate

    @property
    def num_neurons(self) -> int:
        return self.gate.num_neurons

    def __repr__(self) -> str:
        return f"GatedLayer({self.name!r}, {self.kind}, {self.num_neurons} neurons)"


def has_gate_hook(module: nn.Module) -> bool:
    """Whether ``module`` has the gate's forward hook (it does not survive a module conversion such as
    ``SyncBatchNorm.convert_sync_batchnorm``, which carries the ``neuron_gate`` child over but not the hooks)."""
    return any(hook is _gate_hook for hook in module._forward_hooks.values())


def ensure_gate_hooks(model: nn.Module) -> list[GatedLayer]:
    """The gated layers of ``model``, with the gate's forward hook registered again on any that lost it (a layer
    replaced by a converted copy, e.g. Lightning's ``sync_batchnorm=True``, keeps its ``neuron_gate`` child but not
    its hooks)."""
    gated = find_gates(model)
    for g in gated:
        if not has_gate_hook(g.module):
            g.module.register_forward_hook(_gate_hook)
    return gated


def find_gates(model: nn.Module) -> list[GatedLayer]:
    """The gated layers of ``model``, in module order (empty when it has no gates)."""
    gated = []
    for name, module in model.named_modules():
        gate = getattr(module, GATE_ATTR, None)
        if isinstance(gate, NeuronGate):
            kind = layer_type(module)
            assert kind is not None, f"a gate on an unsupported layer {name!r}"
            gated.append(GatedLayer(NeuronLayer(name, module, kind, 1 if kind == "hf_conv1d" else 0), gate))
    return gated


def attach_gates(
    model: nn.Module,
    layer_types: Sequence[str] = ("bn",),
    include: Sequence[str] = (),
    exclude: Sequence[str] = ("shortcut", "downsample"),
    gate_type: GateType = "sigmoid",
    init: float | None = None,
) -> list[GatedLayer]:
    """Attach a :class:`NeuronGate` to every eligible layer of ``model`` (in place) and return the gated layers.

    Call it before the optimizer and the DDP wrap exist (a callback's ``setup``, or before ``Trainer.fit``), so that
    both see the scores. With gates at 1 (no mask) the outputs are bit-identical to the ungated model's.

    Args:
        model: any module.
        layer_types: subset of ``("conv", "linear", "hf_conv1d", "bn")``. For conv nets gate the BatchNorms (a gated
            conv before a BatchNorm is renormalised away); for transformers gate the MLP's first projection, e.g.
            ``layer_types=("hf_conv1d",), include=(r"mlp\\.c_fc",)`` for GPT-2.
        include, exclude: regular expressions on layer names (see :func:`find_neuron_layers`).
        gate_type: ``"sigmoid"`` or ``"hard_concrete"``.
        init: initial score (default per gate type).

    The classifier head (:func:`classifier_heads`) is skipped unless a pattern of ``include`` matches its name.

    Raises:
        ValueError: on an unknown type, no eligible layer, or a layer that already has a gate.

    Example::

        gated = attach_gates(model, layer_types=("bn",))
        ...  # train the scores, set masks with topk_keep_masks
        make_permanent(model)  # fold the masks into the weights; state_dict keys as before
    """
    if gate_type not in GATE_TYPES:
        raise ValueError(f"`gate_type` must be one of {GATE_TYPES}, got {gate_type!r}.")
    layers = find_neuron_layers(model, layer_types, include, exclude, allowed=GATE_LAYER_TYPES)
    heads = classifier_heads(model)
    named = [re.compile(p) for p in include]
    # the classifier head's outputs are the classes: never gated unless an `include` pattern names it
    skipped = [layer.name for layer in layers if layer.name in heads and not any(p.search(layer.name) for p in named)]
    layers = [layer for layer in layers if layer.name not in skipped]
    if not layers:
        raise ValueError(
            f"no eligible layer: the only layers of types {tuple(layer_types)} left are the classifier head"
            f" {skipped}, whose output neurons are the classes and which is never gated by default. Gate other layer"
            " types (e.g. 'bn'), or name the head in `include` to gate it anyway."
        )
    taken = [layer.name for layer in layers if hasattr(layer.module, GATE_ATTR)]
    if taken:
        raise ValueError(f"layers already gated: {taken[:5]}; call remove_gates or make_permanent first.")
    gated = []
    for layer in layers:
        weight = layer.weight
        gate = NeuronGate(layer.num_neurons, gate_type, init).to(device=weight.device, dtype=torch.float32)
        layer.module.add_module(GATE_ATTR, gate)
        layer.module.register_forward_hook(_gate_hook)
        gated.append(GatedLayer(layer, gate))
    return gated


def remove_gates(model: nn.Module) -> int:
    """Remove every gate and hook from ``model`` without touching the weights; returns how many were removed."""
    gated = find_gates(model)
    for g in gated:
        # found by identity rather than through a handle, so deep copies and pickled models work too
        for key, hook in list(g.module._forward_hooks.items()):
            if hook is _gate_hook:
                del g.module._forward_hooks[key]
        delattr(g.module, GATE_ATTR)
    return len(gated)


@torch.no_grad()
def make_permanent(model: nn.Module) -> dict[str, int]:
    """Fold each gate's eval-mode value (mask included) into its layer's weight and bias, then remove the gates.

    Afterwards the model has the ``state_dict`` keys of the ungated model, pruned neurons have all-zero weights and
    bias, and the eval-mode outputs equal the gated model's (to float rounding; exactly for binary gates). Returns
    the number of pruned neurons per layer.
    """
    pruned = {}
    for g in find_gates(model):
        z = g.gate.eval_value()
        weight = g.module.weight
        shape = [1] * weight.dim()
        shape[g.out_dim] = -1
        weight.mul_(z.to(weight).view(shape))
        bias = getattr(g.module, "bias", None)
        if isinstance(bias, Tensor):
            bias.mul_(z.to(bias))
        pruned[g.name] = int((z == 0).sum())
    remove_gates(model)
    return pruned


def _gate_prefixes(gated: Sequence[GatedLayer]) -> list[str]:
    return [f"{g.name}.{GATE_ATTR}." for g in gated]


@torch.no_grad()
def fold_gates_into_state_dict(state_dict: Mapping[str, Any], gated: Sequence[GatedLayer]) -> OrderedDict:
    """A copy of a gated model's ``state_dict`` with the gates folded in and their keys dropped.

    Each gated layer's weight and bias are multiplied by the gate's eval-mode value (mask included), as
    :func:`make_permanent` does, in new tensors (the model's own parameters are untouched). The result loads strictly
    into the ungated model, which then computes what the gated model computes in eval mode.
    ``gated`` must come from :func:`find_gates` on the module whose ``state_dict`` this is (names are its keys).
    """
    prefixes = tuple(_gate_prefixes(gated))
    factors = {}
    for g in gated:
        factors[f"{g.name}.weight"] = (g, "weight")
        factors[f"{g.name}.bias"] = (g, "bias")
    values = {g.name: g.gate.eval_value() for g in gated}
    out: OrderedDict = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith(prefixes):
            continue
        if key in factors and isinstance(value, Tensor):
            g, kind = factors[key]
            z = values[g.name].to(device=value.device, dtype=value.dtype)
            if kind == "weight":
                shape = [1] * value.dim()
                shape[g.out_dim] = -1
                z = z.view(shape)
            value = value * z
        out[key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            (k, v) for k, v in metadata.items() if not f"{k}.".startswith(prefixes)
        )
    return out


def num_pruned(
    sizes: Sequence[int], sparsity: float, scope: Literal["layer", "global"] = "layer", min_keep: int = 1
) -> int:
    """How many neurons :func:`topk_keep_masks` prunes, computed on the host (no device sync)."""
    if scope == "layer":
        return sum(min(math.floor(sparsity * n + 1e-9), max(n - min_keep, 0)) for n in sizes)
    total = sum(sizes)
    return min(math.floor(sparsity * total + 1e-9), total - sum(min(min_keep, n) for n in sizes))


def topk_keep_masks(
    scores: Sequence[Tensor],
    sparsity: float,
    scope: Literal["layer", "global"] = "layer",
    min_keep: int = 1,
) -> list[Tensor]:
    """Boolean keep masks that prune the ``floor(sparsity * n)`` lowest-scoring neurons.

    ``scope="layer"`` prunes that share of each layer (at most ``n - min_keep`` of it); ``"global"`` ranks all
    neurons together, keeping each layer's ``min_keep`` best. Ties are broken by position (stable sort), so equal
    scores give the same mask on every rank.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity}.")
    if scope not in ("layer", "global"):
        raise ValueError(f"`scope` must be 'layer' or 'global', got {scope!r}.")
    masks = []
    if scope == "layer":
        for s in scores:
            k = num_pruned([s.numel()], sparsity, "layer", min_keep)
            mask = torch.ones(s.numel(), dtype=torch.bool, device=s.device)
            mask[torch.argsort(s.detach(), stable=True)[:k]] = False
            masks.append(mask)
        return masks
    protected = []
    for s in scores:
        p = s.detach().float().clone()
        keep = min(min_keep, s.numel())
        if keep:
            p[torch.argsort(p, descending=True, stable=True)[:keep]] = float("inf")
        protected.append(p)
    flat = torch.cat(protected)
    k = num_pruned([s.numel() for s in scores], sparsity, "global", min_keep)
    keep_flat = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    keep_flat[torch.argsort(flat, stable=True)[:k]] = False
    return list(keep_flat.split([s.numel() for s in scores]))


@torch.no_grad()
def gate_penalty_grad(gates: Sequence[NeuronGate]) -> list[Tensor]:
    """The gradient of the mean regulariser ``mean(density)`` over all neurons of ``gates``, per gate.

    Computed in closed form (``sigmoid'``), so it can be added to the scores' gradients without a second backward
    (a backward outside DDP's forward would fire DDP's gradient hooks).
    """
    total = sum(g.num_neurons for g in gates)
    grads = []
    for g in gates:
        d = g.density()
        grads.append(d * (1 - d) / total)
    return grads
