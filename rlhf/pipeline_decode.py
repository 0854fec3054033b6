"""Decoding through pipeline stages: the actor generating in a pp > 1 training layout, or in the
3D-HybridEngine's generation layout with task.rollout_pp > 1 stages.

Each of this rank's chunks keeps its own KV cache; a step's hidden states go from chunk to chunk in
layer order over the pipeline group, sent only where the next chunk is on another rank (`owner`:
a chunk's rank in the group; Megatron's interleaved assignment in training, chunk c on rank
c mod pp); the last chunk's logits [B, V] are broadcast over the group, so every rank of the
pipeline samples the same token with the same generator. One microbatch, no overlap: correct,
not fast."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from parallel.tensor import plain_tensor
from trainer.models.llama import KVCache


class PipelineDecoder:
    def __init__(self, chunks: dict[int, nn.Module], n_chunks: int, owner: Callable[[int], int],
                 group: dist.ProcessGroup, model_cfg, device: torch.device, rows: int, max_len: int):
        self.chunks, self.n_chunks, self.owner = chunks, n_chunks, owner
        self.caches = {i: KVCache(rows, max_len) for i in chunks}
        self.group, self.me = group, dist.get_rank(group)
        self.dim, self.vocab, self.device = model_cfg.dim, model_cfg.vocab_size, device

    @classmethod
    def factory(cls, chunks: dict[int, nn.Module], n_chunks: int, group, model_cfg, device,
                owner: Optional[Callable[[int], int]] = None) -> Callable[[int, int], "PipelineDecoder"]:
        """`owner` None: the training pipeline's (chunk c on group rank c mod the group's size)."""
        size = dist.get_world_size(group)
        owner = owner or (lambda c: c % size)
        return lambda rows, max_len: cls(chunks, n_chunks, owner, group, model_cfg, device, rows, max_len)

    @classmethod
    def of_pipeline(cls, pipeline, group, model_cfg, device) -> Callable[[int, int], "PipelineDecoder"]:
        """Through the training pipeline's own stages."""
        chunks = {stage.stage_index: stage.submod for stage in pipeline.stages}
        return cls.factory(chunks, pipeline.stages[0].num_stages, group, model_cfg, device)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows, length = tokens.shape
        h = tokens
        logits = torch.empty(rows, self.vocab, device=self.device)
        for s in range(self.n_chunks):
            if self.owner(s) != self.me:
                continue
            if s > 0 and self.owner(s - 1) != self.me:
                h = torch.empty(rows, length, self.dim, device=self.device)
                dist.recv(h, group_src=self.owner(s - 1), group=self.group)
            out = self.chunks[s](h, cache=self.caches[s], positions=positions, attention_mask=mask)
            if s == self.n_chunks - 1:
                logits = plain_tensor(out[:, -1:])[:, 0].float().contiguous()
            else:
                h = out.float().contiguous()
                if self.owner(s + 1) != self.me:
                    dist.send(h, group_dst=self.owner(s + 1), group=self.group)
        dist.broadcast(logits, group_src=self.owner(self.n_chunks - 1), group=self.group)
        return logits
