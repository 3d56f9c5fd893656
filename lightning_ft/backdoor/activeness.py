"""TSBD stage 2: activeness-aware fine-tuning (gradient-norm-penalised update, two-pass approximation), and a
one-pass per-neuron gradient-norm clipping variant.

The objective ``L_ft = L + lambda * ||grad L||`` has the gradient ``grad L + lambda * H grad L / ||grad L||``.
Zhao et al. (2022) approximate it by a finite difference along the normalised gradient with step ``r``::

    grad L_ft ~= (1 - alpha) * grad L(theta) + alpha * grad L(theta + r * g / ||g||),   alpha = lambda / r

which the official TSBD code (``train_finetuning_reg``) applies per batch with a per-tensor norm.

``mode="clip"`` is our reconstruction of the cheaper defense named in the design: TSBD observes that backdoor-related
neurons have far larger gradient norms on clean data than the rest, and the penalty damps exactly those updates. The
clip variant does that directly, in one pass: every neuron's (output channel's) gradient norm is capped at
``clip_factor`` times the median neuron gradient norm of its layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from lightning_ft._internal.forward import model_loss
from lightning_ft._internal.neurons import NeuronLayer
from lightning_ft._internal.strategies import check_strategy
from lightning_ft.backdoor.checks import warn_eval_modules, warn_small_layer_share
from lightning_ft.backdoor.layers import check_layer_types, tsbd_layers

__all__ = ["ActivenessAwareFineTuning", "activeness_aware_gradients_", "clip_neuron_gradients_"]

Norm = Literal["per_tensor", "global"]
Mode = Literal["penalty", "clip"]


def _validate(alpha: float, r: float, norm: str) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}.")
    if not r > 0:
        raise ValueError(f"`r` must be > 0, got {r}.")
    if norm not in ("per_tensor", "global"):
        raise ValueError(f'`norm` must be "per_tensor" or "global", got {norm!r}.')


def activeness_aware_gradients_(
    model: nn.Module,
    loss_fn: Callable[[], Tensor],
    alpha: float = 0.7,
    r: float = 0.05,
    norm: Norm = "per_tensor",
    eps: float = 1e-12,
    reduce_fn: Callable[[Tensor], Tensor] | None = None,
) -> None:
    """Replace every ``p.grad`` of ``model`` by ``(1 - alpha) * g1 + alpha * g2`` in place.

    ``g1`` is the current ``p.grad`` (the plain gradient at ``theta``); ``g2`` is the gradient of ``loss_fn()`` (the
    same batch's loss, recomputed through ``model``) at ``theta + r * g1 / (||g1|| + eps)``, with the norm taken per
    tensor (official code; every tensor moves by ``r``) or over all tensors (``"global"``, the paper's formula).
    Parameters without a gradient are skipped. Parameters and buffers (BatchNorm statistics) are restored
    bit-exactly after the perturbed pass.

    Args:
        model: the module whose parameters carry the gradient.
        loss_fn: recomputes the loss through ``model`` (called once, with grad enabled).
        alpha: mixing weight in [0, 1]; 0 leaves the plain gradient.
        r: perturbation radius, > 0.
        norm: ``"per_tensor"`` or ``"global"``.
        eps: added to norms (a zero gradient does not divide by zero).
        reduce_fn: averages a flat tensor over data-parallel ranks (the perturbed gradient is local).
    """
    _validate(alpha, r, norm)
    params = [p for p in model.parameters() if p.grad is not None]
    if alpha == 0.0 or not params:
        return
    g1 = [p.grad.detach() for p in params]  # type: ignore[union-attr]  # autograd.grad below leaves .grad alone
    saved_params = [p.detach().clone() for p in params]
    saved_buffers = [b.detach().clone() for b in model.buffers()]
    with torch.no_grad():
        # norms in at least fp32 (bf16 gradients), never below the gradients' own precision
        norms = torch.stack([n.to(torch.promote_types(n.dtype, torch.float32)) for n in torch._foreach_norm(g1)])
        if norm == "global":
            norms = torch.linalg.vector_norm(norms).expand(len(g1))
        scales = (r / (norms + eps)).unbind()
        torch._foreach_add_(params, torch._foreach_mul(g1, scales))
    try:
        with torch.enable_grad():
            g2 = torch.autograd.grad(loss_fn(), params, allow_unused=True)
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, saved_params)
            buffers = list(model.buffers())
            if buffers:
                torch._foreach_copy_(buffers, saved_buffers)
    g2 = [torch.zeros_like(g) if h is None else h for g, h in zip(g1, g2, strict=True)]
    if reduce_fn is not None:
        flat = reduce_fn(torch.cat([h.reshape(-1) for h in g2]))
        g2 = [h.view_as(g) for h, g in zip(torch.split(flat, [h.numel() for h in g2]), g1, strict=True)]
    with torch.no_grad():  # p.grad = (1 - alpha) * g1 + alpha * g2, in place
        torch._foreach_mul_(g1, 1.0 - alpha)
        torch._foreach_add_(g1, g2, alpha=alpha)


def _check_clip_factor(clip_factor: float) -> None:
    if isinstance(clip_factor, bool) or not isinstance(clip_factor, (int, float)) or not clip_factor > 0:
        raise ValueError(f"`clip_factor` must be a number > 0, got {clip_factor!r}.")


@torch.no_grad()
def clip_neuron_gradients_(layers: Sequence[NeuronLayer], clip_factor: float = 1.0, eps: float = 1e-12) -> Tensor:
    """Cap each neuron's gradient norm at ``clip_factor`` times its layer's median neuron gradient norm, in place.

    A neuron's gradient is its output channel's slice of ``weight.grad`` together with its ``bias.grad`` entry; when
    its L2 norm ``n_j`` exceeds ``tau = clip_factor * median_j(n_j)``, both are scaled by ``tau / n_j``. Layers
    without a gradient are skipped. One vectorised pass per layer, no extra forward or backward.

    Args:
        layers: neuron layers (:func:`~lightning_ft.backdoor.find_neuron_layers`).
        clip_factor: the cap as a multiple of the layer's median neuron gradient norm, > 0 (1.0: at most the
            median, i.e. every above-median neuron is scaled down to it).
        eps: numerical floor of the norms.

    Returns:
        The number of neurons whose gradient was scaled down, as a 0-dim tensor (no host sync).
    """
    _check_clip_factor(clip_factor)
    clipped = torch.zeros((), dtype=torch.long)
    for layer in layers:
        grad = layer.weight.grad
        if grad is None:
            continue
        bias = getattr(layer.module, "bias", None)
        bias_grad = bias.grad if isinstance(bias, Tensor) else None
        squared = layer.per_neuron(grad).float().pow(2).sum(1)
        if bias_grad is not None:
            squared = squared + bias_grad.float().pow(2)
        norms = squared.sqrt()
        scale = (clip_factor * norms.median() / (norms + eps)).clamp_(max=1.0)
        shape = [1] * grad.dim()
        shape[layer.out_dim] = -1
        grad.mul_(scale.to(grad.dtype).view(shape))
        if bias_grad is not None:
            bias_grad.mul_(scale.to(bias_grad.dtype))
        clipped = clipped.to(scale.device) + (scale < 1.0).sum()
    return clipped


class ActivenessAwareFineTuning(Callback):
    """TSBD stage 2: fine-tune with an update that damps backdoor-active neurons.

    ``mode="penalty"`` (the paper): in ``on_before_optimizer_step`` (gradients accumulated, unscaled and, under DDP,
    already all-reduced) the plain gradient ``g1`` is mixed with the gradient ``g2`` at the point
    ``theta + r * g1 / ||g1||`` computed on the same batch (:func:`activeness_aware_gradients_`): one extra forward and
    backward per step, so the step costs about twice a plain one. ``g2`` is averaged over ranks. Parameters and
    BatchNorm buffers are restored exactly after the perturbed pass, which runs without autocast. The loss of the
    perturbed pass (:meth:`compute_loss`) is the module's ``lightning_ft_loss(batch)`` when it defines one (define it
    to return the loss your ``training_step`` computes), else cross-entropy of the forward's logits (a tensor, a
    ``{"logits": ...}`` dict or an HF ``ModelOutput``) on the stashed batch. Logs ``backdoor/perturbed_loss``.

    ``mode="clip"`` (our one-pass reconstruction): each neuron's gradient norm is capped at ``clip_factor`` times its
    layer's median (:func:`clip_neuron_gradients_`) over the ``layer_types`` layers; no extra pass, no batch needed.
    Gradients are already identical on all ranks, so the clipped update is too. Logs ``backdoor/clipped_neurons``
    (per-step count, epoch mean).

    A new fit starts with ``steps`` at 0 (a reused instance behaves like a fresh one); a fit resumed from its
    checkpoint continues the count. FSDP, DeepSpeed and model-parallel strategies are refused at ``setup``.

    Args:
        alpha: penalty mode's mixing weight (official: 0.7, i.e. lambda = alpha * r = 0.035).
        r: penalty mode's perturbation radius (official: 0.05).
        norm: ``"per_tensor"`` (official code) or ``"global"`` (the paper's formula).
        eps: numerical floor of the norms.
        mode: ``"penalty"`` or ``"clip"``.
        clip_factor: clip mode's cap, as a multiple of each layer's median neuron gradient norm.
        layer_types: clip mode's neuron layers, subset of ``("conv", "linear", "hf_conv1d")``; None (auto, as stage
            1): the convolutions of a CNN, the linear layers of a model with fewer than two convolutions.
        include: clip mode: regexes a layer name must match (empty: all).
        exclude: clip mode: regexes of layer names to skip.
        exclude_head: clip mode: never clip the classifier head's gradients.

    Raises:
        ValueError: at setup with ``accumulate_grad_batches > 1`` in penalty mode (only the last micro-batch
            would be seen), manual optimisation, or several optimizers.

    Example::

        trainer = Trainer(callbacks=[NeuronWeightChangeReinit(lr_unlearn=1e-3), ActivenessAwareFineTuning()])
        trainer.fit(classifier, clean_datamodule)

    Reference: Lin et al., NeurIPS 2024 (TSBD); Zhao, Zhang & Hu, "Penalizing Gradient Norm for Efficiently Improving
    Generalization in Deep Learning", ICML 2022.
    """

    def __init__(
        self,
        alpha: float = 0.7,
        r: float = 0.05,
        norm: Norm = "per_tensor",
        eps: float = 1e-12,
        mode: Mode = "penalty",
        clip_factor: float = 1.0,
        layer_types: Sequence[str] | None = None,
        include: Sequence[str] = (),
        exclude: Sequence[str] = ("shortcut", "downsample"),
        exclude_head: bool = True,
    ) -> None:
        super().__init__()
        _validate(alpha, r, norm)
        if mode not in ("penalty", "clip"):
            raise ValueError(f'`mode` must be "penalty" or "clip", got {mode!r}.')
        _check_clip_factor(clip_factor)
        check_layer_types(layer_types)
        self.alpha, self.r, self.norm, self.eps = alpha, r, norm, eps
        self.mode, self.clip_factor = mode, float(clip_factor)
        self.layer_types = None if layer_types is None else tuple(layer_types)
        self.include, self.exclude, self.exclude_head = tuple(include), tuple(exclude), exclude_head
        self._layers: list[NeuronLayer] = []
        self._batch: Any = None
        self.steps = 0
        self._loaded = False  # state given by load_state_dict that the next fit must keep

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode)  # alpha, r, norm may change on resume

    def layers(self, model: nn.Module) -> list[NeuronLayer]:
        """Clip mode's neuron layers on ``model``."""
        return tsbd_layers(model, self.layer_types, self.include, self.exclude, self.exclude_head)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__)
        if self.mode == "penalty" and trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "ActivenessAwareFineTuning(mode='penalty') recomputes the loss on the current batch only, so it does"
                f" not support accumulate_grad_batches={trainer.accumulate_grad_batches}; use a larger batch or"
                " mode='clip'."
            )
        if not self._loaded:  # a new fit starts afresh; a resumed fit's state is restored after setup
            self.steps = 0
        self._batch = None
        if self.mode == "clip":  # fail before training on a model without eligible layers
            self._layers = self.layers(pl_module)
            warn_small_layer_share(trainer, pl_module, self._layers, self)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError("ActivenessAwareFineTuning needs automatic optimization (it hooks the optimizer step).")
        if len(trainer.optimizers) != 1:
            raise ValueError(f"ActivenessAwareFineTuning supports one optimizer, got {len(trainer.optimizers)}.")
        self._loaded = False
        warn_eval_modules(trainer, pl_module, self)  # once per fit, with stage 1
        if self.mode == "clip":  # the strategy may have wrapped or moved modules since setup
            self._layers = self.layers(pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.mode == "penalty":
            self._batch = batch

    def compute_loss(self, pl_module: pl.LightningModule, batch: Any) -> Tensor:
        """The loss of the perturbed pass: ``pl_module.lightning_ft_loss(batch)`` when defined, else cross-entropy of
        the forward's logits on an ``(x, y)`` batch (:func:`~lightning_ft._internal.forward.model_loss`). Override it
        in a subclass for a loss that depends on more than the module and the batch."""
        return model_loss(pl_module, batch)[0]

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.mode == "clip":
            clipped = clip_neuron_gradients_(self._layers, self.clip_factor, self.eps)
            self.steps += 1
            _log(pl_module, "backdoor/clipped_neurons", clipped.float())
            return
        if self._batch is None:
            return
        batch = self._batch
        perturbed: list[Tensor] = []

        def loss_fn() -> Tensor:
            loss = self.compute_loss(pl_module, batch)
            perturbed.append(loss.detach())
            return loss

        def reduce(flat: Tensor) -> Tensor:
            return trainer.strategy.reduce(flat, reduce_op="mean") if trainer.world_size > 1 else flat

        activeness_aware_gradients_(pl_module, loss_fn, self.alpha, self.r, self.norm, self.eps, reduce)
        self.steps += 1
        self._batch = None
        if perturbed:
            _log(pl_module, "backdoor/perturbed_loss", perturbed[0].float())

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._loaded = False

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = state_dict.get("steps", 0)
        self._loaded = True


def _log(pl_module: pl.LightningModule, name: str, value: Tensor) -> None:
    # epoch mean, reduced over ranks once per epoch (EarlyStopping/ModelCheckpoint can monitor it)
    pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)
