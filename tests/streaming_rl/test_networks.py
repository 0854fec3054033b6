"""Networks: LayerNorm without parameters, shapes, the switches."""

import torch

from streaming_rl.networks import CategoricalPolicy, GaussianPolicy, ValueNetwork, initialize_


def test_mlp_layer_norm_has_no_parameters_and_normalizes_features():
    net = ValueNetwork((4,), 2, hidden=32)
    assert sorted(n for n, _ in net.named_parameters()) == [
        "head.bias", "head.weight", "torso.layers.0.bias", "torso.layers.0.weight",
        "torso.layers.1.bias", "torso.layers.1.weight"]
    x = torch.randn(4)
    h = torch.nn.functional.linear(x, net.torso.layers[0].weight, net.torso.layers[0].bias)
    normed = torch.nn.functional.layer_norm(h, (32,))
    assert abs(normed.mean().item()) < 1e-5 and abs(normed.var(unbiased=False).item() - 1) < 1e-3
    assert net(x).shape == (2,) and net(torch.randn(5, 4)).shape == (5, 2)


def test_switches_change_the_forward():
    torch.manual_seed(0)
    with_ln = ValueNetwork((3,), 1, hidden=8)
    torch.manual_seed(0)
    without = ValueNetwork((3,), 1, hidden=8, layer_norm=False)
    x = torch.randn(3) * 10
    assert not torch.allclose(with_ln(x), without(x))
    torch.manual_seed(0)
    sparse = initialize_(ValueNetwork((3,), 1, hidden=8), "sparse", 0.9)
    assert (sparse.torso.layers[1].weight == 0).float().mean() > 0.8
    torch.manual_seed(0)
    default = initialize_(ValueNetwork((3,), 1, hidden=8), "default", 0.9)
    assert (default.torso.layers[1].weight == 0).float().mean() < 0.1


def test_policies_and_the_minatar_conv_torso():
    mean, std = GaussianPolicy((11,), 3, hidden=128)(torch.randn(11))
    assert mean.shape == std.shape == (3,) and torch.all(std > 0)
    assert CategoricalPolicy((4,), 2, hidden=32)(torch.randn(4)).shape == (2,)
    conv = ValueNetwork((10, 10, 4), 6, hidden=128)  # MinAtar frames are (H, W, C)
    assert conv(torch.rand(10, 10, 4)).shape == (6,)
    assert conv(torch.rand(2, 10, 10, 4)).shape == (2, 6)
