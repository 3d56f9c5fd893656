"""BadNets / Blended triggers, all-to-one poisoning, and the ASR / RA metrics."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset
from torchmetrics.utilities.data import dim_zero_sum

from lightning_ft.backdoor import (
    AttackSuccessRate,
    BadNets,
    Blended,
    PoisonedDataset,
    RobustAccuracy,
    triggered_test_set,
)
from lightning_ft.demos.digits import load_digits_tensors


@pytest.fixture(scope="module")
def digits() -> TensorDataset:
    images, labels = load_digits_tensors()
    return TensorDataset(images, labels)


# ---------------------------------------------------------------------------------------------------------------
# BadNets
# ---------------------------------------------------------------------------------------------------------------

CORNERS = {
    "bottom_right": (slice(-3, None), slice(-3, None)),
    "bottom_left": (slice(-3, None), slice(0, 3)),
    "top_right": (slice(0, 3), slice(-3, None)),
    "top_left": (slice(0, 3), slice(0, 3)),
}


@pytest.mark.parametrize("shape", [(3, 8, 10), (4, 1, 9, 7)])
@pytest.mark.parametrize("location", list(CORNERS))
def test_badnets_changes_only_the_corner_square(shape, location):
    images = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 0.5  # never equal to the value
    original = images.clone()
    value = 0.75
    out = BadNets(size=3, location=location, value=value)(images)
    assert torch.equal(images, original)  # not in place
    assert out.shape == images.shape and out.dtype == images.dtype
    rows, cols = CORNERS[location]
    patch = torch.zeros(shape[-2:], dtype=torch.bool)
    patch[rows, cols] = True
    assert int(patch.sum()) == 9
    assert (out[..., patch] == value).all()
    assert torch.equal(out[..., ~patch], images[..., ~patch])


def test_badnets_default_is_white_bottom_right_square():
    images = torch.zeros(2, 1, 8, 8)
    out = BadNets()(images)
    expected = torch.zeros(2, 1, 8, 8)
    expected[..., 5:, 5:] = 1.0
    assert torch.equal(out, expected)
    assert torch.equal(images, torch.zeros(2, 1, 8, 8))
    # size 1 and a square as large as the image
    assert BadNets(size=1)(torch.zeros(1, 4, 4))[0].nonzero().tolist() == [[3, 3]]
    assert torch.equal(BadNets(size=4)(torch.zeros(1, 4, 4)), torch.ones(1, 4, 4))


@pytest.mark.parametrize("size", [0, -1, 2.0, True, "3"])
def test_badnets_rejects_bad_size(size):
    with pytest.raises(ValueError, match="size"):
        BadNets(size=size)


@pytest.mark.parametrize("location", ["center", "bottom-right", "", None])
def test_badnets_rejects_bad_location(location):
    with pytest.raises(ValueError, match="location"):
        BadNets(location=location)


@pytest.mark.parametrize("shape", [(2, 2, 8), (1, 8, 2), (8, 8), (1, 1, 1, 8, 8)])
def test_badnets_rejects_bad_images(shape):
    with pytest.raises(ValueError, match="images"):
        BadNets(size=3)(torch.zeros(shape))


# ---------------------------------------------------------------------------------------------------------------
# Blended
# ---------------------------------------------------------------------------------------------------------------


def test_blended_formula():
    x = torch.full((1, 4, 4), 100 / 255)
    pattern = torch.full((1, 4, 4), 200 / 255)
    out = Blended(alpha=0.2, pattern=pattern)(x)
    assert torch.allclose(out, torch.full((1, 4, 4), 120 / 255), atol=1e-6)
    assert torch.allclose(x, torch.full((1, 4, 4), 100 / 255))  # not in place
    # batched input, broadcast pattern
    out = Blended(alpha=0.2, pattern=pattern)(x.expand(3, 1, 4, 4))
    assert out.shape == (3, 1, 4, 4)
    assert torch.allclose(out, torch.full((3, 1, 4, 4), 120 / 255), atol=1e-6)
    # alpha = 1 gives the pattern
    assert torch.allclose(Blended(alpha=1.0, pattern=pattern)(x), pattern)


def test_blended_random_pattern_is_deterministic_per_seed():
    shape = (1, 8, 8)
    a, b, c = Blended(seed=0), Blended(seed=0), Blended(seed=1)
    ta = a.trigger(shape)
    assert ta.shape == shape and ta.min() >= 0.0 and ta.max() <= 1.0
    assert torch.equal(ta, b.trigger(shape))
    assert torch.equal(ta, a.trigger(shape))  # cached, stable across calls
    assert not torch.equal(ta, c.trigger(shape))
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a(x), c(x))
    assert torch.allclose(a(x), 0.8 * x + 0.2 * ta)
    assert torch.allclose(a(x[0]), a(x)[0])


def test_blended_clips_to_unit_interval():
    x = torch.tensor([[[0.0, 1.0], [0.5, 1.0]]])
    high = Blended(alpha=0.5, pattern=torch.full((1, 2, 2), 3.0))(x)
    low = Blended(alpha=0.5, pattern=torch.full((1, 2, 2), -3.0))(x)
    assert high.max() <= 1.0 and low.min() >= 0.0
    assert torch.equal(high, torch.ones(1, 2, 2))
    assert torch.equal(low, torch.zeros(1, 2, 2))


@pytest.mark.parametrize("alpha", [0.0, -0.2, 1.2])
def test_blended_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        Blended(alpha=alpha)


def test_blended_rejects_bad_images():
    with pytest.raises(ValueError, match="images"):
        Blended()(torch.zeros(8, 8))


# ---------------------------------------------------------------------------------------------------------------
# PoisonedDataset / triggered_test_set
# ---------------------------------------------------------------------------------------------------------------


def test_poisoned_dataset_count_trigger_and_labels(digits):
    images, labels = digits.tensors
    attack = BadNets(size=2)
    data = PoisonedDataset(digits, attack, ratio=0.1, target=0, seed=0)
    n = len(digits)
    assert len(data) == n
    assert len(data.poison_indices) == round(0.1 * n) == 180
    poisoned = set(data.poison_indices.tolist())
    assert len(poisoned) == 180 and all(0 <= i < n for i in poisoned)
    for i in range(n):
        image, label = data[i]
        assert isinstance(label, int)
        if i in poisoned:
            assert data.is_poisoned(i)
            assert label == 0
            assert torch.equal(image, attack(images[i]))
            assert (image[..., -2:, -2:] == 1.0).all()
        else:
            assert not data.is_poisoned(i)
            assert label == int(labels[i])
            assert torch.equal(image, images[i])
    # the target class is eligible: some poisoned samples already had the target label
    assert any(int(labels[i]) == 0 for i in poisoned)
    # the wrapped data is untouched
    assert torch.equal(digits.tensors[0], images)


def test_poisoned_dataset_target_class_eligible_full_ratio(digits):
    data = PoisonedDataset(digits, BadNets(), ratio=1.0, target=3)
    assert len(data.poison_indices) == len(digits)
    assert {data[i][1] for i in range(len(data))} == {3}
    assert len(PoisonedDataset(digits, BadNets(), ratio=0.0).poison_indices) == 0


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.333, 0.5])
def test_poisoned_dataset_count_is_rounded(digits, ratio):
    data = PoisonedDataset(digits, BadNets(), ratio=ratio, seed=1)
    assert len(data.poison_indices) == round(ratio * len(digits))


def test_poisoned_dataset_seeding(digits):
    a = PoisonedDataset(digits, BadNets(), ratio=0.1, seed=0)
    b = PoisonedDataset(digits, BadNets(), ratio=0.1, seed=0)
    c = PoisonedDataset(digits, BadNets(), ratio=0.1, seed=1)
    assert torch.equal(a.poison_indices, b.poison_indices)
    assert not torch.equal(a.poison_indices, c.poison_indices)


def test_triggered_test_set(digits):
    images, labels = digits.tensors
    attack = Blended(alpha=0.2, seed=0)
    target = 2
    test = triggered_test_set(digits, attack, target=target)
    assert len(test) == int((labels != target).sum())
    assert len(test.poison_indices) == len(test)
    kept = test.indices.tolist()
    assert all(int(labels[i]) != target for i in kept)
    assert kept == [i for i in range(len(digits)) if int(labels[i]) != target]
    for j in range(0, len(test), 7):
        image, label = test[j]
        source = kept[j]
        assert label == int(labels[source])  # true label kept
        assert torch.equal(image, attack(images[source]))  # triggered
        assert test.is_poisoned(j)


@pytest.mark.parametrize("ratio", [-0.1, 1.1])
def test_poisoned_dataset_rejects_bad_ratio(digits, ratio):
    with pytest.raises(ValueError, match="ratio"):
        PoisonedDataset(digits, BadNets(), ratio=ratio)


@pytest.mark.parametrize("attack", [None, "badnets", 3])
def test_poisoned_dataset_rejects_non_callable_attack(digits, attack):
    with pytest.raises(TypeError, match="callable"):
        PoisonedDataset(digits, attack)


def test_poisoned_dataset_rejects_only_target_class():
    data = TensorDataset(torch.zeros(4, 1, 4, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        triggered_test_set(data, BadNets(size=1), target=0)


# ---------------------------------------------------------------------------------------------------------------
# AttackSuccessRate / RobustAccuracy
# ---------------------------------------------------------------------------------------------------------------


def test_metrics_with_indices_and_logits():
    preds = torch.tensor([0, 0, 3, 0, 1, 2])
    labels = torch.tensor([1, 2, 3, 0, 1, 0])  # samples 3 and 5 are target-class: ignored
    logits = torch.nn.functional.one_hot(preds, 5).float() * 3.0 - 1.0
    for inputs in (preds, logits):
        asr, ra = AttackSuccessRate(target=0), RobustAccuracy(target=0)
        asr.update(inputs, labels)
        ra.update(inputs, labels)
        # kept: (0,1), (0,2), (3,3), (1,1) -> ASR 2/4, RA 2/4
        assert asr.compute().item() == pytest.approx(0.5)
        assert ra.compute().item() == pytest.approx(0.5)
        assert int(asr.total) == int(ra.total) == 4
    asr = AttackSuccessRate(target=3)
    asr.update(preds, labels)  # kept: all but sample 2; hits: none predicted 3 there
    assert asr.compute().item() == 0.0 and int(asr.total) == 5


def test_metrics_accumulate_over_updates():
    gen = torch.Generator().manual_seed(0)
    target, n_classes = 1, 4
    asr, ra = AttackSuccessRate(target=target), RobustAccuracy(target=target)
    hits_asr = hits_ra = total = 0
    for _ in range(5):
        labels = torch.randint(0, n_classes, (13,), generator=gen)
        logits = torch.randn(13, n_classes, generator=gen)
        preds = logits.argmax(-1)
        asr.update(logits, labels)
        ra.update(logits, labels)
        for p, y in zip(preds.tolist(), labels.tolist(), strict=True):
            if y == target:
                continue
            total += 1
            hits_asr += p == target
            hits_ra += p == y
    assert total > 0
    assert asr.compute().item() == pytest.approx(hits_asr / total)
    assert ra.compute().item() == pytest.approx(hits_ra / total)
    assert int(asr.hits) == hits_asr and int(ra.hits) == hits_ra and int(asr.total) == total
    asr.reset()
    assert int(asr.hits) == 0 and int(asr.total) == 0


@pytest.mark.parametrize("cls", [AttackSuccessRate, RobustAccuracy])
def test_metric_states_sum_across_processes(cls):
    metric = cls(target=0)
    assert set(metric._reductions) == {"hits", "total"}
    assert all(fn is dim_zero_sum for fn in metric._reductions.values())
    assert cls.higher_is_better is (cls is RobustAccuracy)


@pytest.mark.parametrize("cls", [AttackSuccessRate, RobustAccuracy])
@pytest.mark.parametrize("target", [-1, 1.5, True, "0", None])
def test_metric_rejects_bad_target(cls, target):
    with pytest.raises(ValueError, match="target"):
        cls(target=target)


def test_metric_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="match"):
        AttackSuccessRate().update(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
