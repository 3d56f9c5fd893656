"""n-gram-aware memorisation regulariser: a loss module, reference log-prob sources and a LightningModule mixin."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_ft._internal.modules import eval_mode
from lightning_ft._internal.validation import check_int
from lightning_ft.memorisation.functional import ngram_regularizer, token_logprobs, validate_ngram_sizes

if TYPE_CHECKING:
    from lightning_ft.rehearsal.statistics import ReferenceStatistics

__all__ = [
    "NGramRegularizedLM",
    "NGramRegularizer",
    "ReferenceLogProbDataset",
    "compute_reference_logprobs",
]

Reference = Literal["model", "adapter", "cache"]


class NGramRegularizer(nn.Module):
    """Loss term ``weight * R`` that penalises n-grams the model predicts far more confidently than the reference.

    ``R`` is :func:`~lightning_ft.memorisation.functional.ngram_regularizer`: over every n-gram window of supervised
    tokens whose geometric-mean probability exceeds ``gamma``, the hinge of the per-token excess log-likelihood over
    the frozen pre-trained model, ``relu((L_n - L0_n) / n - delta)``. Add it to the causal-LM cross-entropy.

    The paper (Slack & Al Moubayed 2025) describes a penalty for "excessively high confidence to certain n-grams
    compared to the pre-trained model" with a "confidence threshold"; its formula is in an unpublished appendix, so
    this form, and every default, is our reconstruction (see the method card).

    Args:
        ngram_sizes: n-gram window sizes (variant ``"A"``).
        gamma: confidence gate in ``[0, 1)``.
        delta: per-token margin before the penalty starts.
        weight: lambda, the multiplier of ``R`` (``>= 0``).
        variant: ``"A"`` (n-gram windows) or ``"B"`` (token-level hinge).
        ignore_index: label of unsupervised positions.

    Example::

        >>> reg = NGramRegularizer(ngram_sizes=(2,), gamma=0.0, weight=1.0)
        >>> logits = torch.randn(2, 6, 11)
        >>> labels = torch.randint(0, 11, (2, 6))
        >>> reg(logits, labels, ref_logits=logits).item()  # the model equals the reference: no penalty
        0.0
    """

    def __init__(
        self,
        ngram_sizes: Sequence[int] = (4,),
        gamma: float = 0.9,
        delta: float = 0.0,
        weight: float = 0.1,
        variant: Literal["A", "B"] = "A",
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        self.ngram_sizes = validate_ngram_sizes(ngram_sizes, "ngram_sizes")
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"`gamma` (confidence gate) must be in [0, 1), got {gamma}.")
        for name, value in (("weight", weight), ("delta", delta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"`{name}` must be a number >= 0, got {value!r}.")
        if variant not in ("A", "B"):
            raise ValueError(f'`variant` must be "A" or "B", got {variant!r}.')
        self.gamma, self.delta, self.weight, self.variant, self.ignore_index = (
            gamma,
            delta,
            weight,
            variant,
            ignore_index,
        )

    def penalty(self, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
        """Unweighted ``R`` from per-token log-probs (see the functional form)."""
        return ngram_regularizer(logprobs, ref_logprobs, mask, self.ngram_sizes, self.gamma, self.delta, self.variant)

    def forward(
        self,
        logits: Tensor,
        labels: Tensor,
        ref_logits: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
    ) -> Tensor:
        """``weight * R`` for logits ``(B, T, V)`` and Hugging Face-style labels ``(B, T)`` (shifted here).

        Give the reference as full ``ref_logits`` ``(B, T, V)`` or as cached per-token ``ref_logprobs`` ``(B, T - 1)``
        (see :func:`compute_reference_logprobs`).
        """
        logprobs, mask = token_logprobs(logits, labels, self.ignore_index)
        if (ref_logits is None) == (ref_logprobs is None):
            raise ValueError("pass exactly one of `ref_logits` (B, T, V) and `ref_logprobs` (B, T - 1).")
        if ref_logits is not None:
            with torch.no_grad():
                ref_logprobs, _ = token_logprobs(ref_logits.detach(), labels, self.ignore_index)
        assert ref_logprobs is not None
        if ref_logprobs.shape != logprobs.shape:
            raise ValueError(
                f"`ref_logprobs` has shape {tuple(ref_logprobs.shape)}, expected {tuple(logprobs.shape)} (B, T - 1):"
                " the cache must be computed on the same token sequences."
            )
        return self.weight * self.penalty(logprobs, ref_logprobs.detach(), mask)


def _model_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return out if isinstance(out, Tensor) else out.logits


@torch.no_grad()  # not inference_mode: the cache is used later in autograd-enabled code
def compute_reference_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    batch_size: int = 32,
) -> Tensor:
    """Per-token log-probs ``(N, T - 1)`` of the frozen reference ``model`` on a fixed token set (for the cache).

    Valid as long as the reference is frozen and the inputs do not change (no random cropping or masking).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must be (N, T), got {tuple(input_ids.shape)}.")
    check_int("batch_size", batch_size)
    device = next(model.parameters()).device
    with eval_mode(model):
        chunks = []
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            mask = None if attention_mask is None else attention_mask[start : start + batch_size].to(device)
            logp, _ = token_logprobs(_model_logits(model, ids, mask), ids, ignore_index=-(1 << 62))
            chunks.append(logp.float().cpu())
        return torch.cat(chunks)


