"""Trigger-free calibration of TSBD's ``neuron_ratio`` from clean data only (``neuron_ratio="auto"``).

A defender has no poisoned data and no trigger, so the attack success rate cannot guide the choice of how many
neurons stage 1 reinitialises. What the defender can measure is what the choice costs: whether fine-tuning on the
clean data repairs the zeroed network. The rule (ours; the paper sweeps the ratio with knowledge of the attack):

1. **Candidates** ``0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5`` (the official sweep's range), scanned from the smallest.
2. **Repair probe** per candidate and fold (``folds``-fold cross-validation over the clean samples): a copy of the
   original model, the candidate's weights zeroed (the same NWC, the same ``subweight_ratio``), fine-tuned on the other
   folds for ``epochs`` epochs with the fit's optimizer (its class and settings; ``SGD(0.01, momentum=0.9)``, the
   paper's recipe, without a Trainer) on the training loss (the ``lightning_ft_loss`` hook or cross-entropy), then
   scored on the held-out fold. Every clean sample is held out once; the candidate's *repaired accuracy* is pooled
   over the folds.
3. **Choice**: the largest candidate whose repaired accuracy is within ``max_acc_drop`` of the original model's
   accuracy on the same clean samples, scanning upward and stopping at the first candidate that misses the budget
   (larger ratios zero more of the network and recover less: a later pass would be noise). Backdoor removal grows
   with the ratio, so the rule spends the accuracy budget the user allows on removal. When no candidate meets the
   budget, the smallest is used and a warning says so.

The reference accuracy is the original model's on the clean set, which it may have been trained on (the clean set
is then part of the attacker's training data): the budget is then stricter than on unseen data.

Reference: the zero reinitialisation being calibrated is from Lin et al., "Unveiling and Mitigating Backdoor
Vulnerabilities based on Unlearning Weight Changes and Backdoor Activeness", NeurIPS 2024, arXiv:2405.20291.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lightning_ft._internal.batches import inputs_and_labels, loader_batch_size
from lightning_ft._internal.distributed import OfflineGroup
from lightning_ft._internal.forward import model_logits, model_loss
from lightning_ft._internal.logging import log_table
from lightning_ft._internal.modules import eval_mode
from lightning_ft._internal.neurons import NeuronLayer
from lightning_ft._internal.offline import ContextFactory, OfflinePhase, copy_forward_context, working_copy
from lightning_ft._internal.validation import check_int
from lightning_ft.backdoor.functional import select_reinit_weights, zero_reinit_

__all__ = [
    "DEFAULT_CANDIDATES",
    "DEFAULT_PROBE_EPOCHS",
    "Calibration",
    "Edit",
    "OptimizerFactory",
    "calibrate_neuron_ratio",
    "check_calibration_arguments",
    "clean_folds",
    "log_calibration",
    "prediction_counts",
    "probe_recipe",
    "repaired_counts",
    "scan_candidates",
]

DEFAULT_CANDIDATES: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
"""The neuron ratios ``neuron_ratio="auto"`` tries, smallest first (the official code sweeps 0.01 to 0.9)."""

DEFAULT_PROBE_EPOCHS = 20
"""Repair-probe epochs when neither the callback nor the Trainer (``max_epochs``) says how many."""

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def _sgd(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)  # the paper's fine-tuning recipe


def _fit_optimizer(trainer: pl.Trainer) -> OptimizerFactory | None:
    """A factory for the fit's first optimizer: its class with its constructor settings (``defaults``)."""
    if not trainer.optimizers:
        return None
    template = trainer.optimizers[0]
    settings = dict(template.defaults)

    def build(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        try:
            return type(template)(params, **settings)
        except TypeError as error:
            raise ValueError(
                f"an 'auto' calibration fine-tunes its repair probes with the fit's optimizer, but"
                f" {type(template).__name__}(params, **defaults) failed ({error}). Pass a number instead of 'auto'"
                " (`neuron_ratio`, `threshold`)."
            ) from error

    return build


def probe_recipe(
    trainer: pl.Trainer | None, model: nn.Module, epochs: int | None
) -> tuple[int, OptimizerFactory, ContextFactory]:
    """How the repair probes of an ``"auto"`` calibration fine-tune copies of ``model``: ``epochs`` (None: the fit's
    ``max_epochs``, else :data:`DEFAULT_PROBE_EPOCHS`), the fit's first optimizer (its class and constructor
    settings; ``SGD(0.01, momentum=0.9)``, the paper's recipe, without one), and the forward context of a float32
    working copy (:func:`~lightning_ft._internal.offline.copy_forward_context`)."""
    if epochs is None:
        max_epochs = trainer.max_epochs if trainer is not None else None
        epochs = max_epochs if max_epochs is not None and max_epochs > 0 else DEFAULT_PROBE_EPOCHS
    optimizer = (_fit_optimizer(trainer) if trainer is not None else None) or _sgd
    return epochs, optimizer, copy_forward_context(trainer, model)


@dataclass
class Calibration:
    """The outcome of a calibration (:func:`calibrate_neuron_ratio`, RNP's threshold).

    Attributes:
        value: the chosen candidate (TSBD: the neuron ratio; RNP: the mask threshold).
        rule: ``"largest_within_budget"`` or ``"none_within_budget"`` (the smallest candidate was used).
        reference_acc: the original model's accuracy on the clean samples.
        candidates: one row per candidate tried: the candidate (under ``key``), how many neurons or channels it edits
            (under ``size_key``), ``repaired_acc``, ``drop`` (``reference_acc - repaired_acc``), ``within_budget``.
    """

    value: float
    rule: str
    reference_acc: float
    candidates: list[dict[str, Any]] = field(default_factory=list)
    key: str = "ratio"
    size_key: str = "neurons"

    @property
    def ratio(self) -> float:
        """TSBD's name for :attr:`value`."""
        return self.value

    def report(self) -> dict[str, Any]:
        """The entries a callback's ``report`` (and checkpoint) keeps: ``calibration_rule``,
        ``calibration_reference_acc`` and the ``calibration`` rows."""
        return {
            "calibration_rule": self.rule,
            "calibration_reference_acc": self.reference_acc,
            "calibration": [dict(row) for row in self.candidates],
        }

    def warn_if_outside_budget(self, owner: str, max_acc_drop: float) -> None:
        """A warning (rank 0) when no candidate met the budget and the smallest was used; ``owner`` names the caller
        (e.g. ``"NeuronWeightChangeReinit(neuron_ratio='auto')"``)."""
        if self.rule != "none_within_budget":
            return
        first = self.candidates[0]
        rank_zero_warn(
            f"{owner}: no candidate was repaired to within max_acc_drop={max_acc_drop} of the clean"
            f" accuracy {self.reference_acc:.3f} (the smallest tried, {first[self.key]}, reached"
            f" {first['repaired_acc']:.3f}); using it, which may leave a backdoor in place. A larger clean set, more"
            " fine-tuning epochs (`calibration_epochs`) or a larger `max_acc_drop` let the calibration go further."
        )


def log_calibration(trainer: pl.Trainer, key: str, rows: Sequence[dict[str, Any]]) -> None:
    """Log a report's calibration rows as a table (W&B table, TensorBoard text; nothing for other loggers)."""
    if rows:
        columns = list(rows[0])
        log_table(trainer, key, columns, [[row[c] for c in columns] for row in rows])


@dataclass
class Edit:
    """One candidate of a calibration: what it does to a probe (a copy of the model).

    Attributes:
        value: the candidate (a neuron ratio, a mask threshold).
        size: how many neurons or channels it edits (candidates of equal size are the same edit: tried once).
        apply: edits a probe in place before its fine-tuning.
        hold: re-applied after every optimizer step of the probe (e.g. pruned channels held at zero); None: nothing.
    """

    value: float
    size: int
    apply: Callable[[nn.Module], Any]
    hold: Callable[[nn.Module], Any] | None = None


def check_calibration_arguments(
    candidates: Sequence[float], max_acc_drop: float, folds: int, epochs: int | None, what: str, zero_ok: bool
) -> tuple[float, ...]:
    """Validate a callback's ``"auto"`` arguments at construction (before any expensive phase); returns the
    candidates as floats. ``what`` names them in the error (``"ratios"``, ``"thresholds"``); ``zero_ok``: 0 is a valid
    candidate (a threshold) or not (a ratio)."""
    values = list(candidates)
    low_ok = (lambda c: c >= 0.0) if zero_ok else (lambda c: c > 0.0)
    if not values or any(
        isinstance(c, bool) or not isinstance(c, (int, float)) or not (low_ok(c) and c <= 1.0) for c in values
    ):
        interval = "[0, 1]" if zero_ok else "(0, 1]"
        raise ValueError(f"`calibration_candidates` must be {what} in {interval}, got {candidates!r}.")
    if not 0.0 <= max_acc_drop <= 1.0:
        raise ValueError(f"`max_acc_drop` must be in [0, 1], got {max_acc_drop}.")
    check_int("calibration_folds", folds, minimum=2)
    check_int("calibration_epochs", epochs, allow_none=True)
    return tuple(float(c) for c in values)


def clean_folds(loader: DataLoader, folds: int, seed: int = 0) -> list[tuple[DataLoader, DataLoader]]:
    """``folds`` (train, held-out) loader pairs over ``loader``'s samples: a seeded permutation split into ``folds``
    disjoint held-out parts, each trained on the rest. The loaders keep ``loader``'s batch size and collate function;
    the training loaders shuffle with a seeded generator.

    Raises:
        ValueError: when ``loader`` is not a ``DataLoader`` over a map-style dataset with a batch size, or has fewer
            samples than ``folds``.
    """
    if folds < 2:
        raise ValueError(f"`folds` must be >= 2 (cross-validation holds one fold out), got {folds}.")
    dataset = getattr(loader, "dataset", None)
    batch_size = loader_batch_size(loader)
    if batch_size is None or not hasattr(dataset, "__len__"):
        raise ValueError(
            "an 'auto' calibration (TSBD's neuron_ratio, RNP's threshold) holds clean samples out to score each"
            " candidate, so it needs the clean data as a DataLoader over a map-style dataset (with __len__ and"
            f" __getitem__) and a batch_size; got {type(loader).__name__}. Pass such a `dataloader=`, or a number."
        )
    n = len(dataset)  # type: ignore[arg-type]
    if n < folds:
        raise ValueError(f"an 'auto' calibration needs at least `folds`={folds} clean samples, got {n}.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    pairs = []
    for k in range(folds):
        held = torch.zeros(n, dtype=torch.bool)
        held[perm[k::folds]] = True
        train_idx, held_idx = (~held).nonzero().flatten().tolist(), held.nonzero().flatten().tolist()
        generator = torch.Generator().manual_seed(seed + 1 + k)
        common = {"batch_size": batch_size, "collate_fn": loader.collate_fn}
        train = DataLoader(Subset(dataset, train_idx), shuffle=True, generator=generator, **common)  # type: ignore[arg-type]
        pairs.append((train, DataLoader(Subset(dataset, held_idx), shuffle=False, **common)))  # type: ignore[arg-type]
    return pairs


@torch.no_grad()
def prediction_counts(
    model: nn.Module, loader: Iterable[Any], context: ContextFactory = contextlib.nullcontext
) -> tuple[int, int, Tensor]:
    """Eval-mode ``(correct, total, per-class prediction counts)`` over ``loader``'s ``(inputs, labels)`` batches,
    forward passes under ``context()``; the counts are empty for an empty loader."""
    correct, total, counts = 0, 0, torch.zeros(0, dtype=torch.long)
    with eval_mode(model):
        for batch in loader:
            x, y = inputs_and_labels(batch)
            with context():
                logits = model_logits(model, x)
            pred = logits.argmax(-1).cpu().flatten()
            correct += int((pred == y.cpu().flatten()).sum())
            total += int(y.numel())
            counts = counts if counts.numel() else torch.zeros(logits.shape[-1], dtype=torch.long)
            counts += torch.bincount(pred, minlength=counts.numel())
    return correct, total, counts


def _correct(model: nn.Module, loader: Iterable[Any], context: ContextFactory) -> tuple[int, int]:
    correct, total, _ = prediction_counts(model, loader, context)
    return correct, total


def repaired_counts(
    model: nn.Module,
    edit: Edit,
    folds: Sequence[tuple[DataLoader, DataLoader]],
    epochs: int,
    optimizer: OptimizerFactory = _sgd,
    context: ContextFactory = contextlib.nullcontext,
) -> tuple[int, int]:
    """Held-out ``(correct, total)`` predictions, pooled over ``folds``, of copies of ``model`` edited by ``edit`` and
    then fine-tuned on each fold's training part for ``epochs`` epochs (0: scored as edited); ``model`` itself is left
    untouched."""
    correct, total = 0, 0
    for train, held_out in folds:
        probe = working_copy(model)
        edit.apply(probe)
        opt = optimizer(probe.parameters())
        with torch.enable_grad(), torch.inference_mode(False):
            probe.train()
            for _ in range(epochs):
                for batch in train:
                    with context():
                        loss, _, _ = model_loss(probe, batch)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if edit.hold is not None:
                        edit.hold(probe)
        c, t = _correct(probe, held_out, context)
        correct, total = correct + c, total + t
        del probe, opt
    return correct, total


def _counts(group: OfflineGroup, device: torch.device, count: Callable[[], tuple[int, int]]) -> tuple[int, int]:
    """``count()`` in this process, summed over ``group``'s ranks (an error on any rank is raised on every rank)."""
    failed: BaseException | None = None
    local = (0, 0)
    try:
        local = count()
    except Exception as error:  # raised by group.sum, on every rank
        failed = error
    summed = group.sum(torch.tensor([float(local[0]), float(local[1])], dtype=torch.float64, device=device), failed)
    return int(summed[0]), int(summed[1])


def scan_candidates(
    model: nn.Module,
    loader: DataLoader,
    edits: Sequence[Edit],
    max_acc_drop: float = 0.05,
    folds: int = 5,
    epochs: int = 20,
    optimizer: OptimizerFactory = _sgd,
    context: ContextFactory = contextlib.nullcontext,
    seed: int = 0,
    phase: OfflinePhase | None = None,
    group: OfflineGroup | None = None,
    key: str = "ratio",
    size_key: str = "neurons",
) -> Calibration:
    """The calibration rule on any family of edits: ``edits`` in increasing order (equal sizes tried once, an edit of
    size 0 never), each scored by repair probes on held-out folds (:func:`repaired_counts`); the largest within
    ``max_acc_drop`` of the original accuracy before the first miss, else the smallest (``"none_within_budget"``).
    See :func:`calibrate_neuron_ratio` for the arguments; ``key``/``size_key`` name the row entries."""
    if not 0.0 <= max_acc_drop <= 1.0:
        raise ValueError(f"`max_acc_drop` must be in [0, 1], got {max_acc_drop}.")
    if epochs < 0:
        raise ValueError(f"`epochs` must be >= 0, got {epochs}.")
    if not edits:
        raise ValueError("no candidate to calibrate on.")
    group = group if group is not None else OfflineGroup(None)
    # every rank splits the same way (same seed) and runs its share of the folds
    pairs = clean_folds(loader, folds, seed)[group.rank :: group.world_size]
    device = next(iter(model.parameters())).device
    counts = _counts(group, device, lambda: _correct(model, (b for _, held in pairs for b in held), context))
    reference = counts[0] / max(counts[1], 1)
    # edits of the same size are the same edit (the same top neurons or channels): try each once
    by_size: dict[int, Edit] = {}
    for edit in sorted(edits, key=lambda e: e.value):
        by_size.setdefault(edit.size, edit)
    tried = [e for size, e in sorted(by_size.items()) if size > 0] or [max(edits, key=lambda e: e.value)]
    rows: list[dict[str, Any]] = []
    steps = iter(phase) if phase is not None else None
    try:
        for edit in tried:
            probes = functools.partial(repaired_counts, model, edit, pairs, epochs, optimizer, context)
            correct, total = _counts(group, device, probes)
            acc = correct / max(total, 1)
            row = {
                key: edit.value,
                size_key: edit.size,
                "repaired_acc": acc,
                "drop": reference - acc,
                "within_budget": acc >= reference - max_acc_drop,
            }
            rows.append(row)
            if steps is not None and phase is not None:
                phase.log(next(steps, len(rows)), **{key: edit.value}, repaired_acc=acc, reference_acc=reference)
            if not row["within_budget"]:
                break
    finally:
        if phase is not None:
            phase.close()
    passed = [row[key] for row in rows if row["within_budget"]]
    if passed:
        return Calibration(passed[-1], "largest_within_budget", reference, rows, key, size_key)
    return Calibration(tried[0].value, "none_within_budget", reference, rows, key, size_key)


def calibrate_neuron_ratio(
    model: nn.Module,
    changes: dict[str, Tensor],
    loader: DataLoader,
    layers_of: Callable[[nn.Module], Sequence[NeuronLayer]],
    subweight_ratio: float = 0.7,
    candidates: Sequence[float] = DEFAULT_CANDIDATES,
    max_acc_drop: float = 0.05,
    folds: int = 5,
    epochs: int = 20,
    optimizer: OptimizerFactory = _sgd,
    context: ContextFactory = contextlib.nullcontext,
    seed: int = 0,
    phase: OfflinePhase | None = None,
    group: OfflineGroup | None = None,
) -> Calibration:
    """Choose TSBD's neuron ratio from clean data only: the largest candidate whose zeroing a short fine-tuning repairs
    to within ``max_acc_drop`` of the original clean accuracy (held-out folds; see the module docstring).

    Args:
        model: the original (backdoored) model; untouched.
        changes: its neuron-weight changes under clean unlearning
            (:func:`~lightning_ft.backdoor.functional.neuron_weight_changes`).
        loader: the clean data (a ``DataLoader`` over a map-style dataset).
        layers_of: the neuron layers of a model (the ones ``changes`` was computed on, found again on a copy).
        subweight_ratio: stage 1's share of the selected neurons' weights zeroed.
        candidates: neuron ratios to try, in (0, 1]; scanned in increasing order.
        max_acc_drop: the accuracy budget, in [0, 1].
        folds: cross-validation folds (>= 2).
        epochs: fine-tuning epochs of each repair probe.
        optimizer: builds the probes' optimizer from their parameters (default ``SGD(lr=0.01, momentum=0.9)``).
        context: the forward context of the probes (e.g. autocast).
        seed: seeds the folds and the probes' shuffling.
        phase: an :class:`~lightning_ft._internal.offline.OfflinePhase` to report progress on (one step per
            candidate); None: silent.
        group: shares the probes out over ranks (:class:`~lightning_ft._internal.distributed.OfflineGroup`): rank
            ``r`` runs folds ``r, r + W, ...`` and the held-out counts are summed, so every rank reaches the same
            choice; None: every fold in this process.

    Example::

        changes = neuron_weight_changes(model, unlearned, layers)
        result = calibrate_neuron_ratio(model, changes, clean_loader, lambda m: find_neuron_layers(m))
        masks, _ = select_reinit_weights(changes, result.ratio, 0.7)
    """
    ratios = sorted({float(c) for c in candidates})
    if not ratios or any(not 0.0 < c <= 1.0 for c in ratios):
        raise ValueError(f"`candidates` must be a non-empty sequence of ratios in (0, 1], got {list(candidates)!r}.")
    if epochs < 1:
        raise ValueError(f"`epochs` must be >= 1, got {epochs}.")
    n_neurons = sum(int(c.shape[0]) for c in changes.values())

    def edit(ratio: float) -> Edit:
        masks, _ = select_reinit_weights(changes, ratio, subweight_ratio)
        return Edit(ratio, int(n_neurons * ratio), lambda probe: zero_reinit_(layers_of(probe), masks))

    return scan_candidates(
        model, loader, [edit(r) for r in ratios], max_acc_drop, folds, epochs, optimizer, context, seed, phase, group
    )
