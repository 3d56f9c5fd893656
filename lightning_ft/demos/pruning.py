"""Demo: learned channel masks (LearnedMaskPruning) against Lightning's ModelPruning at the same channel sparsity.

A digits classifier (16x16, a BN-CNN conv 32-64-128 or timm's ``test_resnet``) is trained dense with Adam, then
fine-tuned a few more epochs while pruning the same channels to the same sparsity, by

* ``model_pruning``: Lightning's ``ModelPruning`` (L1 structured on the convs, one shot after the first epoch);
* ``model_pruning_gradual``: the same with the amount rising after each epoch up to the learned masks' schedule end;
* ``learned``: :class:`~lightning_ft.pruning.LearnedMaskPruning` (sigmoid gates on the BatchNorms);
* ``learned_hc``: the same with HardConcrete gates;

and the pruned model is exported (channels physically removed): parameters, FLOPs and test accuracy per method.

Run: ``lightning-ft demo pruning [--fast]``.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from lightning_ft._internal.modules import eval_mode
from lightning_ft.demos._common import cpu_trainer, prepare_demo_process
from lightning_ft.demos.digits import DigitsDataModule
from lightning_ft.demos.vision import ImageClassifier
from lightning_ft.pruning import LearnedMaskPruning, count_parameters, export
from lightning_ft.pruning.export import find_chains
from lightning_ft.pruning.schedule import cubic_sparsity

__all__ = ["METHODS", "PruningDemoConfig", "finetune", "main", "pretrain", "prunable_layers"]

METHODS = ("dense", "model_pruning", "model_pruning_gradual", "learned", "learned_hc")
# the BatchNorms whose channels both methods prune (ModelPruning prunes the conv before each): every channel whose
# removal the graph allows, i.e. not those feeding a residual sum
GATED = {
    "bn_cnn": (r"^model\.features\.(1|4|8)$",),
    "test_resnet": (r"^model\.conv1\.(1|4)$", r"^model\.layer\d\.0\.bn1$", r"^model\.layer3\.0\.bn2$"),
}
EXTRA_CHAINS = {"bn_cnn": [("features.7", "features.8", "fc")], "test_resnet": []}


@dataclass
class PruningDemoConfig:
    """Settings of the pruning demo (defaults: the benchmark's)."""

    arch: str = "bn_cnn"
    width: int = 32
    image_size: int = 16
    seed: int = 0
    pretrain_epochs: int = 15
    finetune_epochs: int = 5
    sparsity: float = 0.5
    lr: float = 1e-3
    batch_size: int = 64
    schedule_end: float = 0.6  # learned masks reach the target at 60% of fine-tuning; the gradual baseline too


def _module(config: PruningDemoConfig) -> ImageClassifier:
    return ImageClassifier(
        arch=config.arch, width=config.width, lr=config.lr, optimizer="adam", seed=config.seed, momentum=0.0
    )


def _data(config: PruningDemoConfig) -> DigitsDataModule:
    return DigitsDataModule(image_size=config.image_size, batch_size=config.batch_size, seed=0)


def pretrain(config: PruningDemoConfig) -> dict[str, torch.Tensor]:
    """Train the dense model; returns its state dict."""
    pl.seed_everything(config.seed, verbose=False)
    module = _module(config)
    cpu_trainer(config.pretrain_epochs).fit(module, _data(config))
    return copy.deepcopy(module.state_dict())


def prunable_layers(module: nn.Module, arch: str) -> list[tuple[str, str]]:
    """``(conv, batchnorm)`` names of the channels both methods prune."""
    patterns = [re.compile(p) for p in GATED[arch]]
    chains = [(c.producer, c.bn) for c in find_chains(module)] + [(a, b) for a, b, _ in _extra_chains(arch)]
    return sorted({(conv, bn) for conv, bn in chains if bn and any(p.search(bn) for p in patterns)})


def _extra_chains(arch: str) -> list[tuple[str, str, str]]:
    return [(f"model.{a}", f"model.{b}", f"model.{c}") for a, b, c in EXTRA_CHAINS[arch]]


@torch.no_grad()
def accuracy(module: nn.Module, loader: Any) -> float:
    """Eval-mode accuracy over ``(x, y)`` batches; each submodule's mode is restored (Lightning keeps a module's eval
    mode through a later fit())."""
    correct = total = 0
    with eval_mode(module):
        for x, y in loader:
            correct += int((module(x).argmax(-1) == y).sum())
            total += int(y.numel())
    return correct / total


def _gradual_amounts(config: PruningDemoConfig) -> list[float]:
    """Per-epoch ModelPruning amounts (share of the *remaining* channels) that follow the cubic schedule, sampled at
    epoch ends, up to the schedule end."""
    epochs = config.finetune_epochs
    last = max(0, min(epochs - 1, round(config.schedule_end * epochs) - 1))
    cumulative = [cubic_sparsity(e + 1, last + 1, config.sparsity, start=0.0, end=1.0) for e in range(last + 1)]
    amounts, kept = [], 1.0
    for target in cumulative:
        amounts.append(max(0.0, 1.0 - (1.0 - target) / kept))
        kept = 1.0 - target
    return amounts + [0.0] * (epochs - len(amounts))


def finetune(config: PruningDemoConfig, state: dict[str, torch.Tensor], method: str) -> dict[str, Any]:
    """Fine-tune from ``state`` with ``method``; returns test accuracy, export report and timings."""
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    pl.seed_everything(config.seed + 1, verbose=False)
    module = _module(config)
    module.load_state_dict(state)
    layers = prunable_layers(module, config.arch)
    modules = dict(module.named_modules())
    callbacks: list[pl.Callback] = []
    if method.startswith("model_pruning"):
        amounts = _gradual_amounts(config) if method == "model_pruning_gradual" else None
        callbacks.append(
            ModelPruning(
                "ln_structured",
                parameters_to_prune=[(modules[conv], "weight") for conv, _ in layers],
                amount=(lambda epoch: amounts[epoch]) if amounts else config.sparsity,
                apply_pruning=True if amounts else (lambda epoch: epoch == 0),
                use_global_unstructured=False,
                pruning_norm=1,
                pruning_dim=0,
                make_pruning_permanent=True,
                verbose=0,
            )
        )
    elif method.startswith("learned"):
        callbacks.append(
            LearnedMaskPruning(
                sparsity=config.sparsity,
                gate_type="hard_concrete" if method == "learned_hc" else "sigmoid",
                include=[f"^{bn}$".replace(".", r"\.") for _, bn in layers],
                schedule_start=0.0,
                schedule_end=config.schedule_end,
            )
        )
    data = _data(config)
    start = time.perf_counter()
    cpu_trainer(config.finetune_epochs, callbacks=callbacks).fit(module, data)
    seconds = time.perf_counter() - start
    data.setup("test")
    test = data.test_dataloader()
    result: dict[str, Any] = {"method": method, "acc": accuracy(module, test), "seconds": seconds}
    if method.startswith("learned"):
        example = torch.zeros(1, 1, config.image_size, config.image_size)
        small, report = export(module, example_input=example, chains=_extra_chains(config.arch))
        result["export"] = report.to_dict()
        result["exported_acc"] = accuracy(small, test)
    result["params"] = count_parameters(module)
    return result


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | test acc | exported params | FLOP reduction |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        exp = row.get("export")
        params = f"{exp['params_after']:,} / {exp['params_before']:,}" if exp else ""
        flops = f"{exp['flop_reduction']:.0%}" if exp and exp["flop_reduction"] is not None else ""
        lines.append(f"| {row['method']} | {row['acc']:.3f} | {params} | {flops} |")
    return "\n".join(lines)


def main(fast: bool = False, json_path: str | None = None) -> list[dict[str, Any]]:
    """Pretrain once, then fine-tune with each method at 50% channel sparsity; print the table."""
    prepare_demo_process()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    config = PruningDemoConfig(pretrain_epochs=6 if fast else 15, finetune_epochs=3 if fast else 5)
    if fast:
        config.width = 16
    state = pretrain(config)
    rows = [finetune(config, state, method) for method in METHODS]
    print(f"digits 16x16, BN-CNN width {config.width}, {config.sparsity:.0%} of the conv channels pruned")
    print(format_table(rows))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"config": asdict(config), "rows": rows}, f, indent=2)
    return rows