class ReferenceLogProbDataset(Dataset):
    """Wrap a dataset of mappings and add ``sample[key] = logprobs[i]`` (the cached reference pass)."""

    def __init__(self, dataset: Dataset, logprobs: Tensor, key: str = "ref_logprobs") -> None:
        if len(dataset) != logprobs.shape[0]:  # type: ignore[arg-type]
            raise ValueError(f"dataset has {len(dataset)} samples but `logprobs` has {logprobs.shape[0]} rows.")  # type: ignore[arg-type]
        self.dataset, self.logprobs, self.key = dataset, logprobs, key

    @classmethod
    def from_statistics(
        cls, dataset: Dataset, statistics: ReferenceStatistics, offset: int = 0, key: str = "ref_logprobs"
    ) -> ReferenceLogProbDataset:
        """The cache from the rehearsal family's reference statistics of the same dataset, so token-level FLOW (set
        up by hand) and this regulariser share one pass of the frozen model.

        ``statistics`` must come from ``ReferenceStatistics.compute(model, <loader over WithSampleIds(dataset,
        offset)>, task="causal_lm", store_token_nll=True)``; positions without a supervised label get log-prob 0
        (the regulariser's mask leaves them out).
        """
        if statistics.token_nll is None:
            raise ValueError(
                "the statistics hold no per-token losses: compute them with task='causal_lm', store_token_nll=True."
            )
        positions = statistics.positions(torch.arange(len(dataset)) + offset)  # type: ignore[arg-type]
        return cls(dataset, (-statistics.token_nll[positions]).nan_to_num(0.0), key)

    def __len__(self) -> int:
        return self.logprobs.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        if not isinstance(sample, Mapping):
            raise TypeError(f"ReferenceLogProbDataset needs mapping samples, got {type(sample).__name__}.")
        return {**sample, self.key: self.logprobs[index]}


