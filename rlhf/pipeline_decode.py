"""Decoding through pipeline stages (the actor generating in a pp > 1 training layout).

Each of this rank's chunks keeps its own KV cache; a step's hidden states go from stage to stage
over the pp group in stage order (Megatron's interleaved assignment: rank r holds stages r, r+pp,
...); the last stage's logits [B, V] are broadcast over the pp group, so every rank of the
pipeline samples the same token with the same generator. One microbatch, no overlap: correct, not
fast (the 3D-HybridEngine generates under a layout without pipeline stages)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from parallel.tensor import plain_tensor
from trainer.models.llama import KVCache


class PipelineDecoder:
    def __init__(self, pipeline, group: dist.ProcessGroup, model_cfg, device: torch.device, rows: int, max_len: int):
        self.chunks = {stage.stage_index: stage.submod for stage in pipeline.stages}
        self.n_stages = pipeline.stages[0].num_stages
        self.caches = {i: KVCache(rows, max_len) for i in self.chunks}
        self.group, self.ranks = group, dist.get_process_group_ranks(group)
        self.pp, self.me = len(self.ranks), dist.get_rank(group)
        self.dim, self.vocab, self.device = model_cfg.dim, model_cfg.vocab_size, device

    @classmethod
    def factory(cls, pipeline, group, model_cfg, device) -> Callable[[int, int], "PipelineDecoder"]:
        return lambda rows, max_len: cls(pipeline, group, model_cfg, device, rows, max_len)

    def owner(self, stage: int) -> int:
        return stage % self.pp

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows, length = tokens.shape
        h = tokens
        logits = torch.empty(rows, self.vocab, device=self.device)
        for s in range(self.n_stages):
            if self.owner(s) != self.me:
                continue
            if s > 0 and self.owner(s - 1) != self.me:
                h = torch.empty(rows, length, self.dim, device=self.device)
                dist.recv(h, group_src=self.owner(s - 1), group=self.group)
            out = self.chunks[s](h, cache=self.caches[s], positions=positions, attention_mask=mask)
            if s == self.n_stages - 1:
                logits = plain_tensor(out[:, -1:])[:, 0].float().contiguous()
            else:
                h = out.float().contiguous()
                if self.owner(s + 1) != self.me:
                    dist.send(h, group_dst=self.owner(s + 1), group=self.group)
        dist.broadcast(logits, group_src=self.owner(self.n_stages - 1), group=self.group)
        return logits
