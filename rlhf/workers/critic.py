"""The critic V_φ: a value head on the decoder's trunk (trainer/models/value.py), PPO's baseline."""

from __future__ import annotations

import dataclasses

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from rlhf.batch import Batch
from rlhf.dispatch import Mode, register
from rlhf.logprobs import teacher_forced
from rlhf.losses import LossScale
from rlhf.workers.actor import TEACHER_FORCED, micro_batches
from rlhf.workers.base import Worker
from rlhf.workers.objectives import pack, value_objective, values_objective


def value_config(model_cfg):
    """The actor's model config with the value head (`llama_value`)."""
    fields = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(type(model_cfg))} \
        if dataclasses.is_dataclass(model_cfg) else dict(model_cfg)
    from trainer.config import ModelConfig
    return ModelConfig(**{**fields, "name": "llama_value", "tie_embeddings": False})


class CriticWorker(Worker):

    def load_initial_weights(self) -> None:
        o = self.spec.options
        if o.critic_init_from:  # a value model already (e.g. a task=rm checkpoint)
            self.load_model_component(o.critic_init_from)
        elif o.init_from:  # the actor's trunk; the value head keeps its initialisation
            critic_parts, critic_pipeline = self.parts, self.pipeline
            lm_cfg = dataclasses.replace(self.spec.model, name="llama") if dataclasses.is_dataclass(self.spec.model) \
                else self.spec.model
            self.build_network(lm_cfg)
            self.load_model_component(o.init_from)
            for critic_part, lm_part in zip(critic_parts, self.parts):  # the same chunks under the same layout
                trunk = {k: v for k, v in get_model_state_dict(lm_part).items() if not k.startswith("output.")}
                set_model_state_dict(critic_part, trunk, options=StateDictOptions(strict=False))
            self.parts, self.pipeline = critic_parts, critic_pipeline

    @register(Mode.DP)
    def compute_values(self, batch: Batch) -> Batch:
        """V(s_t) [B, R] for each response token t: the head's output at the position before it."""
        self.set_train(False)
        values = []
        for mb in micro_batches(batch.select(*TEACHER_FORCED), self.spec.options.responses_per_micro_batch):
            tf = teacher_forced(mb)
            out: list = []
            self.run_objective(tf.tokens, pack(tf.tokens[:, 1:]), values_objective(out), train=False)
            if self.is_last_stage:
                values.append(tf.to_responses(torch.cat(out)[:len(mb)].cpu()))
        return Batch({"values": torch.cat(values)}) if self.is_last_stage else Batch()

    @register(Mode.DP)
    def update_critic(self, batch: Batch) -> Batch:
        """One optimizer step of the clipped value loss, aggregated like the policy loss."""
        o = self.spec.options
        scale = LossScale(**batch.meta["scale"])
        self.set_train(True)
        stats: dict[str, float] = {}
        for mb in micro_batches(batch, o.responses_per_micro_batch):
            tf = teacher_forced(mb)
            packed = pack(tf.to_positions(mb["response_mask"].float()), tf.to_positions(mb["values"]),
                          tf.to_positions(mb["returns"]))
            self.run_objective(tf.tokens, packed, value_objective(o, scale, self.info.dp_size, stats), train=True)
        norm = self.optimizer_step()
        return Batch({"vf_loss": torch.tensor([stats.get("vf_loss", 0.0)], dtype=torch.float64),
                      "critic_grad_norm": torch.tensor([norm], dtype=torch.float64)})
