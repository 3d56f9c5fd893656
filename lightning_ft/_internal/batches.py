"""Reading inputs and labels out of a classification batch, one convention for every family."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = ["inputs_and_labels"]

_KEY_PAIRS = (("image", "label"), ("pixel_values", "labels"), ("x", "y"))


def inputs_and_labels(batch: Any) -> tuple[Tensor, Tensor]:
    """``(inputs, labels)`` of a batch: the first two elements of a tuple/list, or the ``image``/``label``,
    ``pixel_values``/``labels`` or ``x``/``y`` entries of a mapping."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        for x_key, y_key in _KEY_PAIRS:
            if x_key in batch and y_key in batch:
                return batch[x_key], batch[y_key]
    keys = f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else ""
    raise ValueError(
        "classification batches must be (inputs, labels, ...) tuples or mappings with image/label, pixel_values/labels"
        f" or x/y entries; got a {type(batch).__name__}{keys}."
    )
