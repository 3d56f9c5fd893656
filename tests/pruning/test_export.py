"""``export``: physical channel removal (same function, fewer parameters and FLOPs) and its report."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_ft.demos.vision import SmallBNCNN, mlp
from lightning_ft.pruning import attach_gates, count_flops, count_parameters, export, find_gates, make_permanent
from tests.helpers.models import tiny_lm

# SmallBNCNN: features = conv0 bn1 relu2 | conv3 bn4 relu5 pool6 | conv7 bn8 relu9 gap10 flatten11, then fc; the
# last link leaves the `features` Sequential, so the automatic search cannot see it
CNN_CHAINS = [("features.7", "features.8", "fc")]


def prune_half(model: nn.Module, seed: int = 1, **kwargs) -> dict[str, torch.Tensor]:
    """Gate ``model`` and mask a random half (at least one, never all) of each gated layer."""
    gated = attach_gates(model, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for g in gated:
        mask = torch.randperm(g.num_neurons, generator=generator) >= g.num_neurons // 2
        g.gate.mask = mask
        masks[g.name] = mask
    return masks


def outputs(model: nn.Module, x: torch.Tensor, train: bool) -> torch.Tensor:
    model = copy.deepcopy(model)  # train mode updates BatchNorm running statistics
    model.train(train)
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def assert_same_function(a: nn.Module, b: nn.Module, x: torch.Tensor, modes=(False, True)) -> None:
    for train in modes:
        torch.testing.assert_close(outputs(a, x, train), outputs(b, x, train), atol=1e-5, rtol=1e-5)


def test_export_small_bn_cnn():
    torch.manual_seed(0)
    model = SmallBNCNN(width=8)
    model.train()
    with torch.no_grad():  # non-trivial running statistics for the eval-mode comparison
        for _ in range(3):
            model(torch.rand(16, 1, 8, 8))
    masks = prune_half(model)
    x = torch.rand(8, 1, 8, 8)
    gated_params = count_parameters(model)
    small, report = export(model, example_input=x, chains=CNN_CHAINS)

    assert len(find_gates(model)) == 3  # not in place: the gated model is untouched
    assert find_gates(small) == []
    assert_same_function(model, small, x)

    pruned = {name: int((~m).sum()) for name, m in masks.items()}
    producers = {"features.1": "features.0", "features.4": "features.3", "features.8": "features.7"}
    assert report.removed == {producers[name]: n for name, n in pruned.items()}
    assert report.not_removed == {}
    assert sum(report.removed.values()) == sum(pruned.values())
    kept = {name: int(m.sum()) for name, m in masks.items()}
    f = small.features
    assert (f[0].out_channels, f[1].num_features, f[3].in_channels) == (kept["features.1"],) * 3
    assert (f[3].out_channels, f[4].num_features, f[7].in_channels) == (kept["features.4"],) * 3
    assert (f[7].out_channels, f[8].num_features, small.fc.in_features) == (kept["features.8"],) * 3
    assert f[1].running_mean.shape == (kept["features.1"],)

    plain = SmallBNCNN(width=8)
    assert report.params_before == count_parameters(plain) == gated_params - sum(m.numel() for m in masks.values())
    assert report.params_after == count_parameters(small) < report.params_before
    assert report.param_reduction == pytest.approx(1 - report.params_after / report.params_before)
    assert report.flops_before == count_flops(plain, x) and report.flops_after == count_flops(small, x)
    assert report.flop_reduction > 0.5  # halving every conv's channels roughly quarters the inner convs
    assert report.to_dict()["removed"] == report.removed


def test_export_without_the_extra_chain_leaves_the_last_channels_in_place():
    torch.manual_seed(0)
    model = SmallBNCNN(width=4)
    masks = prune_half(model)
    x = torch.rand(4, 1, 8, 8)
    small, report = export(model, example_input=x)
    assert set(report.removed) == {"features.0", "features.3"}
    assert report.not_removed == {"features.8": int((~masks["features.8"]).sum())}
    assert small.fc.in_features == 16  # the zeros stay
    assert_same_function(model, small, x)


def test_export_in_place_and_of_a_model_already_made_permanent():
    torch.manual_seed(0)
    model = SmallBNCNN(width=4)
    masks = prune_half(model)
    x = torch.rand(4, 1, 8, 8)
    reference = copy.deepcopy(model)
    make_permanent(model)
    small, report = export(model, chains=CNN_CHAINS, inplace=True)
    assert small is model
    assert report.flops_before is None and report.flop_reduction is None
    # the pruned channels are found from their zeros (gamma = beta = 0)
    assert report.removed == {
        name: int((~masks[bn]).sum())
        for name, bn in [("features.0", "features.1"), ("features.3", "features.4"), ("features.7", "features.8")]
    }
    assert report.params_after == count_parameters(model) < report.params_before
    assert_same_function(reference, small, x)


def test_export_sequential_mlp_and_conv_flatten_linear():
    torch.manual_seed(0)
    net = mlp(64, 10, 16)  # flatten, linear1, relu, linear3, relu, linear5
    masks = prune_half(net, layer_types=("linear",), include=(r"^[13]$",))
    x = torch.rand(6, 1, 8, 8)
    small, report = export(net, example_input=x)
    assert report.removed == {name: int((~m).sum()) for name, m in masks.items()}
    assert small[1].out_features == small[3].in_features == int(masks["1"].sum())
    assert small[3].out_features == small[5].in_features == int(masks["3"].sum())
    assert report.params_after == count_parameters(small) < report.params_before
    assert report.flop_reduction > 0
    assert_same_function(net, small, x)

    # conv -> BN -> ReLU -> Flatten -> Linear: each channel is 8 * 8 consecutive features of the linear layer
    torch.manual_seed(0)
    conv_net = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(384, 10)
    )
    masks = prune_half(conv_net)
    small, report = export(conv_net, example_input=x)
    kept = int(masks["1"].sum())
    assert report.removed == {"0": 6 - kept}
    assert small[0].out_channels == kept and small[4].in_features == 64 * kept
    assert_same_function(conv_net, small, x)


def test_export_timm_resnet_blocks_and_residual_channels():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=1)
    # bn1 of every block (inside the block: removable), bn2 of layer1.0 (feeds the residual sum: not removable)
    masks = prune_half(model, include=(r"layer\d\.\d+\.bn1$", r"layer1\.0\.bn2$"))
    assert set(masks) == {"layer1.0.bn1", "layer2.0.bn1", "layer3.0.bn1", "layer4.0.bn1", "layer1.0.bn2"}
    x = torch.rand(4, 1, 32, 32)
    small, report = export(model, example_input=x)
    removed = {name[: -len("bn1")] + "conv1": int((~m).sum()) for name, m in masks.items() if name.endswith("bn1")}
    assert report.removed == removed
    assert report.not_removed == {"layer1.0.bn2": int((~masks["layer1.0.bn2"]).sum())}
    for block in ("layer1", "layer2", "layer3", "layer4"):
        b = getattr(small, block)[0]
        kept = int(masks[f"{block}.0.bn1"].sum())
        assert b.conv1.out_channels == b.bn1.num_features == b.conv2.in_channels == kept
    assert small.layer1[0].bn2.num_features == 32  # residual channels keep their width (zeros)
    assert report.params_after == count_parameters(small) < report.params_before
    assert report.flop_reduction > 0
    assert_same_function(model, small, x)


def test_export_gpt2_mlp():
    model = tiny_lm(n_layer=2)
    masks = prune_half(model, layer_types=("hf_conv1d",), include=(r"mlp\.c_fc",))
    assert set(masks) == {"transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"}
    ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(0))
    small, report = export(model, example_input=ids)
    assert report.removed == {name: int((~m).sum()) for name, m in masks.items()}
    for i in range(2):
        mlp_block = small.transformer.h[i].mlp
        kept = int(masks[f"transformer.h.{i}.mlp.c_fc"].sum())
        assert mlp_block.c_fc.nf == mlp_block.c_fc.weight.shape[1] == mlp_block.c_fc.bias.shape[0] == kept
        assert mlp_block.c_proj.weight.shape == (kept, 32) and mlp_block.c_proj.nx == kept
    assert report.params_after == count_parameters(small) < report.params_before
    assert report.flop_reduction > 0
    assert_same_function(model, small, ids)  # dropout 0: train mode is deterministic too


def test_bad_chains_entries_raise():
    model = SmallBNCNN(width=4)
    prune_half(model)
    for chain, what in [
        (("features.7", "features.9", "fc"), "affine BatchNorm"),  # a ReLU in the BatchNorm slot
        (("features.8", None, "fc"), "conv/linear"),  # a BatchNorm as producer
        (("features.7", "features.8", "head"), "conv/linear"),  # no such module
        (("features.7", "features.8", "features.10"), "conv/linear"),  # pooling as consumer
    ]:
        with pytest.raises(ValueError, match=f"chain entry .* must name (an? )?{what}"):
            export(model, chains=[chain])
    with pytest.raises(ValueError, match="cannot map"):  # 16 channels onto the 1 input channel of features.0
        export(model, chains=[("features.7", "features.8", "features.0")])
    assert len(find_gates(model)) == 3  # a failed export leaves the model alone


def test_a_failing_in_place_export_leaves_a_working_model():
    torch.manual_seed(0)
    model = SmallBNCNN(width=4)
    prune_half(model)
    x = torch.rand(4, 1, 8, 8)
    reference = copy.deepcopy(model)
    with pytest.raises(ValueError, match="cannot map"):
        export(model, chains=[("features.7", "features.8", "features.0")], inplace=True)
    # the chains before the bad one may have been removed, but no chain is left half-done
    assert_same_function(reference, model, x)


class Plain(nn.Module):
    """conv-BN-ReLU twice, GAP, fc, as attributes (no Sequential, no block names): no chain is found automatically."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.n2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.n1(self.c1(x)))
        x = torch.relu(self.n2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def test_a_wrong_chain_that_fits_the_shapes_is_caught_by_the_output_check():
    torch.manual_seed(0)
    model = Plain()
    prune_half(model)
    x = torch.rand(4, 1, 8, 8)
    # c1 has 4 channels and fc 4 inputs, so the shapes alone cannot tell that c1 does not feed fc
    with pytest.raises(ValueError, match="output differs"):
        export(model, example_input=x, chains=[("c1", "n1", "fc")])
    small, report = export(model, example_input=x, chains=[("c1", "n1", "c2"), ("c2", "n2", "fc")])
    assert report.removed == {"c1": 2, "c2": 2}
    assert_same_function(model, small, x)


def test_a_chain_that_contradicts_the_structure_is_rejected():
    model = SmallBNCNN(width=4)
    prune_half(model)
    with pytest.raises(ValueError, match="conflicts with the chain found"):
        export(model, chains=[("features.3", "features.4", "fc")])
    export(model, chains=[("features.3", "features.4", "features.7"), *CNN_CHAINS])  # the same chain again is fine
