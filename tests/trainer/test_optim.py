"""LR schedule against its closed form; weight decay only on matrices."""

import math

import pytest
import torch

from trainer.config import OptimConfig
from trainer.optim import build_optimizer, build_scheduler, lr_factor


def test_warmup_then_cosine_closed_form():
    assert lr_factor(0, 10, 110, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(110, 10, 110, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(60, 10, 110, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(500, 10, 110, "constant", 0.1) == 1.0


def test_scheduler_drives_optimizer_and_groups_split_decay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    cfg = OptimConfig(lr=1.0, warmup_steps=2, weight_decay=0.5)
    opt = build_optimizer([model], cfg)
    decays = {p.ndim: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays == {2: 0.5, 1: 0.0}
    sched = build_scheduler(opt, cfg, total_steps=10)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:3] == [0.5, 1.0, 1.0] and seen[3] < 1.0
