"""NGramRegularizedLM: the three reference sources agree, the reference stays frozen and unregistered, errors."""

from __future__ import annotations

import contextlib

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_ft.memorisation import (
    NGramRegularizedLM,
    NGramRegularizer,
    ReferenceLogProbDataset,
    compute_reference_logprobs,
)
from lightning_ft.memorisation.functional import token_logprobs
from lightning_ft.rehearsal import ReferenceStatistics, WithSampleIds
from tests.helpers.models import tiny_lm


class LM(NGramRegularizedLM, pl.LightningModule):
    def __init__(self, reference: str = "model", model: nn.Module | None = None, weight: float = 1.0) -> None:
        super().__init__()
        self.model = model if model is not None else tiny_lm(seed=1)
        self.configure_ngram_regularizer(NGramRegularizer((2,), gamma=0.0, weight=weight), reference=reference)

    def training_step(self, batch, batch_idx):
        return self.regularized_lm_loss(batch, log=False)


class FakePeft(nn.Module):
    """A PEFT-like wrapper: a trainable bias on the logits that ``disable_adapter()`` switches off."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.config = base.config
        self.delta = nn.Parameter(torch.zeros(base.config.vocab_size))
        self.enabled = True

    def get_output_embeddings(self):
        return self.base.get_output_embeddings()

    @contextlib.contextmanager
    def disable_adapter(self):
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def forward(self, input_ids, attention_mask=None):
        logits = self.base(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits + self.delta if self.enabled else logits


def batch(n: int = 4, t: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 1024, (n, t), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def test_reference_copy_is_frozen_and_not_a_submodule():
    lm = LM()
    ref = lm.ngram_reference_model
    assert ref is not None and ref is not lm.model
    assert not any(p is q for p in lm.parameters() for q in ref.parameters())
    assert all(not k.startswith("_ngram_reference") for k in lm.state_dict())
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    optimizer = torch.optim.SGD(lm.parameters(), lr=0.5)
    for _ in range(3):
        loss = lm.regularized_lm_loss(batch(), log=False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.grad is None for p in ref.parameters())
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    assert not torch.equal(before["transformer.wte.weight"], lm.model.transformer.wte.weight)


def test_penalty_is_zero_at_the_start_and_positive_after_drift():
    lm = LM()
    b = batch()
    logits = lm.model(input_ids=b["input_ids"]).logits
    ce = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten())
    assert torch.allclose(lm.regularized_lm_loss(b, log=False), ce, atol=1e-6)  # R = 0 when model == reference
    with torch.no_grad():  # make the model more confident on the batch than the reference
        lm.model.lm_head.weight.mul_(5.0)
    logits = lm.model(input_ids=b["input_ids"]).logits
    ce = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten())
    assert lm.regularized_lm_loss(b, log=False) > ce + 1e-4


def test_cache_source_equals_model_source():
    lm_model, lm_cache = LM("model"), LM("cache")
    perturb(lm_model.model)
    lm_cache.model.load_state_dict(lm_model.model.state_dict())
    b = batch()
    ref_logprobs = compute_reference_logprobs(lm_model.ngram_reference_model, b["input_ids"], batch_size=3)
    dataset = ReferenceLogProbDataset([{"input_ids": r, "labels": r} for r in b["input_ids"]], ref_logprobs)
    cached = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    expected = lm_model.regularized_lm_loss(b, log=False)
    assert torch.allclose(lm_cache.regularized_lm_loss(cached, log=False), expected, atol=1e-5)


def test_cache_from_reference_statistics_equals_the_cache_pass():
    """One reference pass serves the rehearsal family and this regulariser: the cache built from ReferenceStatistics
    equals compute_reference_logprobs, and so does the regularised loss."""
    lm_model, lm_cache = LM("model"), LM("cache")
    perturb(lm_model.model)
    lm_cache.model.load_state_dict(lm_model.model.state_dict())
    b = batch()
    samples = [{"input_ids": r, "labels": r} for r in b["input_ids"]]
    loader = torch.utils.data.DataLoader(WithSampleIds(samples, offset=5), batch_size=3)  # type: ignore[arg-type]
    stats = ReferenceStatistics.compute(lm_model.ngram_reference_model, loader, task="causal_lm", store_token_nll=True)
    dataset = ReferenceLogProbDataset.from_statistics(samples, stats, offset=5)  # type: ignore[arg-type]
    direct = compute_reference_logprobs(lm_model.ngram_reference_model, b["input_ids"])
    assert torch.allclose(dataset.logprobs, direct, atol=1e-5)
    cached = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    expected = lm_model.regularized_lm_loss(b, log=False)
    assert torch.allclose(lm_cache.regularized_lm_loss(cached, log=False), expected, atol=1e-5)
    without_tokens = ReferenceStatistics.compute(lm_model.ngram_reference_model, loader, task="causal_lm")
    with pytest.raises(ValueError, match="store_token_nll"):
        ReferenceLogProbDataset.from_statistics(samples, without_tokens, offset=5)  # type: ignore[arg-type]


def test_adapter_source_uses_the_disabled_adapter():
    base = tiny_lm(seed=1)
    lm = LM("adapter", model=FakePeft(base))
    assert lm.ngram_reference_model is None  # no second copy
    b = batch()
    with torch.no_grad():
        lm.model.delta.copy_(torch.linspace(-2, 2, lm.model.delta.numel()))
    loss = lm.regularized_lm_loss(b, log=False)
    logits = lm.model(b["input_ids"])
    ce = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten())
    reg = lm._ngram_regularizer(logits, b["labels"], ref_logits=base(input_ids=b["input_ids"]).logits)
    assert torch.allclose(loss, ce + reg, atol=1e-5) and reg > 0
    assert lm.model.enabled  # the adapter is switched back on


def test_reference_gradient_never_flows_with_cached_tensor_requiring_grad():
    lm = LM("cache")
    b = batch()
    ref = compute_reference_logprobs(lm.model, b["input_ids"]).requires_grad_(True)
    perturb(lm.model)
    lm.regularized_lm_loss({**b, "ref_logprobs": ref}, log=False).backward()
    assert ref.grad is None


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="disable_adapter"):
        LM("adapter")
    with pytest.raises(ValueError, match="reference"):
        LM("teacher")
    with pytest.raises(ValueError, match="ref_logprobs"):
        LM("cache").regularized_lm_loss(batch(), log=False)

    class Unconfigured(NGramRegularizedLM, pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_lm()

    with pytest.raises(RuntimeError, match="configure_ngram_regularizer"):
        Unconfigured().regularized_lm_loss(batch(), log=False)


def test_token_logprobs_of_cache_match_model_pass():
    model = tiny_lm(seed=2)
    b = batch()
    cached = compute_reference_logprobs(model, b["input_ids"], batch_size=2)
    direct, _ = token_logprobs(model(input_ids=b["input_ids"]).logits, b["input_ids"])
    assert torch.allclose(cached, direct, atol=1e-5)
