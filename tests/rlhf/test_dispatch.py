"""rlhf/dispatch.py: contracts on methods; which worker of a dp=2 x tp=2 x pp=2 group gets what,
what comes back, and the padding round trip."""

import numpy as np
import pytest
import torch

from parallel.mesh import ParallelDims
from rlhf.batch import Batch
from rlhf.dispatch import (Contract, Mode, WorkerInfo, check_infos, collect, contract_of, dispatch, execute,
                           register, registered_methods, worker_infos)

DIMS = ParallelDims(pp=2, dp_shard=2, tp=2)  # ranks: pp-major, tp-minor -> rank = 4*pp + 2*dp + tp


def batch(n):
    return Batch({"x": torch.arange(n).float().unsqueeze(1)}, {"uid": [f"u{i}" for i in range(n)]})


def test_register_stores_the_contract_on_the_method():
    class Actor:
        @register(Mode.DP)
        def compute_log_prob(self, b):
            return b

        @register(dispatch="one_to_all", collect="rank_zero", blocking=False)
        def save(self, path):
            return path

        def helper(self):
            pass

    assert contract_of(Actor.compute_log_prob) == Contract(Mode.DP, Mode.DP)
    assert contract_of(Actor().save) == Contract(Mode.ONE_TO_ALL, Mode.RANK_ZERO, blocking=False)
    assert contract_of(Actor.helper) is None
    assert set(registered_methods(Actor)) == {"compute_log_prob", "save"}
    assert Actor().save("p") == "p"  # the method still runs as written
    with pytest.raises(ValueError, match="allowed: one_to_all, all_to_all, dp, rank_zero"):
        register("megatron_compute")
    with pytest.raises(ValueError, match="not both"):
        register("dp", dispatch="dp")


def test_worker_infos_of_a_dp2_tp2_pp2_mesh():
    infos = worker_infos(DIMS)
    assert [i.dp_rank for i in infos] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert {i.dp_size for i in infos} == {2}
    # collectors: tp rank 0 on the last pipeline stage
    assert [i.rank for i in infos if i.is_collector] == [4, 6]
    assert infos[7].coords == {"pp": 1, "dp_replicate": 0, "dp_shard": 1, "tp": 1}
    # dp_replicate x dp_shard flatten into one dp rank, replicate-major
    hsdp = worker_infos(ParallelDims(dp_replicate=2, dp_shard=2))
    assert [i.dp_rank for i in hsdp] == [0, 1, 2, 3] and all(i.is_collector for i in hsdp)


def test_dp_dispatch_replicates_across_tp_and_pp_and_collects_from_collectors():
    infos = worker_infos(DIMS)
    call = dispatch(Mode.DP, batch(6), infos)
    assert call.pad == 0 and sorted(call.inputs) == list(range(8))
    for rank, inp in call.inputs.items():
        dp = infos[rank].dp_rank
        assert list(inp["uid"]) == [f"u{i}" for i in range(3 * dp, 3 * dp + 3)], rank
    # each worker doubles x; non-collectors return garbage that must not leak into the result
    outputs = {r: Batch({"x": b["x"] * 2 if infos[r].is_collector else torch.full_like(b["x"], -1.0)},
                        {"uid": b["uid"]}) for r, b in call.inputs.items()}
    out = collect(Mode.DP, outputs, infos, pad=call.pad)
    assert out["x"].squeeze(1).tolist() == [0, 2, 4, 6, 8, 10] and list(out["uid"]) == [f"u{i}" for i in range(6)]


