"""The Stateful pieces of a run round-trip through a checkpoint, and the RNG streams fit a
checkpoint saved on another device or world size (CUDA simulated: there is no GPU here)."""

import random

import numpy as np
import torch
from torch import nn

from trainer.checkpoint import Checkpointer
from trainer.checkpoint.state import ModelState, OptimizerState, Progress, RNGState, TensorDict


def trained(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 1e-2},
                             {"params": model[2].parameters(), "lr": 3e-3, "weight_decay": 0.0}])
    for _ in range(2):
        model(torch.randn(4, 6)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_model_and_optimizer_round_trip(tmp_path):
    model, opt = trained(0)
    ck = Checkpointer(tmp_path)
    path = ck.save(2, {"model": ModelState([model]), "optimizer": OptimizerState([model], opt)})
    fresh, fresh_opt = trained(1)  # other weights, other moments
    ck.load(path, {"model": ModelState([fresh]), "optimizer": OptimizerState([fresh], fresh_opt)})
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), fresh.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], fresh_opt.state[q][key]), key
    assert [g["lr"] for g in fresh_opt.param_groups] == [1e-2, 3e-3]
    assert fresh_opt.param_groups[1]["weight_decay"] == 0.0


def test_progress_and_tensor_dict_round_trip(tmp_path):
    progress = Progress(step=7, samples=56, tokens=1792, extra={"episode": 3})
    tensors = {"a": torch.arange(5.0), "b": torch.ones(2, 2, dtype=torch.int64)}
    path = Checkpointer(tmp_path).save(7, {"progress": progress, "t": TensorDict(dict(tensors))})
    back, into = Progress(), {"a": torch.zeros(5), "b": torch.zeros(2, 2, dtype=torch.int64)}
    Checkpointer(tmp_path).load(path, {"progress": back, "t": TensorDict(into)})
    assert back == progress
    assert all(torch.equal(into[k], v) for k, v in tensors.items())


def draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def save_rng(directory, rank: int = 0, step: int = 5):
    torch.manual_seed(11), np.random.seed(11), random.seed(11)
    ck = Checkpointer(directory, meta={"world_size": 1})
    path = ck.save(step, {"rng": RNGState(rank), "progress": Progress(step)})
    return path, draws()  # what a run that never stopped draws next


def test_rng_streams_resume_exactly(tmp_path):
    path, expected = save_rng(tmp_path)
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    Checkpointer(tmp_path).load(path, {"rng": RNGState(0)})
    assert draws() == expected


class FakeCuda:
    """torch.cuda as a run on a GPU sees it: initialised, with a generator state of its own."""

    def __init__(self, monkeypatch):
        self.state = torch.arange(16, dtype=torch.uint8)
        self.set_to, self.seeds = [], []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a, **k: self.state.clone())
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, *a, **k: self.set_to.append(s.clone()))
        monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: self.seeds.append(seed))
        monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: self.seeds.append(seed))


def test_a_cpu_checkpoint_resumes_on_a_gpu_seeding_its_cuda_generator(tmp_path, monkeypatch):
    path, expected = save_rng(tmp_path)
    cuda = FakeCuda(monkeypatch)
    said = []
    for _ in range(2):  # the same seed every time this checkpoint is resumed
        Checkpointer(tmp_path).load(path, {"rng": RNGState(0, say=said.append)})
        assert draws() == expected
    assert len(cuda.seeds) == 2 and cuda.seeds[0] == cuda.seeds[1] and cuda.set_to == []
    assert len(said) == 2 and "no CUDA RNG stream" in said[0] and "seeded" in said[0]


def test_a_gpu_checkpoint_resumes_on_a_cpu_and_on_a_gpu(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        FakeCuda(m)
        path, expected = save_rng(tmp_path)
    Checkpointer(tmp_path).load(path, {"rng": RNGState(0)})  # no GPU now: the CUDA stream is skipped
    assert draws() == expected
    cuda = FakeCuda(monkeypatch)
    cuda.state = torch.zeros(16, dtype=torch.uint8)
    Checkpointer(tmp_path).load(path, {"rng": RNGState(0)})
    assert draws() == expected
    assert len(cuda.set_to) == 1 and torch.equal(cuda.set_to[0], torch.arange(16, dtype=torch.uint8))
    assert cuda.seeds == []


def test_a_rank_the_saving_run_did_not_have_is_reseeded(tmp_path):
    path, expected = save_rng(tmp_path, rank=0, step=5)
    said, outcomes = [], []
    for _ in range(2):
        progress = Progress()
        Checkpointer(tmp_path).load(path, {"rng": RNGState(1, seed=3, say=said.append), "progress": progress})
        assert progress.step == 5  # the other components load as usual
        outcomes.append(draws())
    assert outcomes[0] == outcomes[1] != expected  # deterministic, and not rank 0's stream
    assert len(said) == 2 and "no RNG stream for this rank" in said[0] and "(seed 3, rank 1, step 5)" in said[0]


def test_reseeding_differs_by_rank_and_step():
    seen = set()
    for rank, step in [(0, 5), (1, 5), (0, 6)]:
        RNGState(rank, seed=3).reseed(step)
        seen.add(tuple(draws()[0]))
    assert len(seen) == 3

