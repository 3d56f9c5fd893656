"""TSBD stage 1 core: neuron discovery, neuron-weight changes, selection, zero reinitialisation; DER / RIR."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_ft.backdoor import (
    defense_effectiveness_rating,
    find_neuron_layers,
    neuron_weight_changes,
    robust_improvement_rating,
    select_reinit_weights,
    zero_reinit_,
)

# ---------------------------------------------------------------------------------------------------------------
# Hand-built NWC example (spec §8.1)
# ---------------------------------------------------------------------------------------------------------------

DELTA_A = [[0.25, -0.5], [0.0, 0.0625]]  # A0, A1: 2 sub-weights each
DELTA_B = [[1.0, 0.0, -0.25], [0.125, 0.0, 0.0]]  # B0, B1: 3 sub-weights each


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_b = nn.Conv1d(3, 2, kernel_size=1, bias=False)  # B: 2 neurons x 3 sub-weights
        self.shortcut = nn.Conv1d(3, 2, kernel_size=1, bias=False)  # ignored (name contains "shortcut")


class HandBuilt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(1, 2, kernel_size=(1, 2), bias=False)  # A: 2 neurons x 2 sub-weights
        self.block = Block()
        self.fc = nn.Linear(4, 3)  # ignored (Linear, default types=("conv",))


def hand_built() -> tuple[HandBuilt, HandBuilt]:
    """``(W_bd, W_ul)``: every weight of the original is 1.0; the unlearned copy adds dyadic Δ (10 where ignored)."""
    model = HandBuilt()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    unlearned = copy.deepcopy(model)
    with torch.no_grad():
        unlearned.conv_a.weight += torch.tensor(DELTA_A).reshape(2, 1, 1, 2)
        unlearned.block.conv_b.weight += torch.tensor(DELTA_B).reshape(2, 3, 1)
        unlearned.block.shortcut.weight += 10.0
        unlearned.fc.weight += 10.0
        unlearned.fc.bias += 10.0
    return model, unlearned


def test_hand_built_layers_ignore_shortcut_and_linear():
    model, _ = hand_built()
    layers = find_neuron_layers(model)
    assert [layer.name for layer in layers] == ["conv_a", "block.conv_b"]
    assert [layer.num_neurons for layer in layers] == [2, 2]
    assert all(layer.kind == "conv" and layer.out_dim == 0 for layer in layers)


def test_hand_built_nwc_and_ranking():
    model, unlearned = hand_built()
    layers = find_neuron_layers(model)
    changes = neuron_weight_changes(model, unlearned, layers)
    assert set(changes) == {"conv_a", "block.conv_b"}
    assert torch.equal(changes["conv_a"], torch.tensor(DELTA_A).abs())
    assert torch.equal(changes["block.conv_b"], torch.tensor(DELTA_B).abs())
    nwc = {"A0": 0.75, "A1": 0.0625, "B0": 1.25, "B1": 0.125}
    assert changes["conv_a"].sum(1).tolist() == [nwc["A0"], nwc["A1"]]
    assert changes["block.conv_b"].sum(1).tolist() == [nwc["B0"], nwc["B1"]]
    assert sorted(nwc, key=nwc.get, reverse=True) == ["B0", "A0", "B1", "A1"]
    # the ranking shows through the selection: n = 1/4 picks B0, 2/4 adds A0, 3/4 adds B1
    expected = {0.25: ([False, False], [True, False]), 0.5: ([True, False], [True, False])}
    expected[0.75] = ([True, False], [True, True])
    expected[1.0] = ([True, True], [True, True])
    for ratio, (sel_a, sel_b) in expected.items():
        _, selected = select_reinit_weights(changes, ratio, 0.7)
        assert selected["conv_a"].tolist() == sel_a, ratio
        assert selected["block.conv_b"].tolist() == sel_b, ratio


@pytest.mark.parametrize(
    ("subweight_ratio", "zero_a", "zero_b"),
    [
        # pooled [1.0, 0, 0.25, 0.25, 0.5], k = 3, thr = 0.25: the tie zeroes 4 > k
        (0.7, [[True, True], [False, False]], [[True, False, True], [False, False, False]]),
        # k = 2, thr = 0.5
        (0.5, [[False, True], [False, False]], [[True, False, False], [False, False, False]]),
    ],
)
def test_hand_built_selection_and_zeroing(subweight_ratio, zero_a, zero_b):
    model, unlearned = hand_built()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ids_before = [id(p) for group in optimizer.param_groups for p in group["params"]]
    layers = find_neuron_layers(model)
    changes = neuron_weight_changes(model, unlearned, layers)
    masks, selected = select_reinit_weights(changes, neuron_ratio=0.5, subweight_ratio=subweight_ratio)
    assert selected["conv_a"].tolist() == [True, False]
    assert selected["block.conv_b"].tolist() == [True, False]
    assert masks["conv_a"].tolist() == zero_a
    assert masks["block.conv_b"].tolist() == zero_b
    assert masks["conv_a"].dtype == torch.bool

    unlearned_before = copy.deepcopy(unlearned.state_dict())
    count = zero_reinit_(layers, masks)
    n_expected = sum(map(sum, zero_a)) + sum(map(sum, zero_b))
    assert count == n_expected == (4 if subweight_ratio == 0.7 else 2)

    # the edit lands on the original model: exactly the masked sub-weights are 0, all else stays 1.0
    expect_a = 1.0 - torch.tensor(zero_a, dtype=torch.float32)
    expect_b = 1.0 - torch.tensor(zero_b, dtype=torch.float32)
    assert torch.equal(model.conv_a.weight.detach(), expect_a.reshape(2, 1, 1, 2))
    assert torch.equal(model.block.conv_b.weight.detach(), expect_b.reshape(2, 3, 1))
    for name in ("block.shortcut.weight", "fc.weight", "fc.bias"):
        assert torch.equal(model.state_dict()[name], torch.ones_like(model.state_dict()[name])), name
    # ... not on the unlearned copy
    for name, value in unlearned.state_dict().items():
        assert torch.equal(value, unlearned_before[name]), name
    # parameters are the same objects (optimizer references valid) and stay trainable
    assert [id(p) for group in optimizer.param_groups for p in group["params"]] == ids_before
    assert [id(p) for p in model.parameters()] == ids_before
    assert all(p.requires_grad for p in model.parameters())
    assert model.conv_a.weight.grad is None


def test_neuron_weight_changes_needs_matching_copy():
    model, unlearned = hand_built()
    layers = find_neuron_layers(model)
    other = nn.Sequential(nn.Conv2d(1, 2, (1, 2)))
    with pytest.raises(ValueError, match="missing"):
        neuron_weight_changes(model, other, layers)
    unlearned.block.conv_b = nn.Conv1d(4, 2, kernel_size=1)
    with pytest.raises(ValueError, match="shapes differ"):
        neuron_weight_changes(model, unlearned, layers)


# ---------------------------------------------------------------------------------------------------------------
# select_reinit_weights: validation, degenerate ratios
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01, 2.0])
def test_select_rejects_ratios_outside_unit_interval(bad):
    changes = {"a": torch.rand(4, 3)}
    with pytest.raises(ValueError, match="neuron_ratio"):
        select_reinit_weights(changes, bad, 0.7)
    with pytest.raises(ValueError, match="subweight_ratio"):
        select_reinit_weights(changes, 0.5, bad)


def test_select_ratio_one_is_allowed():
    changes = {"a": torch.rand(4, 3)}
    masks, selected = select_reinit_weights(changes, 1.0, 1.0)
    assert selected["a"].all() and masks["a"].all()


def test_select_tiny_ratio_selects_nothing():
    changes = {"a": torch.rand(4, 3), "b": torch.rand(3, 5)}
    masks, selected = select_reinit_weights(changes, 0.1, 0.7)  # int(7 * 0.1) = 0 neurons
    assert set(masks) == set(selected) == {"a", "b"}
    for name, change in changes.items():
        assert masks[name].shape == change.shape and masks[name].dtype == torch.bool
        assert not masks[name].any() and not selected[name].any()
    # tiny sub-weight ratio: one neuron selected, int(3 * 0.1) = 0 sub-weights
    masks, selected = select_reinit_weights({"a": torch.rand(4, 3)}, 0.25, 0.1)
    assert int(selected["a"].sum()) == 1 and not masks["a"].any()


def test_select_rejects_empty_changes():
    with pytest.raises(ValueError, match="empty"):
        select_reinit_weights({}, 0.5, 0.5)


# ---------------------------------------------------------------------------------------------------------------
# find_neuron_layers
# ---------------------------------------------------------------------------------------------------------------


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.seq = nn.Conv1d(4, 6, 5)
        self.head = nn.Linear(6, 7)
        self.norm = nn.BatchNorm2d(4)


def test_find_conv1d_conv2d_and_linear_layouts():
    model = Mixed()
    layers = {layer.name: layer for layer in find_neuron_layers(model, types=("conv", "linear"))}
    assert list(layers) == ["stem", "seq", "head"]
    assert [layers[n].kind for n in layers] == ["conv", "conv", "linear"]
    for name, (neurons, fan_in) in {"stem": (4, 27), "seq": (6, 20), "head": (7, 6)}.items():
        layer = layers[name]
        assert layer.out_dim == 0 and layer.num_neurons == neurons
        assert layer.weight is getattr(model, name).weight
        rows = layer.per_neuron(layer.weight.detach())
        assert rows.shape == (neurons, fan_in)
        for j in range(neurons):
            assert torch.equal(rows[j], layer.weight[j].detach().flatten())
        assert torch.equal(layer.from_per_neuron(rows), layer.weight.detach())


def test_find_hf_conv1d_layout_and_zeroing():
    conv1d_cls = pytest.importorskip("transformers.pytorch_utils").Conv1D
    model = nn.Sequential()
    model.add_module("c_attn", conv1d_cls(5, 3))  # nf = 5 outputs, nx = 3 inputs: weight (3, 5)
    assert model.c_attn.weight.shape == (3, 5)
    (layer,) = find_neuron_layers(model, types=("hf_conv1d",))
    assert layer.name == "c_attn" and layer.kind == "hf_conv1d"
    assert layer.out_dim == 1 and layer.num_neurons == 5
    w = layer.weight.detach()
    rows = layer.per_neuron(w)
    assert rows.shape == (5, 3)
    for j in range(5):
        assert torch.equal(rows[j], w[:, j])
    assert torch.equal(layer.from_per_neuron(rows), w)
    # masks in the per-neuron layout zero the matching entries of the (in, out) weight
    mask = torch.zeros(5, 3, dtype=torch.bool)
    mask[1, 2] = mask[4, 0] = True
    with torch.no_grad():
        model.c_attn.weight.fill_(1.0)
    assert zero_reinit_([layer], {"c_attn": mask}) == 2
    expected = torch.ones(3, 5)
    expected[2, 1] = expected[0, 4] = 0.0
    assert torch.equal(model.c_attn.weight.detach(), expected)
    # the default types ("conv",) do not pick it up
    with pytest.raises(ValueError, match="c_attn"):
        find_neuron_layers(model)


def test_find_include_exclude_and_types():
    model = Mixed()
    assert [x.name for x in find_neuron_layers(model)] == ["stem", "seq"]
    assert [x.name for x in find_neuron_layers(model, types=("linear",))] == ["head"]
    assert [x.name for x in find_neuron_layers(model, types=("conv", "linear"), include=("^s",))] == ["stem", "seq"]
    assert [x.name for x in find_neuron_layers(model, include=("seq", "head"))] == ["seq"]
    assert [x.name for x in find_neuron_layers(model, exclude=("stem",))] == ["seq"]
    assert [x.name for x in find_neuron_layers(model, types=("conv", "linear"), exclude=("q$",))] == ["stem", "head"]
    # default exclude skips shortcut and downsample convs at any depth; exclude=() keeps them
    net = nn.Module()
    net.conv = nn.Conv2d(1, 1, 1)
    net.layer = nn.Module()
    net.layer.shortcut = nn.Sequential(nn.Conv2d(1, 1, 1))
    net.layer.downsample = nn.Conv2d(1, 1, 1)
    assert [x.name for x in find_neuron_layers(net)] == ["conv"]
    assert [x.name for x in find_neuron_layers(net, exclude=())] == ["conv", "layer.shortcut.0", "layer.downsample"]


@pytest.mark.parametrize("types", [("bn",), ("conv", "attention"), ()])
def test_find_rejects_unknown_types(types):
    with pytest.raises(ValueError, match="types"):
        find_neuron_layers(Mixed(), types=types)


def test_find_no_eligible_layer_lists_model_layers():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="no eligible layer") as info:
        find_neuron_layers(model)
    assert "1 (linear)" in str(info.value) and "3 (linear)" in str(info.value)
    with pytest.raises(ValueError, match=r"stem \(conv\)"):
        find_neuron_layers(Mixed(), include=("nothing",))
    with pytest.raises(ValueError, match="none"):
        find_neuron_layers(nn.Sequential(nn.ReLU()), types=("conv", "linear"))


# ---------------------------------------------------------------------------------------------------------------
# DER / RIR
# ---------------------------------------------------------------------------------------------------------------


def test_defense_effectiveness_rating():
    assert defense_effectiveness_rating(1.0, 0.02, 0.93, 0.90) == pytest.approx(0.975)
    assert defense_effectiveness_rating(0.5, 0.7, 0.8, 0.9) == pytest.approx(0.5)  # ASR and ACC both up
    assert defense_effectiveness_rating(0.9, 0.8, 0.9, 0.6) == pytest.approx(0.4)  # ΔASR 0.1, ΔACC 0.3
    assert defense_effectiveness_rating(0.6, 0.6, 0.7, 0.7) == pytest.approx(0.5)
    assert defense_effectiveness_rating(1.0, 0.0, 0.9, 0.9) == pytest.approx(1.0)
    assert defense_effectiveness_rating(0.0, 1.0, 1.0, 0.0) == pytest.approx(0.0)


def test_robust_improvement_rating():
    assert robust_improvement_rating(0.1, 0.6, 0.9, 0.8) == pytest.approx(0.7)  # RA up 0.5, ACC down 0.1
    assert robust_improvement_rating(0.6, 0.1, 0.8, 0.9) == pytest.approx(0.5)  # RA down, ACC up: no credit
    assert robust_improvement_rating(0.2, 0.3, 0.9, 0.6) == pytest.approx(0.4)  # ΔRA 0.1, ΔACC 0.3
    assert robust_improvement_rating(0.0, 1.0, 0.9, 0.9) == pytest.approx(1.0)


@pytest.mark.parametrize("rating", [defense_effectiveness_rating, robust_improvement_rating])
@pytest.mark.parametrize("position", range(4))
@pytest.mark.parametrize("bad", [-0.01, 1.01, 98.0])
def test_ratings_reject_rates_outside_unit_interval(rating, position, bad):
    args = [0.5, 0.5, 0.5, 0.5]
    args[position] = bad
    with pytest.raises(ValueError, match="rate"):
        rating(*args)


# ---------------------------------------------------------------------------------------------------------------
# Property: selection invariants
# ---------------------------------------------------------------------------------------------------------------

_value = st.integers(0, 16).map(lambda v: v / 8)  # few distinct dyadic values: many ties


@st.composite
def _changes(draw) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(draw(st.integers(1, 3))):
        rows, cols = draw(st.integers(1, 5)), draw(st.integers(1, 6))
        values = draw(st.lists(_value, min_size=rows * cols, max_size=rows * cols))
        out[f"layer{i}"] = torch.tensor(values, dtype=torch.float32).reshape(rows, cols)
    return out


@settings(max_examples=150, deadline=None)
@given(
    changes=_changes(),
    neuron_ratio=st.floats(0.01, 1.0),
    subweight_ratio=st.floats(0.01, 1.0),
)
def test_selection_invariants(changes, neuron_ratio, subweight_ratio):
    masks, selected = select_reinit_weights(changes, neuron_ratio, subweight_ratio)
    total = sum(c.shape[0] for c in changes.values())
    n_top = int(total * neuron_ratio)
    assert sum(int(s.sum()) for s in selected.values()) == n_top

    # the selected neurons are the top ones by NWC
    nwc_sel = torch.cat([changes[n].sum(1)[selected[n]] for n in changes])
    nwc_rest = torch.cat([changes[n].sum(1)[~selected[n]] for n in changes])
    if nwc_sel.numel() and nwc_rest.numel():
        assert nwc_sel.min() >= nwc_rest.max()

    # only sub-weights of selected neurons; within them, every chosen change >= every unchosen one
    for n in changes:
        assert masks[n].shape == changes[n].shape and masks[n].dtype == torch.bool
        assert not masks[n][~selected[n]].any()
    pooled = torch.cat([changes[n][selected[n]].flatten() for n in changes])
    chosen = torch.cat([changes[n][masks[n]] for n in changes])
    rows_mask = torch.cat([masks[n][selected[n]].flatten() for n in changes])
    unchosen = pooled[~rows_mask]
    if chosen.numel() and unchosen.numel():
        # a weight the unlearning did not move is never chosen, so ties at a zero threshold stay unchosen
        assert chosen.min() >= unchosen[unchosen > 0].max() if (unchosen > 0).any() else True
    assert not (chosen == 0).any()
    k = int(pooled.numel() * subweight_ratio)
    if k > 0:
        assert chosen.numel() >= min(k, int((pooled > 0).sum()))
    else:
        assert chosen.numel() == 0
