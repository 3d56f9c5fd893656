"""Reference statistics: one no-grad pass of the frozen starting model, per-sample loss and correctness by sample id.

FLOW weights the fine-tuning loss with them, mix-cd bins the rehearsal pool by them, and the memorisation family's
regulariser can reuse the per-token values. Sample ids must be stable across runs and ranks: wrap datasets in
:class:`WithSampleIds` (or give every sample an id of your own).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_ft._internal.batches import inputs_and_labels
from lightning_ft._internal.distributed import all_gather_rows
from lightning_ft._internal.forward import model_logits
from lightning_ft._internal.modules import eval_mode
from lightning_ft._internal.offline import forward_context, show_progress
from lightning_ft.rehearsal.functional import causal_lm_correct, sequence_nll

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["ReferenceStatistics", "WithSampleIds", "batch_sample_ids"]

Task = Literal["classification", "causal_lm"]


class WithSampleIds(Dataset):
    """A dataset whose samples carry a stable integer id ``offset + index``.

    Mapping samples get an extra ``key`` entry; tuple/list samples get the id appended as their last element; any
    other sample becomes ``(sample, id)``. Give the pool an ``offset`` past the fine-tuning set's ids so the two never
    collide.

    Example::

        finetune = WithSampleIds(task_b)                      # ids 0 .. len(task_b) - 1
        pool = WithSampleIds(task_a, offset=len(task_b))      # ids after them
    """

    def __init__(self, dataset: Dataset, offset: int = 0, key: str = "sample_id") -> None:
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"`offset` must be an integer >= 0, got {offset!r}.")
        self.dataset, self.offset, self.key = dataset, offset, key

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        sample = self.dataset[index]
        sample_id = self.offset + int(index)
        if isinstance(sample, Mapping):
            return {**sample, self.key: sample_id}
        if isinstance(sample, (tuple, list)):
            return (*sample, sample_id)
        return sample, sample_id


def batch_sample_ids(batch: Any, key: str = "sample_id") -> Tensor:
    """The sample ids of a collated batch: ``batch[key]`` for mappings, the last element for tuples/lists."""
    if isinstance(batch, Mapping):
        if key not in batch:
            raise ValueError(
                f"the batch has no {key!r} entry (keys: {sorted(batch)}); wrap the dataset in WithSampleIds or add"
                " stable integer sample ids under that key."
            )
        ids = batch[key]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        ids = batch[-1]
    else:
        raise ValueError(
            f"cannot find sample ids in a {type(batch).__name__} batch: use (inputs, labels, ids) tuples or mappings"
            f" with a {key!r} entry (WithSampleIds adds them)."
        )
    ids = torch.as_tensor(ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() != 1:
        raise ValueError(f"sample ids must be a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}.")
    return ids.long()


@dataclass
class ReferenceStatistics:
    """Per-sample statistics of the frozen starting model, sorted by sample id.

    Attributes:
        sample_ids: ``(N,)`` int64, unique, ascending.
        loss: ``(N,)`` float32 reference loss (cross-entropy, or mean NLL over supervised next tokens).
        correct: ``(N,)`` bool: the starting model gets the sample right (argmax == label; for causal LMs, greedy
            next-token accuracy over supervised tokens >= ``lm_correct_threshold``).
        token_nll: ``(N, T - 1)`` float32 per-token NLL with NaN at unsupervised positions (causal LMs, when asked
            for); None otherwise.
    """

    sample_ids: Tensor
    loss: Tensor
    correct: Tensor
    token_nll: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.sample_ids.shape[0] if self.sample_ids.dim() == 1 else -1
        if n < 0 or self.loss.shape != (n,) or self.correct.shape != (n,):
            raise ValueError(
                f"sample_ids {tuple(self.sample_ids.shape)}, loss {tuple(self.loss.shape)} and correct"
                f" {tuple(self.correct.shape)} must all be (N,)."
            )
        if self.token_nll is not None and self.token_nll.shape[0] != n:
            raise ValueError(f"token_nll has {self.token_nll.shape[0]} rows for {n} samples.")
        order = torch.argsort(self.sample_ids)
        self.sample_ids = self.sample_ids[order].long().cpu()
        if n > 1 and bool((self.sample_ids[1:] == self.sample_ids[:-1]).any()):
            raise ValueError("sample ids must be unique; give the fine-tuning set and the pool disjoint id ranges.")
        self.loss = self.loss[order].float().cpu()
        self.correct = self.correct[order].bool().cpu()
        if self.token_nll is not None:
            self.token_nll = self.token_nll[order].float().cpu()

    def __len__(self) -> int:
        return int(self.sample_ids.shape[0])

    def positions(self, sample_ids: Tensor) -> Tensor:
        """Row of each id in these statistics (vectorised lookup); ``KeyError`` names ids that are missing."""
        ids = torch.as_tensor(sample_ids).long().cpu()
        pos = torch.searchsorted(self.sample_ids, ids).clamp_max(max(len(self) - 1, 0))
        if len(self) == 0 or not bool((self.sample_ids[pos] == ids).all()):
            missing = ids[self.sample_ids[pos] != ids][:5].tolist() if len(self) else ids[:5].tolist()
            raise KeyError(f"sample ids without reference statistics, e.g. {missing}; compute them on this data set.")
        return pos

    @classmethod
    @torch.no_grad()
    def compute(
        cls,
        model: nn.Module,
        dataloader: Iterable[Any],
        task: Task = "classification",
        id_key: str = "sample_id",
        ignore_index: int = -100,
        store_token_nll: bool = False,
        lm_correct_threshold: float = 0.5,
        correct_fn: Callable[[Tensor, Any], Tensor] | None = None,
        progress: bool | None = None,
        trainer: pl.Trainer | None = None,
        desc: str = "reference statistics",
    ) -> ReferenceStatistics:
        """One no-grad, eval-mode pass of ``model`` over ``dataloader``.

        Batches: ``(inputs, labels, ids)`` tuples or mappings with ``image``/``label``, ``pixel_values``/``labels``
        or ``x``/``y`` and ``id_key`` (classification); mappings with ``input_ids``, optional ``attention_mask`` and
        ``labels`` (default: ``input_ids``) and ``id_key`` (causal LMs). Under ``torch.distributed`` each rank passes
        its own shard (e.g. a ``DistributedSampler`` loader); the results are all-gathered, and repeated ids (the
        sampler's padding) are kept once, so every rank returns the same statistics.

        The forward output may be logits, a mapping with ``"logits"``, an HF ``ModelOutput`` or a tuple starting with
        the logits; mapping inputs are passed as keyword arguments and floating inputs are cast to the model's dtype
        and device (a ``bf16-true`` model gets bf16 inputs). Losses are computed in float32.

        Args:
            model: the frozen starting model (its train/eval flags are restored afterwards).
            dataloader: batches as above.
            task: ``"classification"`` or ``"causal_lm"``.
            id_key: key of the sample ids in mapping batches.
            ignore_index: label value of unsupervised tokens (causal LMs).
            store_token_nll: also keep per-token NLL (FLOW's token level; causal LMs only).
            lm_correct_threshold: a causal-LM sample is "correct" when its greedy next-token accuracy over
                supervised tokens reaches this (reconstruction; mix-cd's predicate for generative tasks is unknown).
            correct_fn: overrides correctness: ``correct_fn(logits, batch) -> (B,) bool``.
            progress: a progress bar over batches; None: when ``trainer`` shows one (rank 0), else none.
            trainer: the fit's Trainer, when the pass runs inside a fit: its precision context (autocast under
                ``bf16-mixed``) wraps the forward passes and its progress-bar setting is followed.
            desc: the progress bar's label.
        """
        if task not in ("classification", "causal_lm"):
            raise ValueError(f'`task` must be "classification" or "causal_lm", got {task!r}.')
        if store_token_nll and task != "causal_lm":
            raise ValueError("`store_token_nll` needs task='causal_lm' (per-token losses of a causal LM).")
        device = next(model.parameters()).device
        ids_, losses, corrects, tokens = [], [], [], []
        batches: Iterable[Any] = dataloader
        if show_progress(trainer, progress):
            from tqdm.auto import tqdm

            batches = tqdm(dataloader, desc=desc, unit="batch", leave=False)
        with eval_mode(model), forward_context(trainer, model)():
            for batch in batches:
                ids_.append(batch_sample_ids(batch, id_key))
                if task == "classification":
                    if isinstance(batch, (tuple, list)) and len(batch) < 3:
                        raise ValueError(
                            "classification batches must be (inputs, labels, ids) tuples or mappings with an id entry."
                        )
                    x, y = inputs_and_labels(batch)
                    logits = model_logits(model, x).float()
                    y = y.to(logits.device)
                    losses.append(nn.functional.cross_entropy(logits, y, reduction="none").cpu())
                    correct = (logits.argmax(-1) == y) if correct_fn is None else correct_fn(logits, batch)
                else:
                    labels = batch.get("labels", batch["input_ids"]).to(device)
                    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
                    logits = model_logits(model, inputs).float()
                    per_sample, token_nll, supervised = sequence_nll(logits, labels, ignore_index)
                    losses.append(per_sample.cpu())
                    if correct_fn is None:
                        correct = causal_lm_correct(logits, labels, lm_correct_threshold, ignore_index)
                    else:
                        correct = correct_fn(logits, batch)
                    if store_token_nll:
                        tokens.append(token_nll.masked_fill(~supervised, float("nan")).cpu())
                corrects.append(torch.as_tensor(correct).bool().cpu())
        if not ids_:
            raise ValueError("the data loader is empty: no reference statistics to compute.")
        sample_ids = all_gather_rows(torch.cat(ids_).to(device)).cpu()
        loss = all_gather_rows(torch.cat(losses).to(device)).cpu()
        correct_all = all_gather_rows(torch.cat(corrects).to(device)).cpu()
        if len({t.shape[1] for t in tokens}) > 1:
            raise ValueError(
                "store_token_nll keeps one row of per-token losses per sample, so every batch must have the same"
                f" sequence length (got {sorted({t.shape[1] + 1 for t in tokens})}): pad to one fixed length in the"
                " collate function, or use sequence-level weights."
            )
        token_nll_all = all_gather_rows(torch.cat(tokens).to(device)).cpu() if tokens else None
        keep = _first_occurrences(sample_ids)
        return cls(
            sample_ids[keep], loss[keep], correct_all[keep], None if token_nll_all is None else token_nll_all[keep]
        )

    def save(self, path: str | Path) -> None:
        """Write the statistics to ``path`` (a ``torch.save`` file of plain tensors)."""
        state = {"sample_ids": self.sample_ids, "loss": self.loss, "correct": self.correct}
        if self.token_nll is not None:
            state["token_nll"] = self.token_nll
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStatistics:
        """Read statistics written by :meth:`save`."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        return cls(state["sample_ids"], state["loss"], state["correct"], state.get("token_nll"))


def _first_occurrences(ids: Tensor) -> Tensor:
    """Indices of the first occurrence of each id (a DistributedSampler pads by repeating samples)."""
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    return order[first]
