"""Probe sets: a fixed sample of training data split into prompt and true continuation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_ft._internal.validation import check_int

__all__ = ["Probe", "build_probe", "sample_tokens"]

Split = Literal["prefix", "labels"]


@dataclass
class Probe:
    """Prompts and true continuations of a probe set.

    Attributes:
        indices: dataset indices of the probe samples, shape ``(N,)``.
        prefixes: one 1-D token-id tensor per sample (equal lengths in ``"prefix"`` mode).
        suffixes: true continuations, shape ``(N, suffix_len)``.
    """

    indices: Tensor
    prefixes: list[Tensor]
    suffixes: Tensor

    def __len__(self) -> int:
        return int(self.indices.numel())

    def prefix_batch(self, rows: Tensor) -> Tensor | list[Tensor]:
        """The prefixes of ``rows``: a ``(n, P)`` tensor when they share a length, else a list."""
        chosen = [self.prefixes[int(i)] for i in rows]
        if chosen and all(p.numel() == chosen[0].numel() for p in chosen):
            return torch.stack(chosen)
        return chosen


def _to_tensor(value: Any, what: str) -> Tensor:
    tensor = value if isinstance(value, Tensor) else torch.as_tensor(value)
    if tensor.dim() != 1 or tensor.is_floating_point():
        raise ValueError(f"{what} must be a 1-D sequence of integer token ids, got shape {tuple(tensor.shape)}.")
    return tensor.long()


def sample_tokens(
    sample: Any, input_key: str = "input_ids", labels_key: str = "labels"
) -> tuple[Tensor, Tensor | None]:
    """Token ids (right padding removed via ``attention_mask``) and labels (if present) of one dataset sample.

    A sample may be a 1-D tensor/list of ids, a tuple/list whose first element is that, or a mapping with
    ``input_key`` (and optionally ``attention_mask`` and ``labels_key``).
    """
    labels = None
    if isinstance(sample, dict):
        if input_key not in sample:
            raise ValueError(
                f"probe sample has no key {input_key!r} (keys: {sorted(sample)}); set `input_key` to the key that"
                " holds the token ids."
            )
        ids = _to_tensor(sample[input_key], f"sample[{input_key!r}]")
        if sample.get(labels_key) is not None:
            labels = _to_tensor(sample[labels_key], f"sample[{labels_key!r}]")
        if sample.get("attention_mask") is not None:  # drop padding (left or right) from ids and aligned labels
            keep = _to_tensor(sample["attention_mask"], "sample['attention_mask']").bool()
            ids = ids[keep]
            if labels is not None and labels.shape == keep.shape:
                labels = labels[keep]
    elif (
        isinstance(sample, (tuple, list))
        and sample
        and (isinstance(sample[0], (list, tuple)) or (isinstance(sample[0], Tensor) and sample[0].dim() >= 1))
    ):  # (ids, ...) pair
        ids = _to_tensor(sample[0], "sample[0]")
    else:
        ids = _to_tensor(sample, "sample")
    return ids, labels


def _split(
    ids: Tensor,
    labels: Tensor | None,
    split: Split,
    prefix_len: int | None,
    suffix_len: int,
    ignore_index: int,
) -> tuple[Tensor, Tensor] | str:
    """(prefix, suffix) or a string saying why the sample is too short."""
    if split == "prefix":
        assert prefix_len is not None
        if ids.numel() < prefix_len + suffix_len:
            return f"has {ids.numel()} tokens, fewer than prefix_len + suffix_len = {prefix_len + suffix_len}"
        return ids[:prefix_len], ids[prefix_len : prefix_len + suffix_len]
    if labels is None:
        return "has no labels; split='labels' needs the instruction-tuning convention (prompt labels = ignore_index)"
    supervised = (labels[: ids.numel()] != ignore_index).nonzero()
    if supervised.numel() == 0:
        return "has no supervised (response) token"
    start = int(supervised[0])
    if start == 0:
        return "has no prompt (the first token is already supervised)"
    if ids.numel() - start < suffix_len:
        return f"has a response of {ids.numel() - start} tokens, fewer than suffix_len = {suffix_len}"
    prompt = ids[:start] if prefix_len is None else ids[max(0, start - prefix_len) : start]
    return prompt, ids[start : start + suffix_len]


def build_probe(
    dataset: Dataset | Sequence[Any],
    probe_size: int,
    prefix_len: int | None,
    suffix_len: int,
    split: Split = "prefix",
    seed: int = 0,
    indices: Sequence[int] | None = None,
    input_key: str = "input_ids",
    labels_key: str = "labels",
    ignore_index: int = -100,
    short_samples: Literal["error", "skip"] = "error",
) -> Probe:
    """Sample ``probe_size`` training samples with a fixed seed and split them into prompt and continuation.

    ``split="prefix"`` (domain adaptation): the first ``prefix_len`` tokens are the prompt, the next ``suffix_len``
    the reference. ``split="labels"`` (instruction tuning): the prompt is everything before the first supervised
    label (the last ``prefix_len`` tokens of it, or all of it when ``prefix_len`` is None) and the reference is the
    first ``suffix_len`` response tokens.

    Args:
        indices: use exactly these dataset indices (e.g. restored from a checkpoint) instead of sampling.
        short_samples: ``"error"`` raises on a sample too short for the split; ``"skip"`` draws another one.
    """
    if split not in ("prefix", "labels"):
        raise ValueError(f'`split` must be "prefix" or "labels", got {split!r}.')
    if short_samples not in ("error", "skip"):
        raise ValueError(f'`short_samples` must be "error" or "skip", got {short_samples!r}.')
    if indices is None:
        check_int("probe_size", probe_size)
    check_int("suffix_len", suffix_len)
    if split == "prefix" and prefix_len is None:
        raise ValueError('`prefix_len` is required with split="prefix"; e.g. prefix_len=32.')
    check_int("prefix_len", prefix_len, allow_none=split == "labels")
    n_data = len(dataset)  # type: ignore[arg-type]
    if n_data == 0:
        raise ValueError("the training dataset is empty: there is nothing to probe for memorisation.")
    order = torch.as_tensor(list(indices), dtype=torch.long) if indices is not None else None
    if order is None:
        order = torch.randperm(n_data, generator=torch.Generator().manual_seed(seed))
        target = min(probe_size, n_data)
    else:
        target = order.numel()
    chosen: list[int] = []
    prefixes: list[Tensor] = []
    suffixes: list[Tensor] = []
    skipped = 0
    for idx in order.tolist():
        ids, labels = sample_tokens(dataset[idx], input_key, labels_key)
        result = _split(ids, labels, split, prefix_len, suffix_len, ignore_index)
        if isinstance(result, str):
            if short_samples == "error" or indices is not None:
                raise ValueError(
                    f"probe sample {idx} {result}. Lower `prefix_len`/`suffix_len`, use longer samples, or set"
                    " short_samples='skip' to probe only samples that are long enough."
                )
            skipped += 1
            continue
        chosen.append(idx)
        prefixes.append(result[0])
        suffixes.append(result[1])
        if len(chosen) == target:
            break
    if not chosen:
        raise ValueError(
            f"none of the {n_data} training samples is long enough for split={split!r} with prefix_len={prefix_len}"
            f" and suffix_len={suffix_len} ({skipped} skipped); lower them or use longer samples."
        )
    if indices is None:  # keep the dataset order for a stable, shardable probe
        perm = sorted(range(len(chosen)), key=chosen.__getitem__)
        chosen, prefixes, suffixes = [chosen[i] for i in perm], [prefixes[i] for i in perm], [suffixes[i] for i in perm]
    return Probe(torch.tensor(chosen, dtype=torch.long), prefixes, torch.stack(suffixes))
