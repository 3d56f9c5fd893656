"""DBA's functional core: the global-gradient estimate (untouched model, mean gradient, low rank, DDP-free), its
serialisation and products, the boost step, the schedule, the correction and the annealing multiplier."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_ft.optim import (
    AnnealingSchedule,
    GlobalGradient,
    LinearCorrection,
    batch_loss,
    boost_coefficient,
    boost_gradients_,
    estimate_global_gradient,
    resolve_k0,
)


def _data(n: int = 40, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 12, generator=g), torch.randint(0, 5, (n,), generator=g)), 8)


def _model(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 5))


def _manual_mean_gradient(model: nn.Module, loader: DataLoader, batches: int) -> dict[str, torch.Tensor]:
    model.train()
    sums = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i, (x, y) in enumerate(loader):
        if i == batches:
            break
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            sums[n] += p.grad
    return {n: s / batches for n, s in sums.items()}


def test_estimate_is_the_mean_gradient_and_leaves_the_model_untouched():
    model = _model(dropout=0.2).eval()
    loader = _data()
    grads = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g
    state = {k: v.clone() for k, v in model.state_dict().items()}  # parameters and BatchNorm statistics
    rng = torch.get_rng_state()
    ghat = estimate_global_gradient(model, loader, max_batches=3)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # bit-exact: no step, buffers restored
    assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))  # the user's grads, as they were
    assert not any(m.training for m in model.modules())  # eval mode restored
    assert torch.equal(torch.get_rng_state(), rng)  # dropout draws did not advance the global RNG
    assert (ghat.batches, ghat.samples) == (3, 24)
    model[3].p = 0.0  # without dropout, against a hand-written mean gradient
    ghat = estimate_global_gradient(model, loader, max_batches=3)
    reference = _manual_mean_gradient(model, loader, 3)
    for name in ghat.names:
        torch.testing.assert_close(ghat.to_dense(name), reference[name], rtol=1e-5, atol=1e-7)


def test_frozen_parameters_are_left_out():
    model = _model()
    model[0].weight.requires_grad_(False)
    ghat = estimate_global_gradient(model, _data(), max_batches=2)
    assert "0.weight" not in ghat.names and "4.weight" in ghat.names


def test_low_rank_is_close_to_the_best_rank_r_approximation_and_smaller():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5))
    loader = DataLoader(TensorDataset(torch.randn(64, 40), torch.randint(0, 5, (64,))), batch_size=16)
    dense = estimate_global_gradient(model, loader)
    low = estimate_global_gradient(model, loader, rank=3)
    assert set(low.factors) == {"0.weight", "2.weight"} and "0.bias" in low.dense
    assert low.numel() < 0.4 * dense.numel()
    g = dense.to_dense("0.weight")
    u, s, vh = torch.linalg.svd(g)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    error = (low.to_dense("0.weight") - g).norm()
    assert error <= 1.01 * (best - g).norm() + 1e-7
    # products with a low-rank entry equal those with its dense form
    grad = torch.randn(30, 40)
    torch.testing.assert_close(low.dot("0.weight", grad), (grad * low.to_dense("0.weight")).sum())
    torch.testing.assert_close(low.sq_norm("0.weight"), low.to_dense("0.weight").square().sum())
    # the factorisation is seeded: the same estimate twice is bit-identical
    again = estimate_global_gradient(model, loader, rank=3)
    assert torch.equal(again.factors["0.weight"][0], low.factors["0.weight"][0])


def test_state_dict_save_and_load_round_trip(tmp_path):
    ghat = estimate_global_gradient(_model(), _data(), max_batches=2, rank=2)
    path = tmp_path / "ghat.pt"
    ghat.save(path)
    loaded = GlobalGradient.load(path)
    assert loaded.names == ghat.names and (loaded.rank, loaded.batches, loaded.samples) == (2, 2, 16)
    for name in ghat.names:
        assert torch.equal(loaded.to_dense(name), ghat.to_dense(name))
    assert pickle.loads(pickle.dumps(ghat.state_dict()))["rank"] == 2


def test_cosine_and_the_boost_step():
    model = _model()
    ghat = estimate_global_gradient(model, _data(), max_batches=2, rank=2)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    flat_g = torch.cat([grads[n].flatten() for n in ghat.names])
    flat_h = torch.cat([ghat.to_dense(n).flatten() for n in ghat.names])
    expected = torch.nn.functional.cosine_similarity(flat_g, flat_h, dim=0)
    torch.testing.assert_close(ghat.cosine(grads), expected)
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    correction = LinearCorrection(gamma=0.5, c_min=0.5, c_max=2.0)
    cos, c = boost_gradients_(model.named_parameters(), ghat, 0.3, correction)
    torch.testing.assert_close(cos, expected)
    torch.testing.assert_close(c, (1 + 0.5 * (1 - expected)).clamp(0.5, 2.0))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, c * (grads[n] + 0.3 * ghat.to_dense(n)))


def test_randomized_control_keeps_each_norm_and_carries_no_direction():
    ghat = estimate_global_gradient(_model(), _data(), max_batches=2)
    control = ghat.randomized(seed=1)
    for name in ghat.names:
        torch.testing.assert_close(control.sq_norm(name), ghat.sq_norm(name))
    assert abs(float(control.cosine({n: ghat.to_dense(n) for n in ghat.names}))) < 0.3


def test_schedule_and_correction():
    assert resolve_k0("auto", 400) == pytest.approx(0.5)
    assert resolve_k0(0.2, 400) == 0.2
    assert boost_coefficient(0, 10, 2.0) == 2.0
    assert boost_coefficient(5, 10, 2.0) == pytest.approx(1.0)
    assert boost_coefficient(12, 10, 2.0) == 0.0
    assert boost_coefficient(7, 10, 2.0, "constant") == 2.0
    correction = LinearCorrection(gamma=1.0, c_min=0.5, c_max=2.0)
    values = correction(torch.tensor([1.0, 0.5, -1.0]))
    assert values.tolist() == [1.0, 1.5, 2.0]
    assert LinearCorrection(gamma=0.0)(torch.tensor(-1.0)).item() == 1.0
    for bad in ({"c_min": 0.0}, {"c_min": 3.0, "c_max": 2.0}, {"gamma": float("nan")}):
        with pytest.raises(ValueError, match=r"c_min|gamma"):
            LinearCorrection(**bad)
    with pytest.raises(ValueError, match="k0"):
        resolve_k0(-1.0, 10)
    with pytest.raises(ValueError, match="decay"):
        boost_coefficient(0, 10, 1.0, "cosine")  # type: ignore[arg-type]


def test_annealing_schedule_warms_up_then_decays_to_the_floor_and_checkpoints():
    schedule = AnnealingSchedule(total_steps=100, warmup_steps=10, floor=0.1)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0) and schedule(100) == pytest.approx(0.1)
    assert schedule(55) == pytest.approx(0.55)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    assert pickle.loads(pickle.dumps(scheduler.state_dict()))["lr_lambdas"][0]["total_steps"] == 100
    with pytest.raises(ValueError, match="floor"):
        AnnealingSchedule(10, floor=2.0)


def test_causal_lm_loss_is_the_hugging_face_loss():
    from tests.helpers.models import tiny_lm_module

    module = tiny_lm_module()
    ids = torch.randint(0, 1024, (3, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = -100
    batch = {"input_ids": ids, "labels": labels}
    expected = module.model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(batch_loss(module, batch), expected)
    with pytest.raises(ValueError, match="causal_lm"):
        batch_loss(module, (ids, labels), task="causal_lm")


def test_clear_errors():
    frozen = _model().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        estimate_global_gradient(frozen, _data())
    with pytest.raises(ValueError, match="no batch"):
        estimate_global_gradient(_model(), DataLoader(TensorDataset(torch.zeros(0, 12), torch.zeros(0).long())))

    class Stream(IterableDataset):
        def __iter__(self):
            yield from ((torch.randn(12), torch.tensor(1)) for _ in range(8))

    with pytest.raises(ValueError, match="max_batches"):
        estimate_global_gradient(_model(), DataLoader(Stream(), batch_size=4))
    assert estimate_global_gradient(_model(), DataLoader(Stream(), batch_size=4), max_batches=2).batches == 2
    with pytest.raises(ValueError, match="rank"):
        estimate_global_gradient(_model(), _data(), rank=0)
