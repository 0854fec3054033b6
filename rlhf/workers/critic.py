"""The critic V_φ: a value head on the decoder's trunk (trainer/models/value.py), PPO's baseline."""

from __future__ import annotations

import dataclasses

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from parallel.grad import clip_grad_norm
from rlhf.batch import Batch
from rlhf.dispatch import Mode, register
from rlhf.losses import LossScale, aggregate, value_loss
from rlhf.workers.actor import TEACHER_FORCED, micro_batches
from rlhf.workers.base import Worker


def value_config(model_cfg):
    """The actor's model config with the value head (`llama_value`)."""
    fields = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(type(model_cfg))} \
        if dataclasses.is_dataclass(model_cfg) else dict(model_cfg)
    from trainer.config import ModelConfig
    return ModelConfig(**{**fields, "name": "llama_value", "tie_embeddings": False})


def response_values(model, batch: Batch) -> torch.Tensor:
    """V(s_t) for each response token t: the head's output at the position before it."""
    prompt_len, resp_len = batch["prompts"].shape[1], batch["responses"].shape[1]
    values = model(batch["input_ids"], positions=batch["position_ids"], attention_mask=batch["attention_mask"])
    return values[:, prompt_len - 1:prompt_len + resp_len - 1].float()


class CriticWorker(Worker):

    def load_initial_weights(self) -> None:
        o = self.spec.options
        if o.critic_init_from:  # a value model already (e.g. a task=rm checkpoint)
            self.load_model_component(o.critic_init_from)
        elif o.init_from:  # the actor's trunk; the value head keeps its initialisation
            trunk_parts = list(self.parts)
            lm_cfg = dataclasses.replace(self.spec.model, name="llama") if dataclasses.is_dataclass(self.spec.model) \
                else self.spec.model
            lm = self.build_network(lm_cfg)
            self.load_model_component(o.init_from)
            trunk = {k: v for k, v in get_model_state_dict(lm).items() if not k.startswith("output.")}
            self.parts = trunk_parts
            set_model_state_dict(self.model, trunk, options=StateDictOptions(strict=False))
            del lm

    @register(Mode.DP)
    @torch.no_grad()
    def compute_values(self, batch: Batch) -> Batch:
        self.model.eval()
        values = [response_values(self.model, mb.to(self.device)).cpu()
                  for mb in micro_batches(batch.select(*TEACHER_FORCED), self.spec.options.responses_per_micro_batch)]
        return Batch({"values": torch.cat(values)})

    @register(Mode.DP)
    def update_critic(self, batch: Batch) -> Batch:
        """One optimizer step of the clipped value loss, aggregated like the policy loss."""
        o = self.spec.options
        scale = LossScale(**batch.meta["scale"])
        dp = self.info.dp_size
        self.model.train()
        total = 0.0
        for mb in micro_batches(batch, o.responses_per_micro_batch):
            mb = mb.to(self.device)
            vpred = response_values(self.model, mb)
            loss = aggregate(value_loss(vpred, mb["values"], mb["returns"], o.cliprange_value), mb["response_mask"],
                             o.loss_agg_mode, scale)
            (loss * dp).backward()
            total += float(loss.detach()) * dp
        norm = clip_grad_norm([p for part in self.parts for p in part.parameters()], self.spec.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return Batch({"vf_loss": torch.tensor([total], dtype=torch.float64),
                      "critic_grad_norm": torch.tensor([float(norm)], dtype=torch.float64)})
