"""The named mesh (parallel/mesh.py): dimension sizes and names, the flattened groups by name, the
Megatron rank order (tp-minor, pp-major), data-parallel coordinates, and the refusals."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from parallel.mesh import MESH_DIMS, ParallelDims, build_mesh, dp_coords


def test_dims_sizes_world_and_dp():
    dims = ParallelDims(pp=2, dp_replicate=3, dp_shard=5, tp=7)
    assert dims.sizes() == (2, 3, 5, 7) and dims.world_size == 210 and dims.dp == 15
    assert MESH_DIMS == ("pp", "dp_replicate", "dp_shard", "tp")


def test_single_process_has_no_mesh():
    assert not dist.is_initialized()
    assert build_mesh(ParallelDims(), "cpu") is None
    assert dp_coords(None) == (0, 1)


def _groups(dims: ParallelDims) -> dict:
    """Per named dim (and flattened dim): (size, local rank, the global ranks of this rank's group)."""
    mesh = build_mesh(dims, "cpu")
    out = {}
    for name in (*MESH_DIMS, "dp", "dp_shard_tp"):
        sub = mesh[name]
        out[name] = (sub.size(), sub.get_local_rank(), sorted(dist.get_process_group_ranks(sub.get_group())))
    out["dp_coords"] = dp_coords(mesh)
    return out


def test_named_and_flattened_dims_on_4_ranks(run_ranks):
    """pp=2 x dp_shard=2: tp groups are single ranks, dp groups adjacent, pp groups at stride 2."""
    ranks = run_ranks(4, _groups, ParallelDims(pp=2, dp_shard=2))
    assert [r["pp"] for r in ranks] == [(2, 0, [0, 2]), (2, 0, [1, 3]), (2, 1, [0, 2]), (2, 1, [1, 3])]
    assert [r["dp_shard"] for r in ranks] == [(2, 0, [0, 1]), (2, 1, [0, 1]), (2, 0, [2, 3]), (2, 1, [2, 3])]
    assert [r["dp"] for r in ranks] == [r["dp_shard"] for r in ranks]  # dp_replicate = 1
    assert all(r["tp"][0] == 1 and r["dp_replicate"][0] == 1 for r in ranks)
    assert [r["dp_coords"] for r in ranks] == [(0, 2), (1, 2), (0, 2), (1, 2)]


def test_tp_is_innermost_and_dp_flattens_replicate_and_shard(run_ranks):
    """dp_replicate=2 x tp=2 (tp groups adjacent, within a node), and dp_shard x tp flattened."""
    ranks = run_ranks(4, _groups, ParallelDims(dp_replicate=2, tp=2))
    assert [r["tp"][2] for r in ranks] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["dp"] for r in ranks] == [(2, 0, [0, 2]), (2, 0, [1, 3]), (2, 1, [0, 2]), (2, 1, [1, 3])]
    assert [r["dp_shard_tp"][2] for r in ranks] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["dp_coords"] for r in ranks] == [(0, 2), (0, 2), (1, 2), (1, 2)]


def _wrong_world() -> str:
    with pytest.raises(ValueError) as err:
        build_mesh(ParallelDims(tp=2, dp_shard=2), "cpu")
    return str(err.value)


def test_a_mesh_that_does_not_fill_the_group_is_refused(run_ranks):
    message = run_ranks(2, _wrong_world)[0]
    assert "2 ranks" in message and "= 4" in message
