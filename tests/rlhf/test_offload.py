"""rlhf/workers/offload.py: moving a role's state away and back keeps every value and the
optimizer's hold on its parameters (the next steps equal an unmoved twin's, bit for bit), and
counts the bytes; roles whose storage is shared elsewhere say why they stay."""

import copy

import torch

from rlhf.workers.offload import HOST, Offloader, move_state, state_bytes


def twins():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    loss = model(torch.randn(5, 8, generator=g)).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)  # gradients kept: they move too


def test_state_moved_away_and_back_trains_as_if_it_never_left():
    a, opt_a = twins()
    b, opt_b = copy.deepcopy(a), None
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    for seed in range(3):
        step(a, opt_a, seed)
        step(b, opt_b, seed)
        before = [p.data_ptr() for p in b.parameters()]
        expected = state_bytes([b], opt_b)
        assert move_state([b], opt_b, HOST) == expected  # a fresh copy on a CPU host
        assert all(p.data_ptr() != q for p, q in zip(b.parameters(), before))
        move_state([b], opt_b, HOST)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert opt_b.param_groups[0]["params"][0] is next(b.parameters())


class Worker:
    def __init__(self, **kw):
        self.parts, self.optimizer, self.device, self.engine, self.hybrid = [twins()[0]], None, HOST, None, None
        self.__dict__.update(kw)


def test_the_offloader_moves_once_each_way_and_skips_shared_storage():
    w = Worker()
    off = Offloader(w)
    size = state_bytes(w.parts, None)
    assert off.offload() == size and off.offload() == 0 and off.on_host
    assert off.onload() == size and off.onload() == 0 and off.moved == 2 * size
    pinned = Offloader(Worker(hybrid=object()))
    assert pinned.offload() == 0 and "generation buffers" in pinned.reason_not()
