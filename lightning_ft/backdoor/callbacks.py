"""Lightning callbacks of the backdoor family: TSBD stage 1 (neuron-weight-change zero reinitialisation)."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_ft._internal.batches import clean_loader, inputs_and_labels
from lightning_ft._internal.logging import log_histogram, log_scalars
from lightning_ft._internal.modules import eval_mode
from lightning_ft._internal.neurons import LAYER_TYPES, find_neuron_layers
from lightning_ft._internal.validation import check_int
from lightning_ft.backdoor.functional import neuron_weight_changes, select_reinit_weights, zero_reinit_

__all__ = ["NeuronWeightChangeReinit", "clean_unlearning"]


@torch.no_grad()
def _accuracy_and_classes(model: nn.Module, loader: Iterable[Any], device: torch.device) -> tuple[float, int]:
    """Eval-mode accuracy over ``loader`` and the number of distinct predicted classes."""
    correct, total, seen = 0, 0, torch.zeros(0, dtype=torch.long)
    with eval_mode(model):
        for batch in loader:
            x, y = inputs_and_labels(batch)
            pred = model(x.to(device)).argmax(-1).cpu()
            correct += int((pred == y.cpu()).sum())
            total += int(y.numel())
            seen = torch.unique(torch.cat([seen, pred]))
    if total == 0:
        raise ValueError("the clean data loader is empty: TSBD's clean unlearning needs clean samples.")
    return correct / total, int(seen.numel())


def clean_unlearning(
    model: nn.Module,
    loader: Iterable[Any],
    lr: float = 1e-4,
    momentum: float = 0.9,
    max_epochs: int = 200,
    stop_acc: float = 0.10,
    stop_on_single_class: bool = True,
    progress: bool = False,
) -> tuple[int, str]:
    """TSBD's clean unlearning, in place on ``model`` (pass a copy): gradient *ascent* on cross-entropy over clean
    data with SGD until eval-mode clean accuracy <= ``stop_acc``, all predictions collapse to one class, or
    ``max_epochs``. Returns ``(epochs run, rule that stopped: "accuracy" | "single_class" | "max_epochs")``.
    """
    device = next(model.parameters()).device
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    epochs: Iterable[int] = range(1, max_epochs + 1)
    if progress:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc="TSBD clean unlearning", unit="epoch", leave=False)
    for epoch in epochs:
        model.train()
        for batch in loader:
            x, y = inputs_and_labels(batch)
            loss = -nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        acc, n_classes = _accuracy_and_classes(model, loader, device)
        if acc <= stop_acc:
            return epoch, "accuracy"
        if stop_on_single_class and n_classes == 1:
            return epoch, "single_class"
    return max_epochs, "max_epochs"


class NeuronWeightChangeReinit(Callback):
    """TSBD stage 1: find the neurons that clean unlearning moves most and zero their largest-change weights.

    At the start of training, a copy of the model is *unlearned* on clean data (gradient ascent on cross-entropy
    until clean accuracy falls to ``unlearn_stop_acc``). Backdoor neurons change most under clean unlearning (their
    weight changes correlate with those of poison unlearning, Lin et al. 2024), so the ``neuron_ratio`` neurons with
    the largest weight change (raw L1 over each output channel's weights, ranked over all layers) are selected, and
    among their weights those whose change is in the top ``subweight_ratio`` (pooled threshold) are set to zero in
    the original model. Zeroed weights stay trainable: stage 2 (activeness-aware fine-tuning) repairs clean accuracy.

    The user's weights are only touched after unlearning and selection succeeded. Under DDP, rank 0 unlearns on the
    whole clean set and broadcasts the selection, so all ranks zero the same weights. The callback state records that
    stage 1 ran, so a resumed fit does not run it again.

    Args:
        neuron_ratio: share of neurons selected, in (0, 1] (the official code sweeps it; 0.2 worked on digits).
        subweight_ratio: share of the selected neurons' weights zeroed, in (0, 1] (official: 0.7).
        lr_unlearn: SGD learning rate of the unlearning (official: 1e-4; small clean sets may need 1e-3).
        momentum: SGD momentum of the unlearning.
        max_unlearn_epochs: cap on unlearning epochs (the official loop caps at 1000 and can hang there).
        unlearn_stop_acc: stop when eval-mode clean accuracy is at or below this, in [0, 1] (official: 0.10).
        stop_on_single_class: also stop when every clean prediction is one class (the collapse that makes the
            accuracy rule never fire on small clean sets).
        layer_types: neuron layers, subset of ``("conv", "linear", "hf_conv1d")`` (official: convs only).
        include: regexes a layer name must match (empty: all).
        exclude: regexes of layer names to skip (official: shortcut convs).
        dataloader: the clean data (``(x, y)`` batches); default: the fit's training data, read without a
            distributed sampler.
        progress_bar: a progress bar over unlearning epochs on rank 0.

    Example::

        trainer = Trainer(callbacks=[NeuronWeightChangeReinit(neuron_ratio=0.2, lr_unlearn=1e-3)], max_epochs=20)
        trainer.fit(classifier, clean_datamodule)

    Reference: Lin et al., "Unveiling and Mitigating Backdoor Vulnerabilities based on Unlearning Weight Changes and
    Backdoor Activeness", NeurIPS 2024, arXiv:2405.20291.
    """

    def __init__(
        self,
        neuron_ratio: float = 0.2,
        subweight_ratio: float = 0.7,
        lr_unlearn: float = 1e-4,
        momentum: float = 0.9,
        max_unlearn_epochs: int = 200,
        unlearn_stop_acc: float = 0.10,
        stop_on_single_class: bool = True,
        layer_types: Sequence[str] = ("conv",),
        include: Sequence[str] = (),
        exclude: Sequence[str] = ("shortcut", "downsample"),
        dataloader: DataLoader | None = None,
        progress_bar: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("neuron_ratio", neuron_ratio), ("subweight_ratio", subweight_ratio)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ValueError(f"`{name}` must be in (0, 1], got {value!r}.")
        if not 0.0 <= unlearn_stop_acc <= 1.0:
            raise ValueError(f"`unlearn_stop_acc` must be in [0, 1], got {unlearn_stop_acc}.")
        if not lr_unlearn > 0:
            raise ValueError(f"`lr_unlearn` must be > 0, got {lr_unlearn}.")
        check_int("max_unlearn_epochs", max_unlearn_epochs)
        if not layer_types or set(layer_types) - set(LAYER_TYPES):
            raise ValueError(f"`layer_types` must be a non-empty subset of {LAYER_TYPES}, got {tuple(layer_types)!r}.")
        self.neuron_ratio, self.subweight_ratio = float(neuron_ratio), float(subweight_ratio)
        self.lr_unlearn, self.momentum = lr_unlearn, momentum
        self.max_unlearn_epochs, self.unlearn_stop_acc = max_unlearn_epochs, unlearn_stop_acc
        self.stop_on_single_class = stop_on_single_class
        self.layer_types, self.include, self.exclude = tuple(layer_types), tuple(include), tuple(exclude)
        self.dataloader = dataloader
        self.progress_bar = progress_bar
        self.done = False
        self.report: dict[str, Any] = {}
        self.seconds: float | None = None  # wall time of stage 1 in this process (not checkpointed)
        self.nwc: Tensor | None = None  # every neuron's weight change, in layer order (not checkpointed)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(neuron_ratio=self.neuron_ratio, subweight_ratio=self.subweight_ratio)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # fail before training on a model without eligible layers
            find_neuron_layers(pl_module, self.layer_types, self.include, self.exclude)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_train_start rather than on_fit_start: the fit's training dataloader exists from here on
        if self.done:
            return  # resumed after stage 1: never run it twice
        start = time.perf_counter()
        layers = find_neuron_layers(pl_module, self.layer_types, self.include, self.exclude)
        payload: dict[str, Any] | None = None
        if trainer.is_global_zero:
            payload = self._select(clean_loader(trainer, self.dataloader, type(self).__name__), pl_module, layers)
        payload = trainer.strategy.broadcast(payload, src=0)
        assert payload is not None
        masks = {k: v.to(pl_module.device) for k, v in payload["masks"].items()}
        zeroed = zero_reinit_(layers, masks)
        self.done = True
        self.report = {**payload["report"], "zeroed_weights": zeroed}
        self.seconds = time.perf_counter() - start
        metrics = {f"backdoor/nwc_{k}": float(v) for k, v in self.report.items() if isinstance(v, (int, float))}
        metrics["backdoor/nwc_seconds"] = self.seconds
        log_scalars(trainer, metrics)
        if payload.get("nwc") is not None:
            self.nwc = payload["nwc"]
            log_histogram(trainer, "backdoor/nwc", payload["nwc"])
        rank_zero_info(f"NeuronWeightChangeReinit: {self.report}")

    def apply(self, model: nn.Module, dataloader: Iterable[Any]) -> dict[str, Any]:
        """Stage 1 on ``model`` in this process, without a Trainer (no fine-tuning afterwards); returns the report.

        The same unlearning, selection and in-place zeroing as in a fit, e.g. to inspect stage 1 alone.
        """
        layers = find_neuron_layers(model, self.layer_types, self.include, self.exclude)
        payload = self._select(dataloader, model, layers)
        self.report = {**payload["report"], "zeroed_weights": zero_reinit_(layers, payload["masks"])}
        self.nwc = payload["nwc"]
        return dict(self.report)

    def _select(self, loader: Iterable[Any], pl_module: nn.Module, layers: list) -> dict[str, Any]:
        unlearned = copy.deepcopy(pl_module)  # the user's model is untouched until the selection succeeded
        with torch.enable_grad(), torch.inference_mode(False):
            epochs, rule = clean_unlearning(
                unlearned,
                loader,
                lr=self.lr_unlearn,
                momentum=self.momentum,
                max_epochs=self.max_unlearn_epochs,
                stop_acc=self.unlearn_stop_acc,
                stop_on_single_class=self.stop_on_single_class,
                progress=self.progress_bar,
            )
        changes = neuron_weight_changes(pl_module, unlearned, layers)
        masks, selected = select_reinit_weights(changes, self.neuron_ratio, self.subweight_ratio)
        nwc = torch.cat([c.sum(1) for c in changes.values()]).cpu()
        report = {
            "unlearn_epochs": epochs,
            "stop_rule": rule,
            "neurons": int(nwc.numel()),
            "selected_neurons": int(sum(int(s.sum()) for s in selected.values())),
        }
        del unlearned
        return {"masks": {k: v.cpu() for k, v in masks.items()}, "report": report, "nwc": nwc}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "report": dict(self.report)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = state_dict.get("done", False)
        self.report = dict(state_dict.get("report", {}))
