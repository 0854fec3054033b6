"""A Llama with a scalar head (a critic or reward model, as in RLHF's PPO): the trunk of
trainer/models/llama.py, the output projection replaced by a value head [dim -> 1].

Registered as `llama_value` (`model.name=llama_value` or `llama_value_<size>`). Its TP plan keeps
the trunk's and replicates the head (one output unit cannot be split): without sequence
parallelism the head reads the replicated hidden states as they are; under it, the sequence shard
of the final norm is gathered first.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import PrepareModuleInput

from parallel.plan import StageStructure
from trainer.config import ModelConfig
from trainer.models.llama import Llama


class LlamaValue(Llama):
    """Decoder-only transformer with a value head: tokens [B, T] -> values [B, T]."""

    stage_structure = StageStructure(blocks="layers", first=("tok_embeddings",), last=("norm", "value_head"))

    def __init__(self, cfg: ModelConfig):
        if cfg.tie_embeddings:
            raise ValueError("model.tie_embeddings=true: a value head [dim -> 1] has no weight to tie to the "
                             "input embedding")
        super().__init__(cfg)

    def build_head(self, cfg: ModelConfig) -> None:
        self.value_head = nn.Linear(cfg.dim, 1, bias=False)

    def tp_root_plan(self, sequence_parallel: bool) -> dict[str, object]:
        """The decoder's plan less the vocabulary-parallel output; the [dim -> 1] head stays whole on
        every rank (under sequence parallelism it gathers the sequence first)."""
        root = super().tp_root_plan(sequence_parallel)
        del root["output"]
        if sequence_parallel:
            root["value_head"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                                    use_local_output=True)
        return root

    def forward(self, tokens: torch.Tensor, cache=None, positions: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, T] -> values [B, T] in the head's dtype; a chunk without the head returns hidden
        states. `positions` and `attention_mask` as in Llama.forward (left-padded RLHF batches)."""
        h = self.hidden(tokens, cache, positions, attention_mask)
        return self.value_head(h).squeeze(-1) if self.value_head is not None else h
