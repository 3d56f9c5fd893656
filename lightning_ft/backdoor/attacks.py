"""Backdoor attacks for evaluating defenses: BadNets and Blended triggers, all-to-one poisoned datasets.

Triggers act on images in ``[0, 1]`` (before any normalisation), as BackdoorBench applies them to raw images.

References:
    Gu et al. "BadNets." 2017 (square patch trigger). Chen et al. "Targeted Backdoor Attacks on Deep Learning
    Systems Using Data Poisoning." 2017 (blended trigger). BackdoorBench (``utils/bd_img_transform/``,
    ``utils/backdoor_generate_poison_index.py``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_ft._internal.validation import check_int

__all__ = ["BadNets", "Blended", "PoisonedDataset", "triggered_test_set"]

Corner = Literal["bottom_right", "bottom_left", "top_right", "top_left"]


class BadNets:
    """Square patch trigger: a ``size`` x ``size`` square of ``value`` in a corner (BackdoorBench: 3x3 white square,
    bottom-right, no margin).

    Example::

        >>> img = torch.zeros(1, 8, 8)
        >>> BadNets(size=2)(img)[0, -2:, -2:].tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """

    def __init__(self, size: int = 3, location: Corner = "bottom_right", value: float = 1.0) -> None:
        check_int("size", size)
        if location not in ("bottom_right", "bottom_left", "top_right", "top_left"):
            raise ValueError(
                f"`location` must be one of bottom_right/bottom_left/top_right/top_left, got {location!r}."
            )
        self.size, self.location, self.value = size, location, value

    def __call__(self, images: Tensor) -> Tensor:
        """Triggered copy of ``images`` of shape ``(C, H, W)`` or ``(B, C, H, W)``."""
        if images.dim() not in (3, 4) or min(images.shape[-2:]) < self.size:
            raise ValueError(
                f"images must be (C, H, W) or (B, C, H, W) with H, W >= {self.size}, got {tuple(images.shape)}."
            )
        out = images.clone()
        rows = slice(-self.size, None) if self.location.startswith("bottom") else slice(0, self.size)
        cols = slice(-self.size, None) if self.location.endswith("right") else slice(0, self.size)
        out[..., rows, cols] = self.value
        return out

    def __repr__(self) -> str:
        return f"BadNets(size={self.size}, location={self.location!r}, value={self.value})"


class Blended:
    """Blended trigger ``x' = (1 - alpha) * x + alpha * T`` (BackdoorBench: alpha 0.2 for training and test).

    Args:
        alpha: blend ratio in (0, 1].
        pattern: the trigger image ``T`` (broadcastable to the images), or None for a uniform-noise pattern drawn
            once per image shape from ``seed`` (BackdoorBench uses a Hello Kitty image, which we cannot ship).
        seed: seed of the random pattern.
    """

    def __init__(self, alpha: float = 0.2, pattern: Tensor | None = None, seed: int = 0) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"`alpha` must be in (0, 1], got {alpha}.")
        self.alpha, self.pattern, self.seed = alpha, pattern, seed
        self._patterns: dict[tuple[int, ...], Tensor] = {}

    def trigger(self, shape: tuple[int, ...]) -> Tensor:
        """The pattern ``T`` for images of shape ``(C, H, W)``."""
        if self.pattern is not None:
            return self.pattern
        if shape not in self._patterns:
            self._patterns[shape] = torch.rand(shape, generator=torch.Generator().manual_seed(self.seed))
        return self._patterns[shape]

    def __call__(self, images: Tensor) -> Tensor:
        if images.dim() not in (3, 4):
            raise ValueError(f"images must be (C, H, W) or (B, C, H, W), got {tuple(images.shape)}.")
        pattern = self.trigger(tuple(images.shape[-3:])).to(images.device, images.dtype)
        return ((1 - self.alpha) * images + self.alpha * pattern).clamp(0.0, 1.0)

    def __repr__(self) -> str:
        pattern = "given" if self.pattern is not None else "random"
        return f"Blended(alpha={self.alpha}, seed={self.seed}, pattern={pattern!r})"


class PoisonedDataset(Dataset):
    """All-to-one poisoning of an ``(image, label)`` dataset.

    ``round(ratio * N)`` indices, drawn uniformly from all samples with ``seed`` (target class included, as in
    BackdoorBench), get the trigger and the ``target`` label. With ``exclude_target=True`` samples of the target
    class are dropped, and with ``relabel=False`` poisoned samples keep their true label: together with ``ratio=1``
    that is the triggered test set of :func:`triggered_test_set`.

    Attributes:
        poison_indices: indices (into this dataset) of the poisoned samples.
    """

    def __init__(
        self,
        dataset: Dataset,
        attack: Any,
        ratio: float = 0.1,
        target: int = 0,
        seed: int = 0,
        exclude_target: bool = False,
        relabel: bool = True,
    ) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"`ratio` (poisoning rate) must be in [0, 1], got {ratio}.")
        if not callable(attack):
            raise TypeError(f"`attack` must be callable on an image tensor (e.g. BadNets()), got {type(attack)}.")
        self.dataset, self.attack, self.target, self.relabel = dataset, attack, int(target), relabel
        labels = [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]
        keep = [i for i, y in enumerate(labels) if not (exclude_target and y == self.target)]
        if not keep:
            raise ValueError("no sample left after excluding the target class.")
        self.indices = torch.tensor(keep, dtype=torch.long)
        self.labels = torch.tensor([labels[i] for i in keep], dtype=torch.long)
        n_poison = round(ratio * len(keep))
        perm = torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))
        self.poison_indices = perm[:n_poison].sort().values
        self._poisoned = torch.zeros(len(keep), dtype=torch.bool)
        self._poisoned[self.poison_indices] = True

    def __len__(self) -> int:
        return int(self.indices.numel())

    def is_poisoned(self, index: int) -> bool:
        return bool(self._poisoned[index])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.dataset[int(self.indices[index])][:2]
        if self._poisoned[index]:
            image = self.attack(image)
            if self.relabel:
                label = self.target
        return image, int(label)


def triggered_test_set(dataset: Dataset, attack: Any, target: int = 0) -> PoisonedDataset:
    """Every non-target sample with the trigger, keeping its true label (ASR: predicted == target; RA: == label)."""
    return PoisonedDataset(dataset, attack, ratio=1.0, target=target, exclude_target=True, relabel=False)
