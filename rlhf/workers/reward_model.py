"""The reward model r_ψ: a scalar head on a decoder trunk, read at each response's last token."""

from __future__ import annotations

import torch

from rlhf.batch import Batch
from rlhf.dispatch import Mode, register
from rlhf.logprobs import teacher_forced
from rlhf.workers.actor import TEACHER_FORCED, micro_batches
from rlhf.workers.base import Worker
from rlhf.workers.objectives import pack, values_objective


def last_token_index(batch: Batch) -> torch.Tensor:
    """Each row's last real token in the teacher-forced (right-padded) layout."""
    return batch["prompt_mask"].long().sum(-1) + batch["response_mask"].long().sum(-1) - 1


class RewardModelWorker(Worker):
    trainable = False

    def load_initial_weights(self) -> None:
        self.load_model_component(self.spec.options.reward_model_from)

    @register(Mode.DP)
    def compute_rm_score(self, batch: Batch) -> Batch:
        """r(x, y) [B]: the head's output at each response's last token."""
        self.set_train(False)
        scores = []
        fields = (*TEACHER_FORCED, "response_mask")
        for mb in micro_batches(batch.select(*fields), self.spec.options.responses_per_micro_batch):
            tf = teacher_forced(mb)
            out: list = []
            self.run_objective(tf.tokens, pack(tf.tokens[:, 1:]), values_objective(out), train=False)
            if self.is_last_stage:
                values = torch.cat(out)[:len(mb)].cpu()
                scores.append(values.gather(1, last_token_index(mb)[:, None]).squeeze(1))
        return Batch({"rm_scores": torch.cat(scores)}) if self.is_last_stage else Batch()
