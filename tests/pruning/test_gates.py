"""Per-neuron gates: identity at 1, masking, straight-through gradients, HardConcrete, top-k masks, the cubic
schedule, make-permanent, errors and deep copies."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from lightning_ft.demos.vision import SmallBNCNN, mlp
from lightning_ft.pruning import (
    NeuronGate,
    attach_gates,
    cubic_sparsity,
    find_gates,
    gate_penalty_grad,
    make_permanent,
    num_pruned,
    remove_gates,
    topk_keep_masks,
)
from lightning_ft.pruning.gates import GATE_ATTR, HC_BETA, HC_GAMMA, HC_ZETA
from tests.helpers.models import tiny_lm

GPT2_GATES = {"layer_types": ("hf_conv1d",), "include": (r"mlp\.c_fc",)}


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallBNCNN(width=4)


def linear_mlp() -> nn.Module:
    torch.manual_seed(0)
    return mlp(64, 10, 16)


def gpt2() -> nn.Module:
    return tiny_lm(n_layer=2)


# (factory, attach_gates kwargs, input)
MODELS = {
    "cnn": (cnn, {"layer_types": ("bn",)}, lambda: torch.rand(6, 1, 8, 8)),
    "mlp": (linear_mlp, {"layer_types": ("linear",)}, lambda: torch.rand(6, 1, 8, 8)),
    "gpt2": (gpt2, GPT2_GATES, lambda: torch.randint(0, 1024, (2, 12))),
}


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def random_masks(gated, generator: torch.Generator | None = None) -> None:
    generator = generator or torch.Generator().manual_seed(1)
    for g in gated:
        mask = torch.rand(g.num_neurons, generator=generator) > 0.5
        mask[0] = False  # at least one pruned and one kept neuron per layer
        mask[-1] = True
        g.gate.mask = mask


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(("gate_type", "train"), [("sigmoid", True), ("sigmoid", False), ("hard_concrete", False)])
def test_gates_at_one_leave_outputs_bit_identical(name, gate_type, train):
    factory, kwargs, make_input = MODELS[name]
    torch.manual_seed(0)
    x = make_input()
    plain, gated = factory(), factory()
    gated_layers = attach_gates(gated, gate_type=gate_type, **kwargs)
    assert gated_layers and all(g.gate.mask is None for g in gated_layers)
    if gate_type == "hard_concrete":  # the default init 3: the eval gate clamps to exactly 1
        assert all(torch.equal(g.gate.deterministic(), torch.ones(g.num_neurons)) for g in gated_layers)
    plain.train(train)
    gated.train(train)
    with torch.no_grad():
        assert torch.equal(run(gated, x), run(plain, x))


def _capture(module: nn.Module, store: list) -> None:
    module.register_forward_hook(lambda mod, inp, out: store.append(out.detach().clone()))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("gate_type", ["sigmoid", "hard_concrete"])
def test_masked_neurons_output_exactly_zero(name, gate_type):
    factory, kwargs, make_input = MODELS[name]
    torch.manual_seed(0)
    x = make_input()
    plain, gated = factory(), factory()
    gated_layers = attach_gates(gated, gate_type=gate_type, **kwargs)
    random_masks(gated_layers)
    plain_modules = dict(plain.named_modules())
    outputs = {}
    for g in gated_layers:  # registered after the gate hook: sees the gated output
        outputs[g.name] = ([], [])
        _capture(g.module, outputs[g.name][0])
        _capture(plain_modules[g.name], outputs[g.name][1])
    for model in (plain, gated):
        model.eval()  # HardConcrete: the deterministic gate (1 at init 3) times the mask
    with torch.no_grad():
        run(plain, x), run(gated, x)
    for g in gated_layers:
        (out,), (ref,) = outputs[g.name]
        channel_dim = -1 if g.kind in ("linear", "hf_conv1d") else 1
        out, ref = out.movedim(channel_dim, 0), ref.movedim(channel_dim, 0)
        mask = g.gate.mask
        assert torch.all(out[~mask] == 0), g.name
        if g is gated_layers[0]:  # upstream of any pruning: the kept channels are untouched
            assert torch.equal(out[mask], ref[mask])


def test_a_masked_neuron_gets_the_straight_through_gradient_dl_dz():
    torch.manual_seed(0)
    # tanh'(0) = 1: a zeroed channel still passes gradient (a ReLU would block it at 0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x, target = torch.randn(8, 5), torch.randn(8, 3)
    (g,) = attach_gates(model, layer_types=("linear",), include=(r"^0$",))
    mask = torch.tensor([True, False, True, False, True, True])
    g.gate.mask = mask
    nn.functional.mse_loss(model(x), target).backward()

    # reference: the same network with an explicit multiplicative gate z = mask, differentiated by autograd
    plain = copy.deepcopy(model)
    remove_gates(plain)
    z = mask.float().requires_grad_(True)
    out = plain[2](plain[1](plain[0](x) * z))
    (dz,) = torch.autograd.grad(nn.functional.mse_loss(out, target), z)

    grad = g.gate.scores.grad
    assert torch.allclose(grad, dz, atol=1e-7)
    assert torch.all(grad[~mask].abs() > 1e-6)  # pruned neurons can still move

    # the same for HardConcrete in eval mode (gate 1 at init 3): straight through the clamp is not assumed,
    # but the masked neurons still receive dL/dz
    model.zero_grad(set_to_none=True)
    remove_gates(model)
    (hc,) = attach_gates(model, layer_types=("linear",), include=(r"^0$",), gate_type="hard_concrete", init=0.0)
    hc.gate.mask = mask
    model.eval()
    nn.functional.mse_loss(model(x), target).backward()
    s = hc.gate.scores.detach()
    z_eval = torch.sigmoid(s) * (HC_ZETA - HC_GAMMA) + HC_GAMMA  # in (0, 1) at init 0: no clamp
    z = (z_eval * mask).requires_grad_(True)
    out = plain[2](plain[1](plain[0](x) * z))
    (dz,) = torch.autograd.grad(nn.functional.mse_loss(out, target), z)
    expected = dz * torch.sigmoid(s) * (1 - torch.sigmoid(s)) * (HC_ZETA - HC_GAMMA)  # chain rule through z(s)
    assert torch.allclose(hc.gate.scores.grad, expected, atol=1e-7)
    assert torch.all(hc.gate.scores.grad[~mask].abs() > 1e-7)


def test_hard_concrete_test_time_gate_and_density():
    gate = NeuronGate(7, "hard_concrete")
    assert torch.equal(gate.scores.detach(), torch.full((7,), 3.0))
    with torch.no_grad():
        gate.scores.copy_(torch.tensor([-6.0, -2.4, -1.0, 0.0, 0.5, 2.4, 6.0]))
    gate.eval()
    s = gate.scores.detach()
    expected = torch.clamp(torch.sigmoid(s) * (1.1 - (-0.1)) + (-0.1), 0.0, 1.0)
    assert torch.allclose(gate.value().detach(), expected)
    assert torch.equal(gate.deterministic(), gate.value().detach())
    assert gate.value()[0] == 0 and gate.value()[-1] == 1  # the stretch reaches exact 0 and 1
    assert torch.allclose(gate.density(), torch.sigmoid(s - 2.0 / 3.0 * math.log(0.1 / 1.1)))
    gate.mask = torch.tensor([True, True, False, True, True, True, False])
    assert torch.equal(gate.value().detach(), expected * gate.mask)


def test_hard_concrete_training_samples():
    gate = NeuronGate(5, "hard_concrete", init=0.0)
    gate.train()
    u = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    gate.noise = u
    s = gate.scores.detach()
    stretched = torch.sigmoid((torch.log(u) - torch.log(1 - u) + s) / HC_BETA) * (HC_ZETA - HC_GAMMA) + HC_GAMMA
    assert torch.allclose(gate.value().detach(), stretched.clamp(0, 1), atol=1e-6)

    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(2000):
        gate.noise = torch.rand(5, generator=generator)
        samples.append(gate.value().detach())
    z = torch.stack(samples)
    assert z.min() >= 0 and z.max() <= 1
    assert (z == 0).any() and (z == 1).any()
    assert ((z > 0) & (z < 1)).any()
    # empirically, P(z > 0) matches the expected-L0 density (2,000 draws x 5 neurons at the same score)
    assert abs((z > 0).float().mean().item() - gate.density()[0].item()) < 0.02

    gate.noise = None  # no fixed noise: drawn from the global RNG, different per forward
    assert not torch.equal(gate.value(), gate.value())


def test_gate_penalty_grad_equals_autograd_of_mean_density():
    torch.manual_seed(0)
    for gate_type in ("sigmoid", "hard_concrete"):
        gates = [NeuronGate(n, gate_type) for n in (3, 5, 8)]
        for g in gates:
            with torch.no_grad():
                g.scores.normal_(0, 2)
        torch.cat([g.density() for g in gates]).mean().backward()
        for g, grad in zip(gates, gate_penalty_grad(gates), strict=True):
            assert torch.allclose(grad, g.scores.grad, atol=1e-8)
    sigmoid = NeuronGate(4, "sigmoid")
    assert torch.equal(sigmoid.density().detach(), torch.full((4,), 0.5))


@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.5, 0.75, 0.99])
@pytest.mark.parametrize("min_keep", [0, 1, 3])
def test_topk_layer_scope_prunes_floor_share_of_each_layer(sparsity, min_keep):
    torch.manual_seed(0)
    scores = [torch.randn(n) for n in (1, 4, 7, 10)]
    masks = topk_keep_masks(scores, sparsity, "layer", min_keep)
    for s, m in zip(scores, masks, strict=True):
        n = s.numel()
        k = min(math.floor(sparsity * n + 1e-9), max(n - min_keep, 0))
        assert m.dtype == torch.bool and m.shape == s.shape
        assert int((~m).sum()) == k
        assert int(m.sum()) >= min(min_keep, n)
        if 0 < k < n:  # the lowest-scoring neurons are the pruned ones
            assert s[~m].max() < s[m].min()
    assert sum(int((~m).sum()) for m in masks) == num_pruned([s.numel() for s in scores], sparsity, "layer", min_keep)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.6, 0.9])
@pytest.mark.parametrize("min_keep", [0, 1, 2])
def test_topk_global_scope_total_count_and_min_keep(sparsity, min_keep):
    torch.manual_seed(0)
    # one layer scores far below the others: a global ranking would empty it without min_keep
    scores = [torch.randn(6) - 10, torch.randn(9), torch.randn(5) + 1]
    masks = topk_keep_masks(scores, sparsity, "global", min_keep)
    sizes = [s.numel() for s in scores]
    expected = min(math.floor(sparsity * sum(sizes) + 1e-9), sum(sizes) - min_keep * len(sizes))
    assert sum(int((~m).sum()) for m in masks) == expected == num_pruned(sizes, sparsity, "global", min_keep)
    for m in masks:
        assert int(m.sum()) >= min_keep
    # the pruned neurons are the lowest-scoring among the unprotected ones
    flat_s, flat_m = torch.cat(scores), torch.cat(masks)
    if min_keep == 0 and 0 < expected < flat_s.numel():
        assert flat_s[~flat_m].max() < flat_s[flat_m].min()
    if sparsity == 0.6 and min_keep == 1:
        assert int(masks[0].sum()) == 1  # the low layer keeps exactly its protected best neuron


def test_topk_ties_are_deterministic_by_position():
    scores = [torch.zeros(5), torch.zeros(3)]
    layer = topk_keep_masks(scores, 0.5, "layer")
    assert layer[0].tolist() == [False, False, True, True, True] and layer[1].tolist() == [False, True, True]
    first = topk_keep_masks(scores, 0.5, "global", min_keep=1)
    for _ in range(3):
        again = topk_keep_masks([s.clone() for s in scores], 0.5, "global", min_keep=1)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert sum(int((~m).sum()) for m in first) == 4 and all(m.sum() >= 1 for m in first)
    # equal scores across layers: the earlier positions go first
    assert topk_keep_masks([torch.zeros(2), torch.zeros(2)], 0.5, "global", min_keep=0)[0].tolist() == [False, False]


def test_cubic_sparsity_schedule():
    assert cubic_sparsity(50, 100, 0.5, start=0.0, end=1.0) == pytest.approx(0.4375)
    total, final = 200, 0.8
    t1, t2 = 0.1 * total, 0.7 * total
    assert cubic_sparsity(0, total, final) == 0.0
    assert cubic_sparsity(int(t1), total, final) == 0.0  # at t_w1: still the initial value
    mid = int((t1 + t2) / 2)
    assert cubic_sparsity(mid, total, final) == pytest.approx(final * (1 - 0.5**3))
    assert cubic_sparsity(int(t2), total, final) == final  # at T - t_w2: the target
    assert cubic_sparsity(total, total, final) == final
    assert cubic_sparsity(t1 + 1, total, final, initial=0.2) > 0.2
    values = [cubic_sparsity(t, total, final) for t in range(total + 1)]
    assert all(a <= b for a, b in itertools.pairwise(values))  # monotone
    with pytest.raises(ValueError, match="start"):
        cubic_sparsity(0, 10, 0.5, start=0.8, end=0.2)


def _fold(model: nn.Module, gate_type: str, kwargs: dict) -> list:
    gated = attach_gates(model, gate_type=gate_type, **kwargs)
    random_masks(gated)
    if gate_type == "hard_concrete":  # fractional eval gates too
        generator = torch.Generator().manual_seed(2)
        for g in gated:
            with torch.no_grad():
                g.gate.scores.copy_(torch.randn(g.num_neurons, generator=generator) * 2)
    return gated


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("gate_type", ["sigmoid", "hard_concrete"])
def test_make_permanent_preserves_eval_outputs_and_restores_the_plain_state_dict(name, gate_type):
    factory, kwargs, make_input = MODELS[name]
    torch.manual_seed(0)
    x = make_input()
    model = factory()
    plain_keys = list(factory().state_dict())
    gated = _fold(model, gate_type, kwargs)
    masks = {g.name: g.gate.mask.clone() for g in gated}
    model.eval()
    with torch.no_grad():
        expected = run(model, x)
    pruned = make_permanent(model)

    assert find_gates(model) == []
    for module in model.modules():
        assert not hasattr(module, GATE_ATTR)
        assert all(getattr(h, "__name__", "") != "_gate_hook" for h in module._forward_hooks.values())
    assert list(model.state_dict()) == plain_keys
    assert set(pruned) == set(masks) and all(pruned[k] >= int((~m).sum()) for k, m in masks.items())
    with torch.no_grad():
        out = run(model, x)
    assert torch.allclose(out, expected, atol=1e-5)
    if gate_type == "sigmoid":  # binary gates fold exactly
        assert torch.equal(out, expected)

    # pruned neurons: zero weights and bias, so zero outputs
    modules = dict(model.named_modules())
    outputs: dict[str, list] = {}
    for layer, mask in masks.items():
        outputs[layer] = []
        _capture(modules[layer], outputs[layer])
        out_dim = 1 if name == "gpt2" else 0
        weight = modules[layer].weight.detach().movedim(out_dim, 0)
        assert torch.all(weight[~mask] == 0) and torch.all(modules[layer].bias.detach()[~mask] == 0)
    with torch.no_grad():
        run(model, x)
    for layer, mask in masks.items():
        channel_dim = 1 if name == "cnn" else -1
        assert torch.all(outputs[layer][0].movedim(channel_dim, 0)[~mask] == 0)

    fresh = factory()
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(run(fresh, x), out)


def test_make_permanent_on_a_model_in_train_mode_uses_the_eval_gate():
    model = cnn()
    gated = attach_gates(model, gate_type="hard_concrete", init=0.0)
    model.train()
    z = {g.name: (torch.sigmoid(torch.tensor(0.0)) * 1.2 - 0.1).item() for g in gated}
    gammas = {g.name: g.module.weight.detach().clone() for g in gated}
    make_permanent(model)
    modules = dict(model.named_modules())
    for name, value in z.items():
        assert torch.allclose(modules[name].weight.detach(), gammas[name] * value)
    assert all(g.gate.training for g in gated)  # the gate's mode was restored before removal


def test_errors():
    with pytest.raises(ValueError, match="gate_type"):
        attach_gates(cnn(), gate_type="l0")
    with pytest.raises(ValueError, match="gate_type"):
        NeuronGate(3, "topk")
    for sparsity in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="sparsity"):
            topk_keep_masks([torch.zeros(3)], sparsity)
    with pytest.raises(ValueError, match="scope"):
        topk_keep_masks([torch.zeros(3)], 0.5, scope="net")
    with pytest.raises(ValueError, match="no eligible layer"):
        attach_gates(linear_mlp(), layer_types=("bn",))
    with pytest.raises(ValueError, match="no eligible layer"):
        attach_gates(cnn(), include=("nothing_matches",))
    with pytest.raises(ValueError, match="types"):
        attach_gates(cnn(), layer_types=("attention",))
    model = cnn()
    attach_gates(model)
    with pytest.raises(ValueError, match="already gated"):
        attach_gates(model)
    with pytest.raises(ValueError, match="already gated"):
        attach_gates(model, gate_type="hard_concrete")
    assert remove_gates(model) == 3
    assert len(attach_gates(model)) == 3  # gating again after removal works


def test_deep_copy_of_a_gated_model():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 8, 8)
    model = cnn()
    gated = attach_gates(model)
    random_masks(gated)
    model.eval()
    clone = copy.deepcopy(model)
    clone_gates = find_gates(clone)
    assert [g.name for g in clone_gates] == [g.name for g in gated]
    assert all(a.gate is not b.gate for a, b in zip(gated, clone_gates, strict=True))
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(clone(x), expected)
        clone_gates[0].gate.mask = torch.ones(4, dtype=torch.bool)  # the copy's gates are its own
        assert torch.equal(model(x), expected) and not torch.equal(clone(x), expected)

    # make_permanent and remove_gates find the copied hooks by identity
    reference = copy.deepcopy(model)
    make_permanent(clone)
    assert find_gates(clone) == [] and all(not m._forward_hooks for m in clone.modules())
    assert remove_gates(reference) == 3 and all(not m._forward_hooks for m in reference.modules())
    assert len(find_gates(model)) == 3  # the original keeps its gates
    with torch.no_grad():
        assert torch.equal(model(x), expected)
