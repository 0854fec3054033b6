"""Batch sizes in one unit each (rlhf/config.py), the sizes derived from them, and the
combinations refused before any worker starts."""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.errors import ConfigError

GROUP_ALGORITHMS = ("grpo", "rloo")  # baselines from the other samples of the same prompt


@dataclass(frozen=True)
class BatchSizes:
    prompts_per_iteration: int
    samples_per_prompt: int
    responses_per_iteration: int
    responses_per_minibatch: int
    updates_per_iteration: int  # optimizer steps of each trained role per iteration
    micro_batches_per_worker: dict  # trained role -> forward/backward passes per worker per update

    def describe(self) -> str:
        micro = ", ".join(f"{role} {n}" for role, n in self.micro_batches_per_worker.items())
        return (f"batch: {self.prompts_per_iteration} prompts × {self.samples_per_prompt} samples = "
                f"{self.responses_per_iteration} responses per iteration; {self.updates_per_iteration} optimizer "
                f"update(s) per iteration of {self.responses_per_minibatch} responses; micro-batches per worker "
                f"per update: {micro}")


def derive_sizes(o, dp_sizes: dict[str, int]) -> BatchSizes:
    """The derived sizes, or a ConfigError naming the key. `dp_sizes`: trained role -> data-parallel size."""
    p, n, mb = o.prompts_per_iteration, o.samples_per_prompt, o.prompts_per_minibatch
    if mb > p or p % mb:
        raise ConfigError(f"task.prompts_per_minibatch={mb} must divide task.prompts_per_iteration={p} "
                          "(an iteration's prompts split into whole mini-batches)")
    if o.algorithm in GROUP_ALGORITHMS and n < 2:
        raise ConfigError(f"task.algorithm={o.algorithm} compares the samples of one prompt: "
                          f"task.samples_per_prompt={n} must be at least 2")
    responses = mb * n
    micro = {}
    for role, dp in dp_sizes.items():
        if responses % dp:
            raise ConfigError(f"task.prompts_per_minibatch × task.samples_per_prompt = {mb} × {n} = {responses} "
                              f"responses per mini-batch do not split over the {role}'s {dp} data-parallel workers "
                              f"(task.{role}.dp_shard × dp_replicate); make it a multiple of {dp}")
        micro[role] = math.ceil(responses // dp / o.responses_per_micro_batch)
    return BatchSizes(p, n, p * n, responses, o.epochs_per_iteration * (p // mb), micro)
