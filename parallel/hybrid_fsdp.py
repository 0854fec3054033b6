"""The 3D-HybridEngine's transition from an FSDP2-sharded (optionally tensor-parallel) training
layout to generation under tp_g (parallel/hybrid_engine.py has the grouping and the tensor- and
pipeline-parallel transitions): weight by weight, each rank receives exactly the parts of its
generation shard that others hold, as block intersections point to point or one bucketed
all-gather where the layout allows, within a predicted peak."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from parallel.hybrid_engine import GATHER_BUCKET_BYTES, GenerationCopy, _allocated, _local, _shard_dim, gather_into

Block = tuple[tuple[int, int], ...]  # (start, length) along each dimension of a weight


def _intersect(a: Block, b: Block) -> Optional[Block]:
    """The common part of two blocks, or None when they do not meet."""
    out = tuple((max(s, t), min(s + m, t + n) - max(s, t)) for (s, m), (t, n) in zip(a, b))
    return out if all(length > 0 for _, length in out) else None


def _within(block: Block, outer: Block) -> tuple[slice, ...]:
    """`block` (inside `outer`) as indices into the tensor holding `outer`."""
    return tuple(slice(s - o, s - o + m) for (s, m), (o, _) in zip(block, outer))


def fsdp_tp_block(param: torch.Tensor, rank: int) -> Block:
    """The part of a weight a rank holds under tensor parallelism, then FSDP2 on dim 0 of the
    tensor-parallel shard (torch.chunk's split: ceil-sized pieces, trailing ones short or empty);
    the whole weight for a plain tensor. `rank` must be on the weight's mesh."""
    block = [(0, n) for n in param.shape]
    if not isinstance(param, DTensor):
        return tuple(block)
    mesh = param.device_mesh
    where = (mesh.mesh == rank).nonzero()[0].tolist()
    names = mesh.mesh_dim_names or ()
    order = sorted(range(mesh.ndim), key=lambda i: names[i] != "tp")  # tensor parallelism was applied first
    for i in order:
        dim = getattr(param.placements[i], "dim", None)
        if dim is None:
            continue  # replicated over this mesh dimension
        start, length = block[dim]
        size = mesh.mesh.shape[i]
        piece = -(-length // size)
        lo = min(where[i] * piece, length)
        block[dim] = (start + lo, min(piece, length - lo))
    return tuple(block)


class GatheredGenerationShards(GenerationCopy):
    """The transition from an FSDP2-sharded (and optionally tensor-parallel) training layout of
    `world` ranks to generation under tp_g, weight by weight (layer by layer): each rank receives
    exactly the parts of its generation shard that others hold — every pair of ranks on a weight's
    mesh exchanges the intersection of one's training block with the other's generation block,
    point to point; under FSDP alone, a weight whose generation block is its FSDP shards in order
    (column-parallel or replicated in generation, even shards) is one bucketed all-gather instead,
    inside the world/t_g ranks sharing a generation tensor rank (or all ranks) — so the extra
    memory stays within the generation shard plus one weight's pieces in flight
    (`predicted_peak_bytes`).

    The paper's grouping, for FSDP: ranks ordered by the rows they hold of a column-sharded weight
    (position = tp_i·dp + dp_i; FSDP splits dim 0 of each tensor-parallel shard), generation tensor
    rank = position // (world/t_g), so generation tensor groups take ranks at stride world/t_g and
    a rank's generation shard contains its training block of every weight sharded along its
    generation dimension (tensor-parallel ones included); for the others (FSDP's dim 0 against a
    row-parallel dim 1) it holds a 1/t_g part of its block."""

    def __init__(self, train_model: nn.Module, world: int, t_g: int, build: Callable[[Optional[DeviceMesh]], nn.Module],
                 device: torch.device):
        if world % t_g:
            raise ValueError(f"tp_gen={t_g} must divide the {world} ranks")
        self.train_model, self.t_g, self.device = train_model, t_g, device
        self.rank, self.world, self.dp_size = dist.get_rank(), world, world // t_g
        self.t = next((q.device_mesh.size(q.device_mesh.mesh_dim_names.index("tp")) for q in train_model.parameters()
                       if isinstance(q, DTensor) and "tp" in (q.device_mesh.mesh_dim_names or ())), 1)
        self.tp_rank, self.dp_rank = divmod(self.position(self.rank), self.dp_size)
        mesh = None
        if t_g > 1:
            by_position = sorted(range(world), key=self.position)
            arrangement = torch.tensor(by_position).reshape(t_g, self.dp_size).T  # row j: generation replica j
            mesh = DeviceMesh(device.type, arrangement, mesh_dim_names=("dp", "tp"))["tp"]
        self.model = build(mesh)
        self.release()
        self.gen_dims = {n: _shard_dim(q) for n, q in self.model.named_parameters()}
        for name, param in train_model.named_parameters():  # the block rule must match what each rank holds
            held = tuple(n for _, n in fsdp_tp_block(param, self.rank))
            if held != tuple(_local(param).shape):
                raise RuntimeError(f"{name}: holds {tuple(_local(param).shape)}, the FSDP×TP block rule says {held}")
        self.peak_piece_bytes = 0
        self.micro_group = None  # FSDP alone: the world/t_g consecutive ranks that share a generation tensor rank
        if self.t == 1 and t_g < world:
            for k in range(t_g):  # every rank creates every group, in the same order
                group = dist.new_group(list(range(k * self.dp_size, (k + 1) * self.dp_size)))
                if k == self.tp_rank:
                    self.micro_group = group

    def position(self, rank: int) -> int:
        """Where a rank's rows of a column-sharded weight sit among all ranks': tp_i·dp + dp_i
        (rank = dp_i·t + tp_i; FSDP splits each tensor-parallel shard's dim 0 dp ways)."""
        return (rank % self.t) * (self.world // self.t) + rank // self.t

    def needed_block(self, param: torch.Tensor, name: str, rank: int) -> Block:
        """The part of a weight a rank's generation shard holds: chunk position // (world/t_g) along
        its generation dimension (all of it when replicated)."""
        block = [(0, n) for n in param.shape]
        dim = self.gen_dims[name]
        if dim is not None:
            n = param.shape[dim] // self.t_g
            block[dim] = ((self.position(rank) // self.dp_size) * n, n)
        return tuple(block)

    def predicted_peak_bytes(self) -> int:
        """Extra memory while resharding: the generation shard, plus one weight's pieces in flight
        (point to point: at most its generation shard received and its training shard sent; an
        all-gather: two buckets, or its generation shard staged by gloo)."""
        gen = dict(self.model.named_parameters())
        nbytes = lambda q: _local(q).numel() * _local(q).element_size()  # noqa: E731
        in_flight = max(self._gen_bytes(gen[n], n) + nbytes(q) for n, q in self.train_model.named_parameters())
        return sum(self._gen_bytes(q, n) for n, q in gen.items()) + max(in_flight, 2 * GATHER_BUCKET_BYTES)

    def _gen_bytes(self, gen_param: torch.Tensor, name: str) -> int:
        return gen_param.numel() * gen_param.element_size() // (self.t_g if self.gen_dims[name] is not None else 1)

    @torch.no_grad()
    def to_generation(self) -> int:
        """Training weights → generation weights, one weight at a time; the bytes this rank received."""
        received = 0
        gen = dict(self.model.named_parameters())
        for name, param in self.train_model.named_parameters():
            target = _allocated(gen[name])
            group = self._gather_group(param, name)
            if group is False:
                received += self._reshard(param.detach(), name, target)
                continue
            members = self.dp_size if group is not None else self.world
            local = _local(param.detach())
            gather_into(target, local, 0, group, members)
            received += local.numel() * local.element_size() * (members - 1)
        return received

    def _gather_group(self, param: torch.Tensor, name: str):
        """When a weight's generation block is its FSDP shards concatenated over a group (FSDP alone,
        even shards): the micro group (sharded along dim 0 in generation) or None, the world
        (replicated in generation); else False (point to point)."""
        if self.t != 1 or not isinstance(param, DTensor) or param.shape[0] % self.world:
            return False
        if self.gen_dims[name] == 0 and self.micro_group is not None:
            return self.micro_group
        return None if self.gen_dims[name] is None else False

    def _reshard(self, param: torch.Tensor, name: str, target: torch.Tensor) -> int:
        """One weight: this rank's own part copied, the others' received, its part of theirs sent."""
        local, mine = _local(param), fsdp_tp_block(param, self.rank)
        need = self.needed_block(param, name, self.rank)
        own = _intersect(mine, need)
        if own is not None:
            target[_within(own, need)].copy_(local[_within(own, mine)])
        peers = param.device_mesh.mesh.flatten().tolist() if isinstance(param, DTensor) else []
        ops, landing, sent, in_flight = [], [], {}, 0
        for peer in peers:
            if peer == self.rank:
                continue
            out = _intersect(mine, self.needed_block(param, name, peer))
            if out is not None:
                if out not in sent:  # peers of one generation tensor rank need the same piece: one copy
                    sent[out] = local[_within(out, mine)].contiguous()
                    if sent[out].data_ptr() != local.data_ptr():
                        in_flight += sent[out].numel() * sent[out].element_size()
                ops.append(dist.P2POp(dist.isend, sent[out], peer))
            inc = _intersect(fsdp_tp_block(param, peer), need)
            if inc is not None:
                buf = torch.empty([n for _, n in inc], dtype=target.dtype, device=target.device)
                ops.append(dist.P2POp(dist.irecv, buf, peer))
                landing.append((inc, buf))
                in_flight += buf.numel() * buf.element_size()
        for work in dist.batch_isend_irecv(ops) if ops else []:
            work.wait()
        for inc, buf in landing:
            target[_within(inc, need)].copy_(buf)
        self.peak_piece_bytes = max(self.peak_piece_bytes, in_flight)
        return sum(buf.numel() * buf.element_size() for _, buf in landing)
