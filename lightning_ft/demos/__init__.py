"""Demo data, tiny models and end-to-end recipes behind ``lightning-ft demo <name>``.

``DEMOS`` maps each demo name to ``(one-line description, "module:function")``; the function accepts
``fast: bool`` (a shorter smoke-test run) and prints a before/after table.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["DEMOS", "load_demo"]

DEMOS: dict[str, tuple[str, str]] = {
    "backdoor": (
        "backdoor a digits CNN (BadNets), then vanilla fine-tuning vs TSBD stage 1 / penalty / clip on 5% clean data",
        "lightning_ft.demos.backdoor:main",
    ),
    "pruning": (
        "prune half the channels of a digits CNN: Lightning's ModelPruning vs learned masks (sigmoid, HardConcrete)",
        "lightning_ft.demos.pruning:main",
    ),
    "rehearsal": (
        "fine-tune a digits MLP on a shifted task: no rehearsal vs FLOW vs random / loss-priority / mix-cd rehearsal",
        "lightning_ft.demos.rehearsal:main",
    ),
    "memorisation": (
        "fine-tune a tiny GPT-2 on pydoc text: plain vs n-gram early stopping vs n-gram regulariser vs Goldfish",
        "lightning_ft.demos.memorisation:main",
    ),
}


def load_demo(name: str) -> Callable[..., Any]:
    """The entry function of demo ``name``; ``KeyError`` lists the available demos."""
    if name not in DEMOS:
        raise KeyError(f"unknown demo {name!r}; available: {', '.join(sorted(DEMOS))}")
    module, func = DEMOS[name][1].split(":")
    return getattr(importlib.import_module(module), func)
