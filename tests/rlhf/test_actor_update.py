"""rlhf/workers/actor.py `policy_gradients`: the gradient of a mini-batch does not depend on how it is
split over data-parallel workers or micro-batches, in every loss aggregation mode (1e-6)."""

import dataclasses

import pytest
import torch

from parallel.mesh import ParallelDims, build_mesh
from parallel.parallelize import parallelize
from rlhf.config import RLHFOptions
from rlhf.losses import LOSS_AGG_MODES, loss_scale
from rlhf.rollout import sample
from rlhf.workers.actor import policy_gradients
from trainer.config import ModelConfig, ParallelConfig
from trainer.launch.forked import run_ranks
from trainer.models import build_model

CFG = ModelConfig(name="llama_partition", vocab_size=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  ffn_dim=64, max_seq_len=32, init_std=0.2)
ROWS = 8


def make_batch():
    """Sampled responses cut to different lengths, with advantages and perturbed old log-probs."""
    model = build_model(CFG, seed=0)
    gen = torch.Generator().manual_seed(1)
    prompts = [[1, 5, 6, 7], [1, 9], [1, 4, 4], [1, 8, 2, 2, 2]] * 2
    out = sample(model, prompts, 6, generator=gen)
    lengths = torch.tensor([1, 6, 3, 2, 5, 6, 4, 1])
    out.tensors["response_mask"] = torch.arange(6)[None, :] < lengths[:, None]
    out = out.union(type(out)({"advantages": torch.randn(ROWS, 6, generator=gen),
                               "old_log_probs": out["log_probs"] + 0.05 * torch.randn(ROWS, 6, generator=gen),
                               "ref_log_probs": out["log_probs"] + 0.1 * torch.randn(ROWS, 6, generator=gen)}))
    assert len(set(out["response_mask"].sum(-1).tolist())) > 1  # ragged: the modes differ
    return out


def options(mode: str, micro: int) -> RLHFOptions:
    return dataclasses.replace(RLHFOptions(), loss_agg_mode=mode, responses_per_micro_batch=micro,
                               use_kl_loss=True, kl_loss_coef=0.3, entropy_coef=0.01, clip_ratio_c=3.0)


def backward_of(model):
    """What a worker's run_objective does on one process: the network, the objective, backward."""
    return lambda tokens, packed, objective: objective(model(tokens), packed).backward()


def grads(model) -> dict[str, torch.Tensor]:
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    return {n: full(p.grad).clone() for n, p in model.named_parameters()}


def single_process(mode: str, micro: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model, _, _ = parallelize(build_model(CFG, device="meta"), None, ParallelConfig(), device="cpu", seed=3)
    batch = make_batch()
    policy_gradients(backward_of(model), batch, options(mode, micro), loss_scale(batch["response_mask"], 6), dp_size=1)
    return grads(model)


def two_workers(mode: str) -> dict[str, torch.Tensor]:
    dims = ParallelDims(dp_shard=2)
    mesh = build_mesh(dims, "cpu")
    model, _, _ = parallelize(build_model(CFG, device="meta"), mesh, ParallelConfig(dp_shard=2), device="cpu", seed=3)
    batch = make_batch()
    scale = loss_scale(batch["response_mask"], 6)  # the whole mini-batch's, as the driver sends it
    rank = torch.distributed.get_rank()
    part = batch[rank * ROWS // 2:(rank + 1) * ROWS // 2]
    policy_gradients(backward_of(model), part, options(mode, 2), scale, dp_size=2)
    return {n: g.numpy() for n, g in grads(model).items()}  # numpy: a forked rank's tensors die with it


@pytest.mark.parametrize("mode", sorted(LOSS_AGG_MODES))
def test_micro_batches_do_not_change_the_gradient(mode):
    whole, quarters = single_process(mode, ROWS), single_process(mode, ROWS // 4)
    for name in whole:
        torch.testing.assert_close(quarters[name], whole[name], atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("mode", sorted(LOSS_AGG_MODES))
def test_data_parallel_workers_do_not_change_the_gradient(mode):
    whole = single_process(mode, ROWS)
    split = {n: torch.from_numpy(g) for n, g in run_ranks(2, two_workers, mode)[0].items()}
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=1e-6, rtol=1e-6, msg=name)


def test_the_modes_really_differ():
    """The test above could not pass by accident: the three modes give different gradients here."""
    g = {mode: single_process(mode, ROWS)["output.weight"] for mode in LOSS_AGG_MODES}
    modes = sorted(g)
    for a, b in zip(modes, modes[1:]):
        assert (g[a] - g[b]).abs().max() > 1e-4
