"""Sparse initialization: the bound, the exact zero count per output unit, zero biases."""

import math

import pytest
import torch
from torch import nn

from streaming_rl.init import sparse_init_, sparse_init_module_


@pytest.mark.parametrize("shape", [(32, 4), (128, 11), (16, 4, 3, 3)])
def test_sparse_init_zeroes_a_fraction_of_each_units_inputs(shape):
    torch.manual_seed(0)
    w = sparse_init_(torch.empty(shape), 0.9)
    fan_in = math.prod(shape[1:])
    per_unit = (w.reshape(shape[0], -1) == 0).sum(1)
    assert torch.all(per_unit == int(0.9 * fan_in))  # exactly ⌊0.9·fan_in⌋; uniform draws are never 0
    assert w.abs().max() <= 1 / math.sqrt(fan_in)


def test_module_init_covers_linear_and_conv_and_zeroes_biases():
    torch.manual_seed(0)
    net = sparse_init_module_(nn.Sequential(nn.Conv2d(4, 16, 3), nn.Flatten(), nn.Linear(16 * 8 * 8, 8)))
    for layer in (net[0], net[2]):
        assert torch.all(layer.bias == 0)
        fan_in = layer.weight[0].numel()
        assert torch.all((layer.weight.reshape(layer.weight.shape[0], -1) == 0).sum(1) == int(0.9 * fan_in))
    with pytest.raises(ValueError, match="sparsity"):
        sparse_init_(torch.empty(2, 2), 1.0)
