"""One named DeviceMesh (pp, dp_replicate, dp_shard, tp) that every parallel technique asks by name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import warnings

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
# torch 2.13 still supports mesh["dp"] for a flattened dim and only warns about a future change.
warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh")


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of each mesh dimension; their product is the world size."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, d) for d in MESH_DIMS)


def build_mesh(dims: ParallelDims, device_type: str) -> Optional[DeviceMesh]:
    """The full 4-D mesh plus a flattened "dp" (replicate x shard); None in a single process.

    Ranks are laid out pp-major, tp-minor (Megatron's order): tp groups are adjacent ranks, so
    they stay inside a node.
    """
    if dims.world_size == 1 and not dist.is_initialized():
        return None
    if dist.get_world_size() != dims.world_size:
        raise ValueError(
            f"the process group has {dist.get_world_size()} ranks but pp*dp_replicate*dp_shard*tp "
            f"= {dims.world_size}"
        )
    mesh = init_device_mesh(device_type, dims.sizes(), mesh_dim_names=MESH_DIMS)
    mesh["dp_replicate", "dp_shard"]._flatten("dp")
    # FSDP x TP parameters reduce norms over both dims: flattened, DTensor does it in one all-reduce
    mesh["dp_shard", "tp"]._flatten("dp_shard_tp")
    return mesh


def dp_coords(mesh: Optional[DeviceMesh]) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size): which slice of each global batch this rank reads."""
    if mesh is None:
        return 0, 1
    dp = mesh["dp"]
    return dp.get_local_rank(), dp.size()
