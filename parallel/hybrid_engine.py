"""The 3D-HybridEngine's resharding (HybridFlow, Sheng et al. EuroSys'25, §5): a model trained under
(pp=p, tp=t, dp=d) generates under (pp_g=p_g, tp_g=t_g) with d_g = p·t / (p_g·t_g) more data
parallelism, on the same ranks, moving only what each rank's generation shard lacks.

The paper's grouping, on Plait's rank order (pp-major, tp-minor; parallel/mesh.py): with
s = p/p_g and r = t/t_g, a rank at (pp_i, dp_i, tp_i) gets generation stage pp_i // s and
generation tensor rank tp_i // r; its micro-DP group is the s·r ranks of its dp replica that share
those two, so its generation shard — training stages [g·s, (g+1)·s) × tensor shards
[k·r, (k+1)·r) — *contains* its training shard. Weights are all-gathered inside micro-DP groups
only; going back to training needs no communication. Generation tensor groups take ranks at
stride r (the paper's example: training 1-4-2, TP [0-3], [4-7] → generation 1-2-2-2, TP [0,2],
[1,3], [4,6], [5,7]; micro-DP [0,1], [2,3], [4,5], [6,7]).

This module holds the grouping and the paper's cost formulas (pure), and two transitions:
`GenerationShards` for tensor-parallel training layouts (all-gathers inside micro-DP groups,
bucketed, straight into the generation buffer), `StagedGenerationShards` for pipeline ×
tensor-parallel ones, generating with pp_g stages or none (broadcasts inside micro-DP groups
spanning the training stages of one generation stage), both optionally resident (zero
redundancy). FSDP2-sharded training layouts have their own transition,
parallel/hybrid_fsdp.py's `GatheredGenerationShards`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard


@dataclass(frozen=True)
class HybridLayout:
    """Training (p, t, d) and generation (p_g, t_g): what `hybrid_groups` and the formulas take."""

    p: int
    t: int
    d: int
    p_g: int = 1
    t_g: int = 1

    def __post_init__(self):
        if min(self.p, self.t, self.d, self.p_g, self.t_g) < 1:
            raise ValueError(f"every size must be >= 1: {self}")
        if self.t % self.t_g:
            raise ValueError(f"tp_gen={self.t_g} must divide the training tp={self.t}")
        if self.p % self.p_g:
            raise ValueError(f"pp_gen={self.p_g} must be 1 or divide the training pp={self.p}")

    @property
    def micro_dp(self) -> int:
        """d_g = p·t / (p_g·t_g): ranks that pool their training shards into one generation shard."""
        return (self.p * self.t) // (self.p_g * self.t_g)

    @property
    def world(self) -> int:
        return self.p * self.t * self.d


@dataclass(frozen=True)
class HybridGroups:
    generation_tp: list[list[int]]  # each generation tensor-parallel group, in tensor-rank order
    generation_pp: list[list[int]]  # each generation pipeline group, in stage order
    micro_dp: list[list[int]]       # each micro-DP group, in the order its shards concatenate
    generation_dp_rank: list[int]   # per rank: its data-parallel index under generation (d·d_g of them)


def coords(rank: int, lay: HybridLayout) -> tuple[int, int, int]:
    """(pp_i, dp_i, tp_i) of a rank in Plait's order: rank = (pp_i·d + dp_i)·t + tp_i."""
    tp_i = rank % lay.t
    dp_i = (rank // lay.t) % lay.d
    return rank // (lay.t * lay.d), dp_i, tp_i


def rank_of(pp_i: int, dp_i: int, tp_i: int, lay: HybridLayout) -> int:
    return (pp_i * lay.d + dp_i) * lay.t + tp_i


def hybrid_groups(lay: HybridLayout) -> HybridGroups:
    """The paper's generation TP / PP groups (ranks at stride t/t_g, p/p_g) and micro-DP groups."""
    s, r = lay.p // lay.p_g, lay.t // lay.t_g
    tp_groups, pp_groups, micro, gen_dp = [], [], [], [0] * lay.world
    for dp_i in range(lay.d):
        for g in range(lay.p_g):
            for k in range(lay.t_g):  # a micro-DP group: stages g·s.., tensor shards k·r.. (in that order)
                micro.append([rank_of(g * s + a, dp_i, k * r + b, lay) for a in range(s) for b in range(r)])
        for m in range(lay.micro_dp):  # m = a·r + b: the same place inside every micro-DP group
            a, b = divmod(m, r)
            for g in range(lay.p_g):
                tp_groups.append([rank_of(g * s + a, dp_i, k * r + b, lay) for k in range(lay.t_g)])
            for k in range(lay.t_g):
                pp_groups.append([rank_of(g * s + a, dp_i, k * r + b, lay) for g in range(lay.p_g)])
            for g in range(lay.p_g):
                for k in range(lay.t_g):
                    gen_dp[rank_of(g * s + a, dp_i, k * r + b, lay)] = dp_i * lay.micro_dp + m
    return HybridGroups(tp_groups, pp_groups, micro, gen_dp)


def hybrid_transition_bytes(lay: HybridLayout, model_bytes: float) -> float:
    """Per rank and transition (HybridFlow Table 2): (t·p − t_g·p_g) / (t_g·p_g·t·p) · M."""
    return (lay.t * lay.p - lay.t_g * lay.p_g) / (lay.t_g * lay.p_g * lay.t * lay.p) * model_bytes


def naive_transition_bytes(lay: HybridLayout, model_bytes: float) -> float:
    """The all-gather baseline (every rank gathers the whole model): (t·p·d − 1) / (t·p·d) · M."""
    n = lay.t * lay.p * lay.d
    return (n - 1) / n * model_bytes


def hybrid_peak_extra_bytes(lay: HybridLayout, model_bytes: float) -> float:
    """Memory beyond the training shard while generating: M/(t_g·p_g) − M/(t·p) (redundancy 0)."""
    return model_bytes / (lay.t_g * lay.p_g) - model_bytes / (lay.t * lay.p)


# --- the transition for tensor-parallel training layouts ----------------------------------------


def _shard_dim(param: torch.Tensor) -> Optional[int]:
    """The tensor dimension a TP DTensor is sharded along (None: replicated or a plain tensor): on
    a mesh with named dimensions (FSDP2 over TP), its "tp" dimension's."""
    if not isinstance(param, DTensor):
        return None
    names = param.device_mesh.mesh_dim_names
    if names:  # a mesh without "tp" (FSDP2 alone): replicated over tensor parallelism
        placements = [param.placements[names.index("tp")]] if "tp" in names else []
    else:
        placements = param.placements
    dims = [p.dim for p in placements if isinstance(p, Shard)]
    return dims[0] if dims else None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _allocated(param: torch.Tensor) -> torch.Tensor:
    """A generation weight's local tensor, its storage allocated again if `release` freed it."""
    local = _local(param)
    if local.untyped_storage().size() == 0:
        local.untyped_storage().resize_(local.numel() * local.element_size())
    return local


GATHER_BUCKET_BYTES = 4 << 20  # one all-gather's output at most: gloo stages each through a buffer of that size


def gather_into(target: torch.Tensor, local: torch.Tensor, dim: int, group, members: int,
                bucket_bytes: int = GATHER_BUCKET_BYTES) -> None:
    """target ← the members' shards concatenated along `dim` (`local` may be this rank's slot of
    target), in all-gathers of at most `bucket_bytes` each (row blocks of the shards), so what is
    in flight beyond target stays within two buckets whatever the weight's size."""
    n = local.shape[dim]
    row_bytes = max(1, local[:1].numel() * local.element_size() * members)
    rows = max(1, min(local.shape[0], bucket_bytes // row_bytes))
    if dim == 0 and rows == local.shape[0]:  # one bucket: straight into the generation weight
        dist.all_gather_single(target, local if local.is_contiguous() else local.contiguous(), group=group)
        return
    for start in range(0, local.shape[0], rows):
        piece = local.narrow(0, start, min(rows, local.shape[0] - start))
        parts = torch.empty((members * piece.shape[0], *piece.shape[1:]), dtype=local.dtype, device=local.device)
        dist.all_gather_single(parts, piece.contiguous(), group=group)
        parts = parts.unflatten(0, (members, piece.shape[0]))
        if dim == 0:  # member j's rows start..: target rows j·n + start..
            target.unflatten(0, (members, n)).narrow(1, start, piece.shape[0]).copy_(parts)
        else:
            target.narrow(0, start, piece.shape[0]).unflatten(dim, (members, n)).copy_(parts.movedim(0, dim))
        del parts


class GenerationCopy:
    """What every transition shares: the generation network `model`, whose weights' storage
    `release()` frees between generations and `to_generation()` fills again."""

    model: nn.Module
    pp_group = None  # generation with pipeline stages (StagedGenerationShards, pp_g > 1): its stage group

    def release(self) -> None:
        """Free the generation weights (their storage; the parameters stay, empty, until the next
        `to_generation`)."""
        for p in self.model.parameters():
            _local(p.data).untyped_storage().resize_(0)

    def generation_bytes(self) -> int:
        return sum(_local(p).numel() * _local(p).element_size() for p in self.model.parameters())


class GenerationShards(GenerationCopy):
    """A generation copy of a tensor-parallel training model under tp_g (pp = p_g = 1), filled from
    the training shards by all-gathers inside micro-DP groups.

    `build(mesh)` must make the generation network (its TP plan applied over the 1-D `mesh`, or a
    plain module when tp_g = 1) on this rank's device. Every rank of the default group constructs
    this together (it creates the groups). `to_generation()` copies the current training weights in
    and returns the bytes this rank received; `release()` frees the generation weights' storage.

    `resident=True` is the paper's zero redundancy: at the first transition every training shard
    moves INTO its slot of the generation buffer (the training parameter becomes a view of it;
    replicated weights are shared), so the extra memory is M/t_g − M/t for good, later transitions
    gather only the other members' slots, and going back to training costs nothing."""

    def __init__(self, train_model: nn.Module, lay: HybridLayout, build: Callable[[Optional[DeviceMesh]], nn.Module],
                 device: torch.device, resident: bool = False):
        if type(self) is GenerationShards and (lay.p, lay.p_g) != (1, 1):
            raise ValueError("GenerationShards handles tensor-parallel training layouts (pp = 1); "
                             "StagedGenerationShards pipeline-parallel ones")
        self.train_model, self.lay, self.device = train_model, lay, device
        self.groups = hybrid_groups(lay)
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.micro_group, self.micro_ranks = None, [rank]
        for ranks in self.groups.micro_dp:  # every rank creates every group, in the same order
            group = dist.new_group(ranks) if lay.micro_dp > 1 else None
            if rank in ranks:
                self.micro_group, self.micro_ranks = group, ranks
        mesh = None
        if lay.t_g > 1:  # one row per generation tensor group (of every replica and stage)
            arrangement = torch.tensor(sorted(self.groups.generation_tp, key=lambda g: self.groups.generation_dp_rank[g[0]]))
            mesh = DeviceMesh(device.type, arrangement, mesh_dim_names=("dp", "tp"))["tp"]
        self.rank = rank
        self.model = self._build(build, mesh)
        GenerationCopy.release(self)  # allocated by each transition (resident: once, around the training shards)
        self.bytes_received = 0
        self.resident, self._aliased = resident, False

    def _build(self, build, mesh):
        return build(mesh)

    @torch.no_grad()
    def to_generation(self) -> int:
        """Training weights → generation weights; the bytes this rank received."""
        received = 0
        gen = dict(self.model.named_parameters())
        me = self.micro_ranks.index(self.rank)
        for name, param in self.train_model.named_parameters():
            local = _local(param.detach())
            dim = _shard_dim(param)
            if dim is None or self.lay.micro_dp == 1:
                if self.resident and not self._aliased and not isinstance(gen[name], DTensor):
                    gen[name].data = local  # one copy, shared by both layouts
                    continue
                target = _allocated(gen[name])
                if target.data_ptr() != local.data_ptr():
                    target.copy_(local)
                continue
            target = _allocated(gen[name])
            if self.resident and not self._aliased:  # the training shard moves into its generation slot
                n = local.shape[dim]
                slot = target.narrow(dim, me * n, n)
                slot.copy_(local)
                # the DTensor parameter now reads and writes its slot (a private field, pinned by
                # tests/parallel/test_hybrid_engine.py: training steps land in the generation buffer)
                param._local_tensor = slot
                local = slot
            gather_into(target, local, dim, self.micro_group, len(self.micro_ranks))
            received += local.numel() * local.element_size() * (len(self.micro_ranks) - 1)
        self._aliased = self._aliased or self.resident
        self.bytes_received = received
        return received

    def release(self) -> None:
        """Resident shards hold the training weights: nothing is freed; else as GenerationCopy."""
        if not self.resident:
            super().release()


def generation_chunks(lay: HybridLayout, virtual_stages: int, pp_i: int) -> list[int]:
    """The training chunks (p·v of them, chunk c on pipeline rank c mod p: Megatron's interleaved
    assignment) that the generation stage of training pipeline rank pp_i holds: those of ranks
    [g·s, (g+1)·s) with g = pp_i // s, s = p/p_g, in layer order."""
    s = lay.p // lay.p_g
    return [c for c in range(lay.p * virtual_stages) if (c % lay.p) // s == pp_i // s]


def generation_network(meta_model: nn.Module, tp_mesh: Optional[DeviceMesh], chunks: Optional[list[int]],
                       n_chunks: int, device: torch.device, seed: int) -> nn.Module:
    """A generation network from a meta-device model: the whole model (`chunks` None or all of the
    n_chunks), or those training pipeline chunks as one ChunksView, each tensor-parallel over
    `tp_mesh` (None: plain), allocated on `device`."""
    from parallel.init import materialize
    from parallel.pipeline import ChunksView, split_model
    from parallel.tensor import apply_tp

    whole = chunks is None or len(chunks) == n_chunks
    parts = [meta_model] if whole else [split_model(meta_model, c, n_chunks) for c in chunks]
    for part in parts:
        if tp_mesh is not None:
            apply_tp(part, tp_mesh)
        materialize(part, device, seed=seed)
    return parts[0] if len(parts) == 1 else ChunksView(parts)


def generation_stage(lay: HybridLayout, chunk: int) -> int:
    """The generation stage (its rank in a generation pipeline group) holding a training chunk."""
    return (chunk % lay.p) // (lay.p // lay.p_g)


class StagedGenerationShards(GenerationShards):
    """The transition from a pipeline × tensor-parallel training layout (pp = p, tp = t) to
    generation under (pp_g, tp_g): a micro-DP group spans the s = p/p_g training stages of one
    generation stage (and t/t_g tensor ranks of each), so each rank receives those stages' layers
    at its generation tensor shard, piece by piece from the ranks that hold them (one broadcast per
    piece inside the group, straight into its slot of the generation weight). `owner(name)` is the
    pipeline rank holding a parameter; `train_model` holds this rank's chunks under the whole
    model's parameter names (parallelize's ChunksView).

    `build(mesh, chunks)` makes the generation network of training chunks `chunks` (of p·v;
    `generation_chunks`: all of them when pp_g = 1) under the tensor mesh; with pp_g > 1
    `pp_group` is this rank's generation pipeline (its stages in order; `generation_stage` maps a
    chunk to its rank there) and `chunk_ids` the chunks it holds.

    `resident=True`: as GenerationShards' — this rank's pieces move into their slots of the
    generation buffer at the first transition (weights replicated over tp are shared), so the
    extra memory is M/(t_g·p_g) − M/(t·p) for good and no piece is stored twice."""

    def __init__(self, train_model: nn.Module, lay: HybridLayout,
                 build: Callable[[Optional[DeviceMesh], list[int]], nn.Module], device: torch.device,
                 owner: Callable[[str], int], resident: bool = False, virtual_stages: int = 1):
        rank = dist.get_rank()
        self.chunk_ids = generation_chunks(lay, virtual_stages, coords(rank, lay)[0])
        self.n_chunks = lay.p * virtual_stages
        for ranks in hybrid_groups(lay).generation_pp if lay.p_g > 1 else []:  # every rank creates every group
            group = dist.new_group(ranks)
            if rank in ranks:
                self.pp_group = group
        super().__init__(train_model, lay, build, device, resident=resident)
        self.owner = owner
        dims = {n: _shard_dim(p) for n, p in train_model.named_parameters()}
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, dims)  # the shard dimension of every weight, held anywhere
        self.shard_dims: dict[str, Optional[int]] = {}
        for d in everyone:
            self.shard_dims.update(d)

    def _build(self, build, mesh):
        return build(mesh, self.chunk_ids)

    def stage_chunks(self) -> dict[int, nn.Module]:
        """This rank's generation chunks by training chunk index (what a pipeline decoder runs)."""
        return dict(zip(self.chunk_ids, getattr(self.model, "chunks", [self.model])))

    def chunk_stage(self, chunk: int) -> int:
        return generation_stage(self.lay, chunk)

    def _pieces(self, name: str) -> list[int]:
        """The micro-DP members whose training shards make up this rank's generation shard of
        `name`, in slot order (one when the weight is replicated over tp)."""
        stage = self.owner(name)
        holders = [m for m in self.micro_ranks if coords(m, self.lay)[0] == stage]  # tp order (ranks ascend)
        if self.shard_dims[name] is None:
            return holders[:1]  # replicated over tp: one piece is all of it
        if len(holders) != self.lay.t // self.lay.t_g:
            raise RuntimeError(f"{name}: {len(holders)} holders in the micro-DP group, expected {self.lay.t // self.lay.t_g}")
        return holders

    @torch.no_grad()
    def to_generation(self) -> int:
        received = 0
        mine = dict(self.train_model.named_parameters())
        for name, gen_param in self.model.named_parameters():
            pieces, dim = self._pieces(name), self.shard_dims[name]
            if self.resident and not self._aliased and dim is None and name in mine and not isinstance(gen_param, DTensor):
                gen_param.data = _local(mine[name].detach())  # one copy, shared by both layouts
            target = _allocated(gen_param)
            for j, src in enumerate(pieces):
                slot = target if dim is None else target.narrow(dim, j * (target.shape[dim] // len(pieces)),
                                                                 target.shape[dim] // len(pieces))
                if src == self.rank:
                    self._place(mine[name], slot)
                    piece = slot if slot.is_contiguous() else slot.contiguous()
                else:
                    piece = slot if slot.is_contiguous() else torch.empty_like(slot, memory_format=torch.contiguous_format)
                    received += piece.numel() * piece.element_size()
                dist.broadcast(piece, src=src, group=self.micro_group)
                if piece.data_ptr() != slot.data_ptr() and src != self.rank:
                    slot.copy_(piece)
        self._aliased = self._aliased or self.resident
        self.bytes_received = received
        return received

    def _place(self, param: torch.Tensor, slot: torch.Tensor) -> None:
        """This rank's training shard into its slot: moved there for good (resident, first time),
        already there (resident), or copied."""
        local = _local(param.detach())
        if local.data_ptr() == slot.data_ptr():
            return
        slot.copy_(local)
        if self.resident and not self._aliased:
            if isinstance(param, DTensor):
                param._local_tensor = slot  # as GenerationShards: training steps land in the generation buffer
            else:
                param.data = slot


def pipeline_owner(n_layers: int, pp: int, virtual_stages: int) -> Callable[[str], int]:
    """The pipeline rank holding a Llama parameter: blocks by parallel/pipeline.py's layer split
    (chunk c on rank c mod pp), the embedding on the first chunk, the final norm and output on the last."""
    from parallel.pipeline import layer_split

    chunks = pp * virtual_stages
    chunk_of = {i: c for c, layers in enumerate(layer_split(n_layers, chunks)) for i in layers}

    def owner(name: str) -> int:
        head = name.split(".")
        if head[0] == "layers":
            return chunk_of[int(head[1])] % pp
        if head[0] == "tok_embeddings":
            return 0
        return (chunks - 1) % pp
    return owner