class NGramRegularizedLM:
    """LightningModule mixin: causal-LM cross-entropy plus the n-gram regulariser, from one call.

    Call :meth:`configure_ngram_regularizer` in ``__init__`` (after building the model: with ``reference="model"``
    it copies the weights at that moment, i.e. the pre-trained ones, also when the run later resumes from a
    checkpoint) and use :meth:`regularized_lm_loss` in ``training_step``. Reference log-probs come from

    * ``"model"``: a frozen copy of the model (not a submodule: it is not trained, saved or wrapped by DDP);
    * ``"adapter"``: the same PEFT model under ``disable_adapter()`` (no second copy);
    * ``"cache"``: per-token log-probs precomputed once (:func:`compute_reference_logprobs`) and delivered in the
      batch under ``"ref_logprobs"`` (:class:`ReferenceLogProbDataset`).

    Example::

        class MyLM(NGramRegularizedLM, LightningModule):
            def __init__(self):
                super().__init__()
                self.model = AutoModelForCausalLM.from_config(config)
                self.configure_ngram_regularizer(NGramRegularizer(gamma=0.5, weight=1.0))

            def training_step(self, batch, batch_idx):
                return self.regularized_lm_loss(batch)
    """

    _ngram_regularizer: NGramRegularizer  # registered as a (parameter-free) submodule
    _ngram_reference_source: Reference = "model"
    _ngram_model_attr: str | None = None
    _ngram_reference_holder: list[nn.Module]

    def configure_ngram_regularizer(
        self,
        regularizer: NGramRegularizer,
        reference: Reference = "model",
        model_attr: str | None = None,
        reference_model: nn.Module | None = None,
    ) -> None:
        """Attach ``regularizer``; see the class docstring for ``reference``.

        Args:
            reference_model: with ``reference="model"``, use this frozen model instead of a copy of the current one.
        """
        if not isinstance(self, nn.Module):
            raise TypeError("NGramRegularizedLM must be mixed into a LightningModule.")
        if reference not in ("model", "adapter", "cache"):
            raise ValueError(f'`reference` must be "model", "adapter" or "cache", got {reference!r}.')
        from lightning_ft.memorisation.callbacks import find_causal_lm

        model = find_causal_lm(self, model_attr)
        if reference == "adapter" and not callable(getattr(model, "disable_adapter", None)):
            raise ValueError(
                f'reference="adapter" needs a PEFT model with `disable_adapter()`; {type(model).__name__} has none.'
                ' Use reference="model" (a frozen copy) or "cache" (precomputed log-probs).'
            )
        self._ngram_regularizer = regularizer
        self._ngram_reference_source = reference
        self._ngram_model_attr = model_attr
        holder: list[nn.Module] = []
        if reference == "model":
            ref = reference_model if reference_model is not None else copy.deepcopy(model)
            ref.eval().requires_grad_(False)
            holder.append(ref)
        object.__setattr__(self, "_ngram_reference_holder", holder)  # a list: never registered as a submodule
        object.__setattr__(self, "_ngram_model_cache", [model])

    @property
    def ngram_reference_model(self) -> nn.Module | None:
        """The frozen reference copy (``reference="model"``), else None."""
        holder = getattr(self, "_ngram_reference_holder", [])
        return holder[0] if holder else None

    def _reference_logprobs(self, model: nn.Module, batch: Mapping[str, Tensor], labels: Tensor) -> Tensor:
        source = self._ngram_reference_source
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if source == "cache":
            if "ref_logprobs" not in batch:
                raise ValueError(
                    'reference="cache" needs batch["ref_logprobs"]: wrap the training dataset in'
                    " ReferenceLogProbDataset(dataset, compute_reference_logprobs(model, input_ids))."
                )
            return batch["ref_logprobs"]
        with torch.no_grad():
            if source == "adapter":
                with model.disable_adapter():  # type: ignore[operator]
                    ref_logits = _model_logits(model, ids, mask)
            else:
                ref = self.ngram_reference_model
                assert ref is not None
                param = next(model.parameters())
                ref_param = next(ref.parameters())
                if ref_param.device != param.device or ref_param.dtype != param.dtype:
                    ref.to(device=param.device, dtype=param.dtype)  # follows the trained model (e.g. bf16-true)
                ref_logits = _model_logits(ref, ids, mask)
            logp, _ = token_logprobs(ref_logits, labels, self._ngram_regularizer.ignore_index)
        return logp

    def regularized_lm_loss(self, batch: Mapping[str, Tensor], outputs: Any = None, log: bool = True) -> Tensor:
        """Cross-entropy + ``weight * R`` for a batch with ``input_ids`` (+ ``attention_mask``, ``labels``).

        The cross-entropy is the mean negative log-likelihood of the supervised next tokens (the Hugging Face
        causal-LM loss), computed from the same per-token log-probabilities as ``R`` (one log-softmax per step).

        Args:
            batch: the training batch; without ``labels`` the targets are ``input_ids`` with padding (where
                ``attention_mask`` is 0) ignored.
            outputs: the model's outputs for this batch if already computed (must hold ``logits``).
            log: log ``train/ce`` and ``train/ngram_reg`` with ``self.log``.
        """
        regularizer = getattr(self, "_modules", {}).get("_ngram_regularizer")
        if regularizer is None:
            raise RuntimeError("call configure_ngram_regularizer(...) in __init__ before regularized_lm_loss.")
        model = self._ngram_model()
        labels = batch.get("labels")
        if labels is None:
            labels = batch["input_ids"]
            if batch.get("attention_mask") is not None:
                labels = labels.masked_fill(batch["attention_mask"] == 0, regularizer.ignore_index)
        if outputs is None:
            outputs = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        logits = outputs if isinstance(outputs, Tensor) else outputs.logits
        logprobs, mask = token_logprobs(logits, labels, regularizer.ignore_index)
        ce = -logprobs.sum() / mask.sum().clamp_min(1)
        ref_logprobs = self._reference_logprobs(model, batch, labels)
        if ref_logprobs.shape != logprobs.shape:
            raise ValueError(
                f"reference log-probs have shape {tuple(ref_logprobs.shape)}, expected {tuple(logprobs.shape)}"
                " (B, T - 1): the cache must be computed on the same token sequences."
            )
        reg = regularizer.weight * regularizer.penalty(logprobs, ref_logprobs, mask)
        if log:
            self.log("train/ce", ce.detach(), prog_bar=False)  # type: ignore[attr-defined]
            self.log("train/ngram_reg", reg.detach(), prog_bar=False)  # type: ignore[attr-defined]
        return ce + reg

    def _ngram_model(self) -> nn.Module:
        cached = getattr(self, "_ngram_model_cache", None)
        if cached is None:
            from lightning_ft.memorisation.callbacks import find_causal_lm

            cached = [find_causal_lm(self, self._ngram_model_attr)]  # type: ignore[arg-type]
            object.__setattr__(self, "_ngram_model_cache", cached)  # a list: not a submodule
        return cached[0]
