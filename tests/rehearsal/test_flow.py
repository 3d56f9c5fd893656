"""FLOW easy-sample weighting (method card rehearsal.md §3, §9): weights, temperature, weighted losses, the
``sequence_nll`` reference loss, argument errors, and the ``FLOWWeightedLoss`` mixin in a real Lightning fit."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_ft.demos.vision import ImageClassifier
from lightning_ft.rehearsal import (
    FLOWWeightedLoss,
    FLOWWeighting,
    ReferenceStatistics,
    WithSampleIds,
    flow_temperature,
    flow_weighted_loss,
    flow_weighted_token_loss,
    flow_weights,
    sequence_nll,
)
from tests.helpers.data import digits
from tests.helpers.models import tiny_lm
from tests.helpers.resume import quiet_trainer

E = math.e


def stats_of(losses: list[float], ids: list[int] | None = None, token_nll: torch.Tensor | None = None):
    loss = torch.tensor(losses)
    ids_t = torch.arange(len(losses)) if ids is None else torch.tensor(ids)
    return ReferenceStatistics(ids_t, loss, torch.ones(len(losses), dtype=torch.bool), token_nll)


def naive_sequence_nll(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> list[float]:
    """Mean NLL of the supervised next tokens, one sample and one position at a time."""
    out = []
    for b in range(labels.shape[0]):
        nlls = []
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target != ignore_index:
                nlls.append(-float(torch.log_softmax(logits[b, t].double(), -1)[target]))
        out.append(sum(nlls) / len(nlls) if nlls else math.nan)
    return out


# --------------------------------------------------------------------------------------------------------------------
# weights and temperature
# --------------------------------------------------------------------------------------------------------------------


def test_median_sample_gets_e_minus_1_zero_loss_1_and_three_times_median_e_minus_3():
    losses = [0.0, 0.35, 0.7, 2.1, 1.3]  # odd count: the median 0.7 is a sample's own loss
    assert flow_temperature(torch.tensor(losses)) == pytest.approx(0.7)
    w = flow_weights(torch.tensor(losses))
    assert w.dtype == torch.float32 and w.shape == (5,)
    assert w[0].item() == 1.0
    assert w[2].item() == pytest.approx(math.exp(-1), rel=1e-6)
    assert w[3].item() == pytest.approx(math.exp(-3), rel=1e-6)
    assert w[1].item() == pytest.approx(math.exp(-0.5), rel=1e-6)
    # the same through FLOWWeighting, looked up by (shuffled, non-contiguous) sample id
    flow = FLOWWeighting(stats_of(losses, ids=[40, 10, 30, 20, 50]))
    assert flow.tau == pytest.approx(0.7)
    got = flow.weights_for(torch.tensor([40, 30, 20]))
    torch.testing.assert_close(got, torch.tensor([1.0, math.exp(-1), math.exp(-3)]))


def test_temperature_ignores_non_finite_losses_and_weights_keep_the_input_shape():
    losses = torch.tensor([[0.5, float("nan")], [1.0, float("inf")], [2.0, float("nan")]])
    assert flow_temperature(losses) == pytest.approx(1.0)
    w = flow_weights(losses)
    assert w.shape == losses.shape
    torch.testing.assert_close(w[:, 0], torch.exp(-torch.tensor([0.5, 1.0, 2.0])))
    assert w[0, 1].item() == 0.0 and w[2, 1].item() == 0.0  # NaN loss -> weight 0
    assert w[1, 1].item() == 0.0  # infinite loss -> exp(-inf) = 0


def test_explicit_tau():
    losses = torch.tensor([0.0, 0.5, 1.0, 4.0])
    torch.testing.assert_close(flow_weights(losses, tau=0.25), torch.exp(-losses / 0.25))
    flow = FLOWWeighting(stats_of(losses.tolist()), tau=0.25)
    assert flow.tau == 0.25
    torch.testing.assert_close(flow.weights, torch.exp(-losses / 0.25))


def test_mean1_normalisation_gives_mean_one_over_finite_losses():
    losses = torch.tensor([0.1, 0.4, 0.9, 1.7, 3.0, 0.0])
    raw = flow_weights(losses)
    w = flow_weights(losses, normalize="mean1")
    assert w.mean().item() == pytest.approx(1.0, rel=1e-6)
    torch.testing.assert_close(w, raw / raw.mean())
    # with a NaN: it gets 0 and the finite ones have mean 1
    with_nan = torch.cat([losses, torch.tensor([float("nan")])])
    w = flow_weights(with_nan, tau=0.5, normalize="mean1")
    assert w[-1].item() == 0.0
    assert w[:-1].mean().item() == pytest.approx(1.0, rel=1e-6)
    flow = FLOWWeighting(stats_of(losses.tolist()), normalize="mean1")
    assert flow.weights.mean().item() == pytest.approx(1.0, rel=1e-6)


def test_nan_loss_gets_weight_zero():
    w = flow_weights(torch.tensor([float("nan"), 0.5, 1.0, 2.0]))
    assert w[0].item() == 0.0 and torch.isfinite(w).all()
    flow = FLOWWeighting(stats_of([float("nan"), 0.5, 1.0, 2.0]))
    assert flow.tau == pytest.approx(1.0)  # median of the finite losses
    assert flow.weights_for(torch.tensor([0])).item() == 0.0
    # a NaN-loss sample contributes nothing to the weighted loss (its current loss is finite)
    loss = flow.loss(torch.tensor([5.0, 1.0]), torch.tensor([0, 2]))
    assert loss.item() == pytest.approx((0.0 * 5.0 + math.exp(-1) * 1.0) / 2, rel=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# weighted losses
# --------------------------------------------------------------------------------------------------------------------


def test_weighted_sequence_loss_equals_manual():
    g = torch.Generator().manual_seed(0)
    per_sample = torch.rand(7, generator=g, dtype=torch.float64) * 3
    weights = torch.rand(7, generator=g)
    manual = sum(float(w) * float(lo) for w, lo in zip(weights, per_sample, strict=True)) / 7
    got = flow_weighted_loss(per_sample, weights)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(manual, rel=1e-7)
    # through FLOWWeighting with ids in arbitrary order
    ref = [0.2, 1.5, 0.8, 0.05, 2.2, 0.6, 1.1]
    flow = FLOWWeighting(stats_of(ref, ids=[100 + i for i in range(7)]))
    ids = torch.tensor([106, 100, 103])
    w = [math.exp(-ref[i - 100] / 0.8) for i in ids.tolist()]
    cur = torch.tensor([1.0, 2.0, 3.0])
    manual = sum(a * b for a, b in zip(w, [1.0, 2.0, 3.0], strict=True)) / 3
    assert flow.loss(cur, ids).item() == pytest.approx(manual, rel=1e-6)


def test_weighted_token_loss_equals_manual_for_sample_and_token_weights():
    g = torch.Generator().manual_seed(1)
    token_nll = torch.rand(3, 5, generator=g) * 4
    mask = torch.rand(3, 5, generator=g) > 0.4
    mask[0, 0] = True
    sample_w = torch.rand(3, generator=g)
    token_w = torch.rand(3, 5, generator=g)
    n = int(mask.sum())
    manual_s = sum(float(sample_w[b] * token_nll[b, t]) for b in range(3) for t in range(5) if mask[b, t]) / n
    manual_t = sum(float(token_w[b, t] * token_nll[b, t]) for b in range(3) for t in range(5) if mask[b, t]) / n
    assert flow_weighted_token_loss(token_nll, mask, sample_w).item() == pytest.approx(manual_s, rel=1e-6)
    assert flow_weighted_token_loss(token_nll, mask, token_w).item() == pytest.approx(manual_t, rel=1e-6)
    # unsupervised positions are ignored even when they hold NaN
    poisoned = token_nll.masked_fill(~mask, float("nan"))
    assert flow_weighted_token_loss(poisoned, mask, token_w).item() == pytest.approx(manual_t, rel=1e-6)


def test_weighted_loss_shape_errors():
    with pytest.raises(ValueError, match="per_sample_loss"):
        flow_weighted_loss(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="mask"):
        flow_weighted_token_loss(torch.ones(2, 3), torch.ones(2, 4, dtype=torch.bool), torch.ones(2))
    with pytest.raises(ValueError, match="weights"):
        flow_weighted_token_loss(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.ones(3))


# --------------------------------------------------------------------------------------------------------------------
# sequence_nll (the reference loss of causal LMs)
# --------------------------------------------------------------------------------------------------------------------


def test_sequence_nll_equals_manual_mean_over_shifted_supervised_tokens():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 9, 13, generator=g)
    labels = torch.randint(0, 13, (4, 9), generator=g)
    labels[0, :3] = -100  # prompt
    labels[1, :6] = -100
    labels[2, 4:] = -100  # supervised then padding
    labels[3, 1:] = -100  # only position 0 labelled: no next token is supervised after the shift
    per_sample, token_nll, mask = sequence_nll(logits, labels)
    assert per_sample.shape == (4,) and token_nll.shape == mask.shape == (4, 8)
    torch.testing.assert_close(mask, labels[:, 1:] != -100)
    naive = naive_sequence_nll(logits, labels)
    for got, want in zip(per_sample[:3].tolist(), naive[:3], strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    # counts use the shifted labels: sample 2 has 4 labelled positions but only 3 supervised next tokens (FLOW's
    # official code counts the unshifted 4)
    assert int(mask[0].sum()) == 6 and int(mask[1].sum()) == 3 and int(mask[2].sum()) == 3
    # a sample without a supervised next token: NaN (FLOW then gives it weight 0), token NLL 0 there
    assert math.isnan(per_sample[3].item()) and math.isnan(naive[3])
    assert (token_nll[~mask] == 0).all()
    assert flow_weights(per_sample, tau=1.0)[3].item() == 0.0


def test_sequence_nll_custom_ignore_index():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 7, generator=g)
    labels = torch.randint(0, 7, (2, 6), generator=g)
    labels[:, :2] = -1
    per_sample, _, mask = sequence_nll(logits, labels, ignore_index=-1)
    assert int(mask.sum()) == 8
    for got, want in zip(per_sample.tolist(), naive_sequence_nll(logits, labels, ignore_index=-1), strict=True):
        assert got == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# token vs sequence level on one-token responses (statistics from a real causal LM)
# --------------------------------------------------------------------------------------------------------------------


def one_token_response_batch(n: int = 7, seq_len: int = 10, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        ids = torch.randint(0, 1024, (seq_len,), generator=g)
        labels = torch.full_like(ids, -100)
        pos = 2 + i % (seq_len - 2)  # one supervised token per sample, at varying positions
        labels[pos] = ids[pos]
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def test_token_and_sequence_level_agree_on_one_token_responses():
    samples = one_token_response_batch()
    reference = tiny_lm(seed=0)
    loader = DataLoader(WithSampleIds(samples), batch_size=3)
    stats = ReferenceStatistics.compute(reference, loader, task="causal_lm", store_token_nll=True)
    seq = FLOWWeighting(stats, level="sequence")
    tok = FLOWWeighting(stats, level="token")
    assert seq.tau == pytest.approx(tok.tau, rel=1e-6)  # same set of losses: one per sample
    # the current model differs from the reference
    current = tiny_lm(seed=1)
    batch = next(iter(DataLoader(WithSampleIds(samples), batch_size=len(samples), shuffle=False)))
    with torch.no_grad():
        logits = current(input_ids=batch["input_ids"]).logits
    per_sample, token_nll, mask = sequence_nll(logits, batch["labels"])
    assert (mask.sum(1) == 1).all()
    ids = batch["sample_id"]
    sequence_token = seq.token_loss(token_nll, mask, ids)
    token_token = tok.token_loss(token_nll, mask, ids)
    sequence_sample = seq.loss(per_sample, ids)
    torch.testing.assert_close(sequence_token, token_token)
    torch.testing.assert_close(sequence_token, sequence_sample)
    # and both equal the manual value
    w = torch.exp(-stats.loss / seq.tau)
    manual = float((w[stats.positions(ids)] * per_sample).mean())
    assert sequence_token.item() == pytest.approx(manual, rel=1e-5)
    # token weights are 0 off the supervised positions
    tw = tok.weights_for(ids)
    assert tw.shape == token_nll.shape and (tw[~mask] == 0).all()


# --------------------------------------------------------------------------------------------------------------------
# argument errors
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan")])
def test_non_positive_tau_raises(tau):
    with pytest.raises(ValueError, match="tau"):
        flow_weights(torch.tensor([0.5, 1.0]), tau=tau)
    with pytest.raises(ValueError, match="tau"):
        FLOWWeighting(stats_of([0.5, 1.0, 2.0]), tau=tau)


def test_unknown_normalize_and_level_raise():
    with pytest.raises(ValueError, match="normalize"):
        flow_weights(torch.tensor([0.5, 1.0]), normalize="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="normalize"):
        FLOWWeighting(stats_of([0.5, 1.0, 2.0]), normalize="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="level"):
        FLOWWeighting(stats_of([0.5, 1.0, 2.0]), level="batch")  # type: ignore[arg-type]


def test_token_level_without_token_nll_raises():
    with pytest.raises(ValueError, match="store_token_nll"):
        FLOWWeighting(stats_of([0.5, 1.0, 2.0]), level="token")


def test_sequence_loss_at_token_level_and_mismatched_token_weights_raise():
    token_nll = torch.tensor([[0.5, float("nan"), 1.0], [0.2, 0.4, float("nan")]])
    flow = FLOWWeighting(stats_of([0.75, 0.3], token_nll=token_nll), level="token")
    with pytest.raises(ValueError, match="token_loss"):
        flow.loss(torch.ones(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="sequence length"):
        flow.token_loss(torch.ones(2, 5), torch.ones(2, 5, dtype=torch.bool), torch.tensor([0, 1]))


@pytest.mark.parametrize("losses", [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [-1.0, -0.5, 2.0]])
def test_non_positive_median_raises(losses):
    with pytest.raises(ValueError, match="median"):
        flow_temperature(torch.tensor(losses))
    with pytest.raises(ValueError, match="tau"):
        flow_weights(torch.tensor(losses))
    with pytest.raises(ValueError, match="median"):
        FLOWWeighting(stats_of(losses))
    # an explicit tau is the way out
    assert FLOWWeighting(stats_of(losses), tau=1.0).weights.shape == (3,)


def test_no_finite_loss_raises():
    with pytest.raises(ValueError, match="finite"):
        flow_temperature(torch.tensor([float("nan"), float("inf")]))


def test_missing_id_raises_key_error():
    flow = FLOWWeighting(stats_of([0.5, 1.0, 2.0]))
    with pytest.raises(KeyError, match="7"):
        flow.weights_for(torch.tensor([0, 7]))


def test_repr_names_level_and_tau():
    text = repr(FLOWWeighting(stats_of([0.5, 1.0, 2.0])))
    assert "sequence" in text and "tau=1" in text and "n=3" in text


# --------------------------------------------------------------------------------------------------------------------
# FLOWWeightedLoss mixin in a real fit
# --------------------------------------------------------------------------------------------------------------------

N_FIT = 97  # odd: the median is one sample's loss


class FlowClassifier(ImageClassifier):  # ImageClassifier is a FLOWWeightedLoss
    """Digits classifier whose training loss goes through ``flow_loss``; records what reaches backward."""

    def __init__(self) -> None:
        super().__init__(width=4, lr=0.05)
        self.records: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, y, ids = batch
        losses = F.cross_entropy(self(x), y, reduction="none")
        loss = self.flow_loss(losses, ids)
        self.records.append({"ids": ids.clone(), "losses": losses.detach().clone(), "returned": loss.detach()})
        return loss

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.records[-1]["backward"] = loss.detach().clone()


def fit_loader() -> DataLoader:
    x, y = digits()
    ds = WithSampleIds(TensorDataset(x[:N_FIT], y[:N_FIT]), offset=5)
    return DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))


@pytest.mark.filterwarnings("ignore:.*no `val_dataloader`.*")
def test_flow_loss_without_weighting_is_the_plain_mean():
    model = FlowClassifier()
    assert model.flow_weighting is None
    quiet_trainer(max_epochs=1).fit(model, fit_loader())
    assert len(model.records) == math.ceil(N_FIT / 16)
    for rec in model.records:
        torch.testing.assert_close(rec["backward"], rec["losses"].mean())
        torch.testing.assert_close(rec["returned"], rec["losses"].mean())
    seen = torch.cat([rec["ids"] for rec in model.records])
    assert sorted(seen.tolist()) == list(range(5, 5 + N_FIT))


@pytest.mark.filterwarnings("ignore:.*no `val_dataloader`.*")
def test_flow_loss_with_weighting_reaches_backward_as_the_manual_weighted_mean():
    model = FlowClassifier()
    start = copy.deepcopy(model)
    x, y = digits()
    x, y = x[:N_FIT], y[:N_FIT]
    # manual reference losses of the frozen starting model (eval mode), tau = their median (odd count)
    with torch.no_grad():
        start.eval()
        ref = F.cross_entropy(start(x), y, reduction="none")
    tau = float(ref.sort().values[N_FIT // 2])
    manual_w = {5 + i: math.exp(-float(ref[i]) / tau) for i in range(N_FIT)}

    stats = ReferenceStatistics.compute(model, fit_loader())
    model.flow_weighting = FLOWWeighting(stats)
    assert model.flow_weighting.tau == pytest.approx(tau, rel=1e-6)
    quiet_trainer(max_epochs=1).fit(model, fit_loader())

    assert len(model.records) == math.ceil(N_FIT / 16)
    for rec in model.records:
        w = torch.tensor([manual_w[i] for i in rec["ids"].tolist()])
        manual = (w * rec["losses"]).mean()
        torch.testing.assert_close(rec["backward"], manual, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(rec["returned"], rec["backward"])
        assert rec["backward"].item() < rec["losses"].mean().item()  # all weights < 1 here (no zero loss)


def test_flow_token_loss_without_weighting_is_the_plain_token_mean():
    mixin = FLOWWeightedLoss()
    token_nll = torch.tensor([[1.0, float("nan"), 3.0], [2.0, 4.0, 0.5]])
    mask = torch.tensor([[True, False, True], [True, True, False]])
    assert mixin.flow_token_loss(token_nll, mask, torch.tensor([0, 1])).item() == pytest.approx(10.0 / 4)
    flow = FLOWWeighting(stats_of([1.0, 3.0]), tau=1.0)
    mixin.flow_weighting = flow
    manual = (math.exp(-1.0) * 4.0 + math.exp(-3.0) * 6.0) / 4
    assert mixin.flow_token_loss(token_nll, mask, torch.tensor([0, 1])).item() == pytest.approx(manual, rel=1e-6)


def test_even_count_median_averages_the_two_middle_values_like_numpy():
    losses = torch.tensor([4.0, 1.0, 3.0, 2.0])
    assert flow_temperature(losses) == pytest.approx(2.5)
    assert flow_temperature(torch.tensor([4.0, float("nan"), 1.0, 3.0])) == pytest.approx(3.0)
