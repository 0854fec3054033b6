"""rlhf/masked.py: statistics over response tokens only, against hand computations."""

import math

import pytest
import torch

from rlhf.masked import masked_mean, masked_var, masked_whiten


def test_masked_stats_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 6.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert masked_mean(x, m).item() == pytest.approx(3.0)          # (1+2+3+6)/4
    assert masked_mean(x, m, dim=-1).tolist() == [1.5, 4.5]
    assert masked_var(x, m).item() == pytest.approx(14 / 3)         # (4+1+0+9)/3
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(3.5)
    w = masked_whiten(x, m)
    assert (w * m).tolist()[0][:2] == pytest.approx([-2 / math.sqrt(14 / 3), -1 / math.sqrt(14 / 3)], rel=1e-6)
    assert masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-6)


def test_degenerate_masks_are_refused():
    with pytest.raises(ValueError, match="no tokens"):
        masked_mean(torch.ones(2), torch.zeros(2))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        masked_var(torch.ones(2), torch.tensor([1.0, 0.0]))
