"""The reward model r_ψ: a scalar head on a decoder trunk, read at each response's last token."""

from __future__ import annotations

import torch

from rlhf.batch import Batch
from rlhf.dispatch import Mode, register
from rlhf.workers.actor import TEACHER_FORCED, micro_batches
from rlhf.workers.base import Worker


def last_token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor) -> torch.Tensor:
    """r(x, y): the head's output at each row's last real token [B]."""
    values = model(input_ids, positions=position_ids, attention_mask=attention_mask)
    width = attention_mask.shape[1]
    last = width - 1 - attention_mask.long().flip(-1).argmax(-1)  # the rightmost real token
    return values.gather(1, last[:, None]).squeeze(1).float()


class RewardModelWorker(Worker):
    trainable = False

    def load_initial_weights(self) -> None:
        self.load_model_component(self.spec.options.reward_model_from)

    @register(Mode.DP)
    @torch.no_grad()
    def compute_rm_score(self, batch: Batch) -> Batch:
        self.model.eval()
        scores = [last_token_scores(self.model, mb["input_ids"].to(self.device), mb["attention_mask"].to(self.device),
                                    mb["position_ids"].to(self.device)).cpu()
                  for mb in micro_batches(batch.select(*TEACHER_FORCED), self.spec.options.responses_per_micro_batch)]
        return Batch({"rm_scores": torch.cat(scores)})