@pytest.mark.parametrize("n", [1, 3, 5, 7])
def test_dp_pads_a_non_divisible_batch_and_unpads_the_result(n):
    infos = worker_infos(DIMS)
    call = dispatch(Mode.DP, batch(n), infos)
    assert call.pad == (-n) % 2
    assert len({len(b) for b in call.inputs.values()}) == 1  # equal chunks: no "only support equal chunk"
    out = collect(Mode.DP, {r: Batch({"y": b["x"] + 1}) for r, b in call.inputs.items()}, infos, pad=call.pad)
    assert out["y"].squeeze(1).tolist() == [i + 1 for i in range(n)]
    tensors = collect(Mode.DP, {r: b["x"].squeeze(1) for r, b in call.inputs.items()}, infos, pad=call.pad)
    assert tensors.tolist() == list(range(n))


def test_dp_collect_of_other_values_lists_them_by_dp_rank_and_refuses_padding():
    infos = worker_infos(DIMS)
    metrics = {r: {"dp": i.dp_rank, "rank": r} for r, i in enumerate(infos)}
    assert collect(Mode.DP, metrics, infos) == [{"dp": 0, "rank": 4}, {"dp": 1, "rank": 6}]
    with pytest.raises(TypeError, match="padding rows"):
        collect(Mode.DP, metrics, infos, pad=1)


def test_one_to_all_all_to_all_and_rank_zero():
    infos = worker_infos(DIMS)
    call = dispatch(Mode.ONE_TO_ALL, {"lr": 1e-6}, infos)
    assert call.inputs == {r: {"lr": 1e-6} for r in range(8)}
    assert collect(Mode.ONE_TO_ALL, [r * 10 for r in range(8)], infos) == [r * 10 for r in range(8)]
    call = dispatch(Mode.ALL_TO_ALL, [f"seed{r}" for r in range(8)], infos)
    assert call.inputs[5] == "seed5"
    with pytest.raises(ValueError, match="one input per worker \\(8\\)"):
        dispatch(Mode.ALL_TO_ALL, ["a", "b"], infos)
    call = dispatch(Mode.RANK_ZERO, "ckpt/step_1", infos)
    assert call.inputs == {0: "ckpt/step_1"}
    assert collect(Mode.RANK_ZERO, {0: "done"}, infos) == "done"
    with pytest.raises(ValueError, match="no output from worker rank\\(s\\) \\[3\\]"):
        collect(Mode.ALL_TO_ALL, {r: r for r in range(8) if r != 3}, infos)


def test_inconsistent_worker_infos_are_refused():
    with pytest.raises(ValueError, match="exactly one collector"):
        check_infos([WorkerInfo(0, 0, 1, True), WorkerInfo(1, 0, 1, True)])
    with pytest.raises(ValueError, match="no worker holds dp rank 1"):
        check_infos([WorkerInfo(0, 0, 2, True), WorkerInfo(1, 0, 2, False)])
    with pytest.raises(ValueError, match="disagree on the dp size"):
        check_infos([WorkerInfo(0, 0, 1, True), WorkerInfo(1, 1, 2, True)])


def test_execute_runs_a_registered_method_across_local_workers():
    class Critic:
        def __init__(self, rank):
            self.rank = rank

        @register(Mode.DP)
        def compute_values(self, b):
            return Batch({"values": b["x"].squeeze(1) * 10, "rank": torch.full((len(b),), self.rank)})

    infos = worker_infos(DIMS)
    out = execute([Critic(r) for r in range(8)], "compute_values", batch(5), infos)
    assert out["values"].tolist() == [0, 10, 20, 30, 40]
    assert out["rank"].tolist() == [4, 4, 4, 6, 6]  # 5 rows padded to 6: 3 per dp rank, from collectors 4 and 6


def _live_info():
    import torch.distributed as dist

    from parallel.mesh import build_mesh
    from rlhf.dispatch import worker_info
    return worker_info(build_mesh(DIMS, "cpu"), dist.get_rank())


def test_worker_info_from_a_live_mesh_matches_the_layout(run_ranks):
    live = run_ranks(8, _live_info)
    assert [(i.dp_rank, i.dp_size, i.is_collector) for i in live] == \
        [(i.dp_rank, i.dp_size, i.is_collector) for i in worker_infos(DIMS)]
