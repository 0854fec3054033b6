"""The streaming TPP learners (`task.learner=tpp | prompt_tpp`) on event streams (`continual.hawkes`):
the base attention TPP fine-tuned period by period, and PromptTPP (the same TPP with a retrieval
prompt pool). Both train on one period's sequences at a time, without a rehearsal buffer.

`prompt_tpp` with `task.freeze_base=true` (the default) trains everything on the first period and
afterwards only the prompt pool (keys and prompts): the L2P-style reading of PromptTPP, in which
what a new period teaches lives in prompts that the retrieval picks per sequence, and the shared
model no longer moves. With `freeze_base=false` the base trains along with the pool throughout.
"""

from __future__ import annotations

import math

import torch

from continual.learners import Learner, LearnerSpec, register_learner
from continual.tpp import AttentionTPP, EventBatch, PromptPool


def sequences_of(ds) -> tuple[list, list]:
    """(times, types) of an event dataset as lists of per-sequence lists."""
    cols = ds[:]
    return cols["times"], cols["types"]


def mean_gap_window(horizon: float) -> float:
    """The look-ahead window of next-event prediction: a quarter of the observation horizon."""
    return horizon / 4


@register_learner("tpp", "events")
class TPPLearner(Learner):
    """The base TPP, fine-tuned on each period with Adam (`task.tpp_lr`, fresh per period)."""

    prompts = False

    def __init__(self, spec: LearnerSpec):
        super().__init__(spec)
        o = spec.options
        pool = (PromptPool(o.prompt_pool_size, o.prompt_top_n, o.prompt_length, o.tpp_hidden, spec.seed)
                if self.prompts else None)
        self.model = AttentionTPP(spec.num_classes, o.tpp_hidden, o.tpp_layers, o.tpp_heads, pool,
                                  o.integration_points, spec.seed)
        self.register_buffer("periods_seen", torch.zeros((), dtype=torch.int64))

    def trainable(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def train_experience(self, ds, horizon: float) -> dict:
        o = self.spec.options
        opt = torch.optim.Adam(self.trainable(), lr=o.tpp_lr)
        times, types = sequences_of(ds)
        total, steps = 0.0, 0
        for _ in range(o.epochs):
            for idx in self.batches(len(times), o.batch_size):
                batch = EventBatch.collate([times[i] for i in idx], [types[i] for i in idx], horizon)
                ll, sim = self.model.log_likelihood(batch)
                loss = -ll / max(batch.num_events, 1) - o.prompt_similarity_weight * sim
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, steps = total + loss.item(), steps + 1
        self.periods_seen += 1
        return {"loss": total / max(steps, 1), "steps": steps}

    @torch.no_grad()
    def evaluate(self, ds, horizon: float) -> dict:
        """Log-likelihood per event, next-event time RMSE and type error rate on a set of sequences."""
        batch = EventBatch.collate(*sequences_of(ds), horizon)
        ll, _ = self.model.log_likelihood(batch)
        when, kind = self.model.predict_next(batch, mean_gap_window(horizon))
        m = batch.mask
        n = max(batch.num_events, 1)
        return {"ll": float(ll) / n, "rmse": math.sqrt(float(((when - batch.times) ** 2 * m).sum()) / n),
                "type_error": float(((kind != batch.types) & m).sum()) / n}


@register_learner("prompt_tpp", "events")
class PromptTPPLearner(TPPLearner):
    """PromptTPP: the base TPP with a continuous-time retrieval prompt pool in every attention layer."""

    prompts = True

    def trainable(self):
        if self.spec.options.freeze_base and int(self.periods_seen) > 0:
            return list(self.model.pool.parameters())
        return list(self.model.parameters())
