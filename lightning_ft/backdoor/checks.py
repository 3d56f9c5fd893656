"""Failure modes of TSBD that would otherwise look like a normal run, turned into clear errors and warnings.

- :func:`check_clean_batch`: the first clean batch, before any unlearning step: the model must output at least two
  class scores and the labels must be class indices (else clean accuracy, stage 1's stop rule, means nothing).
- :func:`check_weight_changes`: before the selection and before the user's weights are touched: an all-zero
  neuron-weight change (unlearning moved no eligible weight) is an error; :func:`drop_unchanged`: a sub-weight whose
  change is exactly 0 is never zeroed.
- :func:`warn_eval_modules`: at ``on_train_start``, the submodules that train in eval mode (Lightning keeps each
  submodule's mode for the whole fit).
- :func:`warn_small_layer_share`: at ``setup``, a layer selection that holds a small share of the model's weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_ft._internal.batches import inputs_and_labels
from lightning_ft._internal.forward import has_user_loss, model_logits
from lightning_ft._internal.modules import eval_mode
from lightning_ft._internal.neurons import NeuronLayer
from lightning_ft._internal.offline import ContextFactory
from lightning_ft.backdoor.layers import SMALL_LAYER_SHARE, layer_share, weight_parameters

__all__ = [
    "EVAL_MODULES_SHOWN",
    "check_clean_batch",
    "check_weight_changes",
    "drop_unchanged",
    "eval_mode_modules",
    "warn_eval_modules",
    "warn_small_layer_share",
]

EVAL_MODULES_SHOWN = 5  # eval-mode submodules named in the warning (the rest are counted)

# the callbacks that share the once-per-fit warnings (matched by class name along the MRO: no import cycle)
_TSBD_CALLBACKS = ("NeuronWeightChangeReinit", "ActivenessAwareFineTuning")
# the labels cross-entropy accepts as class indices (int32 targets raise in F.cross_entropy)
_CE_LABEL_DTYPES = (torch.int64, torch.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# 1 + 4: the first clean batch
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def check_clean_batch(
    model: nn.Module, loader: Iterable[Any], context: ContextFactory = contextlib.nullcontext
) -> None:
    """Check the first batch of TSBD's clean data on ``model`` (one eval-mode forward, no gradient, buffers untouched).

    Raises ``ValueError`` when

    - the logits have fewer than 2 classes (last dimension < 2, or a single score per sample): clean accuracy, the
      unlearning's stop rule, is then 1 or meaningless, and no neuron is selected for a reason;
    - the labels are not class indices: not an integer tensor (float, soft or one-hot labels), not shaped as the
      logits without their class dimension (``(N,)`` for ``(N, C)`` logits), or outside ``[0, C)`` (padding such as
      ``-100`` included). This holds with a ``lightning_ft_loss`` too: the loss is then the user's, but the stop
      rule still compares ``argmax(logits)`` with the labels. Without that hook the labels must also be ``int64``
      (or ``uint8``), the targets cross-entropy accepts.

    An empty loader raises ``ValueError`` too.
    """
    iterator = iter(loader)
    try:
        batch = next(iterator)
    except StopIteration:
        raise ValueError("the clean data loader is empty: TSBD's clean unlearning needs clean samples.") from None
    finally:
        del iterator  # release worker processes before the unlearning starts its own passes
    x, y = inputs_and_labels(batch)
    with eval_mode(model), context():
        logits = model_logits(model, x)
    shape = tuple(logits.shape)
    if logits.dim() < 2 or shape[-1] < 2:
        seen = f"logits of shape {shape}" + (" (one score per sample)" if logits.dim() < 2 else "")
        raise ValueError(
            f"TSBD needs a classifier with at least 2 output classes; the model's forward gave {seen} on the first"
            " clean batch. Clean unlearning stops on clean accuracy, which is meaningless with a single output: give"
            " a binary classifier two logits (shape (N, 2)) rather than one score."
        )
    num_classes = shape[-1]
    expected = (
        f"an integer tensor of shape {shape[:-1]} (the logits {shape} without the class dimension) with values in"
        f" [0, {num_classes})"
    )
    where = (
        " (TSBD's stop rule compares argmax(logits) with these labels, also when `lightning_ft_loss` computes the loss:"
        " pass `dataloader=` with (inputs, class index) batches for stage 1)"
    )
    if not isinstance(y, Tensor):
        raise ValueError(
            f"TSBD's clean labels must be class indices: {expected}; the first clean batch has labels of type"
            f" {type(y).__name__}{where}."
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        soft = " (one-hot or soft labels: pass their argmax)" if tuple(y.shape) == shape else ""
        raise ValueError(
            f"TSBD's clean labels must be class indices: {expected}; the first clean batch has {y.dtype} labels of"
            f" shape {tuple(y.shape)}{soft}{where}."
        )
    if tuple(y.shape) != shape[:-1]:
        squeeze = " (squeeze the trailing dimension)" if tuple(y.shape) == (*shape[:-1], 1) else ""
        raise ValueError(
            f"TSBD's clean labels must be class indices: {expected}; the first clean batch has labels of shape"
            f" {tuple(y.shape)} ({y.dtype}){squeeze}{where}."
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"TSBD's clean labels must be class indices: {expected}; the first clean batch has labels from"
            f" {int(y.min())} to {int(y.max())} for {num_classes} classes (padding labels such as -100 are not"
            f" supported: clean accuracy counts every label){where}."
        )
    if not has_user_loss(model) and y.dtype not in _CE_LABEL_DTYPES:
        raise ValueError(
            f"TSBD's clean unlearning ascends cross-entropy, which needs int64 (torch.long) class indices; the first"
            f" clean batch has {y.dtype} labels. Cast them (`y.long()`) in your dataset or collate_fn, or define"
            " `lightning_ft_loss(batch)` on your LightningModule."
        )


# ----------------------------------------------------------------------------------------------------------------------
# 2: the neuron-weight changes
# ----------------------------------------------------------------------------------------------------------------------


def check_weight_changes(
    changes: dict[str, Tensor], layers: Sequence[NeuronLayer] = (), lr_unlearn: float | None = None
) -> None:
    """Raise ``ValueError`` when every neuron-weight change is 0; warn (rank 0) about frozen eligible layers.

    Call it on :func:`~lightning_ft.backdoor.functional.neuron_weight_changes` before the selection and before the
    user's weights are touched. An all-zero NWC means clean unlearning moved none of the eligible weights (the layers
    are frozen, ``requires_grad=False``, or get no gradient; or ``lr_unlearn`` is too small to move float32 weights):
    the pooled sub-weight threshold is then 0 and every weight of the selected neurons would be zeroed for no reason.
    Eligible layers that are frozen while others are not can never be selected (their change is 0): warned.
    """
    frozen = [layer.name for layer in layers if not layer.weight.requires_grad]
    if not any(bool((c != 0).any()) for c in changes.values()):
        if layers and len(frozen) == len(layers):
            cause = (
                f"every eligible layer is frozen (requires_grad=False: {_names(frozen)}): unfreeze them for the fit,"
                " or pass `include`/`layer_types` naming trainable layers"
            )
        else:
            lr = f" (lr_unlearn={lr_unlearn})" if lr_unlearn is not None else ""
            cause = (
                f"the unlearning steps{lr} were too small to change float32 weights, or the eligible layers get no"
                " gradient (frozen or unused in forward); raise `lr_unlearn` (1e-3 for a few batches per epoch),"
                " unfreeze the layers, or check that `layer_types`/`include` name layers the forward uses"
            )
        raise ValueError(
            f"TSBD stage 1: clean unlearning changed no weight of the {len(changes)} eligible layer(s), so every"
            f" neuron-weight change is 0 and no neuron stands out; nothing was zeroed. Cause: {cause}."
        )
    if frozen:
        rank_zero_warn(
            f"TSBD stage 1: {len(frozen)} eligible layer(s) are frozen (requires_grad=False: {_names(frozen)}); clean"
            " unlearning cannot move them, so their neurons are never selected nor zeroed. Unfreeze them for the fit,"
            " or leave them out with `exclude`."
        )


def drop_unchanged(changes: dict[str, Tensor], masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """``masks`` (from :func:`~lightning_ft.backdoor.functional.select_reinit_weights`) without the sub-weights whose
    change is exactly 0.

    When some changes are 0 (frozen layers, inputs that never fire, a neuron the unlearning did not move) the pooled
    threshold can reach 0 (``subweight_ratio`` above the share of changed weights among the selected neurons' weights)
    and ``changes >= threshold`` would take those weights too: they carry no evidence of a backdoor and are kept.
    """
    return {name: mask & (changes[name] != 0).to(mask.device) for name, mask in masks.items()}


def _names(names: Sequence[str], shown: int = EVAL_MODULES_SHOWN) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# ----------------------------------------------------------------------------------------------------------------------
# once-per-fit warnings shared by stage 1 and stage 2
# ----------------------------------------------------------------------------------------------------------------------


def _is_tsbd(callback: Any) -> bool:
    return any(cls.__name__ in _TSBD_CALLBACKS for cls in type(callback).__mro__)


def _earlier_tsbd_callbacks(trainer: pl.Trainer, owner: Any) -> list[Any]:
    """The TSBD callbacks that run their hooks before ``owner`` in this fit (Lightning calls them in list order)."""
    earlier = []
    for callback in trainer.callbacks:
        if callback is owner:
            return earlier
        if _is_tsbd(callback):
            earlier.append(callback)
    return []  # owner not registered (called by hand): warn


def eval_mode_modules(model: nn.Module) -> list[str]:
    """The roots of ``model``'s eval-mode subtrees: each submodule in eval mode whose parent is in train mode (or the
    model itself, ``"<root>"``, when it is in eval mode), in module order."""
    training = {name: module.training for name, module in model.named_modules()}
    roots = []
    for name, is_training in training.items():
        if is_training:
            continue
        if name == "":
            roots.append("<root>")
            continue
        parent = name.rpartition(".")[0]
        if training.get(parent, True):
            roots.append(name)
    return roots


def warn_eval_modules(trainer: pl.Trainer, pl_module: nn.Module, owner: Any) -> None:
    """Warn (rank 0) about the submodules of ``pl_module`` in eval mode when the fit's training starts; call it from
    ``on_train_start``. Once per fit: only the first TSBD callback of the Trainer warns.

    Lightning (2.2 and later) never calls ``model.train()`` at fit start: it keeps each submodule's mode for the whole
    fit (the sanity check and every validation restore the modes they found), so a submodule in eval mode at
    ``on_train_start`` trains in eval mode: a BatchNorm normalises with frozen running statistics and never updates
    them, a Dropout is off. TSBD's fine-tuning (stage 2 and the user's training steps) then repairs a different network
    than the one unlearned in stage 1, whose working copy is put fully in train mode (``clean_unlearning`` calls
    ``train()`` on it). A LightningModule that sets the modes itself in its own ``on_train_start`` (which runs after the
    callbacks') may ignore the warning.
    """
    if _earlier_tsbd_callbacks(trainer, owner):
        return
    roots = eval_mode_modules(pl_module)
    if not roots:
        return
    modules = dict(pl_module.named_modules())
    inside = [m for r in roots for m in (pl_module if r == "<root>" else modules[r]).modules()]
    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in inside)
    dropouts = sum(isinstance(m, nn.modules.dropout._DropoutNd) for m in inside)
    kinds = f" ({norms} BatchNorm, {dropouts} Dropout inside)" if norms or dropouts else ""
    rank_zero_warn(
        f"{type(owner).__name__}: {len(roots)} submodule(s) of the model are in eval mode when training starts:"
        f" {_names(roots)}{kinds}. Lightning keeps each submodule's mode for the whole fit, so they train in eval mode"
        " (BatchNorm statistics frozen, Dropout off) while TSBD's clean unlearning runs its copy in train mode. Call"
        " `model.train()` before `trainer.fit` (a model loaded and `.eval()`ed, or parts put in eval mode by hand);"
        " ignore this if those parts are frozen on purpose."
    )


def warn_small_layer_share(
    trainer: pl.Trainer | None, model: nn.Module, layers: Sequence[NeuronLayer], owner: Any
) -> float:
    """Warn (rank 0) when ``layers`` hold less than :data:`~lightning_ft.backdoor.layers.SMALL_LAYER_SHARE` of
    ``model``'s weights (:func:`~lightning_ft.backdoor.layers.layer_share`); returns the share. Call it from ``setup``.

    A callback of the Trainer whose earlier TSBD callback selects the same layers does not warn again (``tsbd()`` in
    clip mode). The message names the share, the selection's arguments and the largest weights left out.
    """
    share = layer_share(model, layers)
    if share >= SMALL_LAYER_SHARE:
        return share
    names = [layer.name for layer in layers]
    if trainer is not None:
        for other in _earlier_tsbd_callbacks(trainer, owner):
            if getattr(other, "mode", "clip") != "clip":  # stage 2 in penalty mode selects no layer
                continue
            with contextlib.suppress(Exception):
                if [layer.name for layer in other.layers(model)] == names:
                    return share
    chosen = {id(layer.weight) for layer in layers}
    left_out = sorted(
        ((name, p) for name, p in weight_parameters(model) if id(p) not in chosen), key=lambda item: -item[1].numel()
    )
    largest = ", ".join(f"{name} ({p.numel():,})" for name, p in left_out[:3])
    arguments = ", ".join(
        f"{arg}={getattr(owner, arg)!r}" for arg in ("layer_types", "include", "exclude") if hasattr(owner, arg)
    )
    rank_zero_warn(
        f"{type(owner).__name__}: the {len(layers)} selected layer(s) hold {share:.1%} of the model's weights (weight"
        f" matrices and kernels), under {SMALL_LAYER_SHARE:.0%}: a backdoor in the other weights is out of TSBD's"
        f" reach. Largest weights left out: {largest}. Widen the selection ({arguments}): `layer_types=None` (auto) or"
        " ['conv', 'linear'], a broader `include`, fewer `exclude` patterns."
    )
    return share
