"""Task family `pretrain`: a Llama-style decoder trained on a text corpus on any (pp, dp, tp)
layout (runner: trainer/pretrain.py). It reads every LM-training section; its checks are the
layout rules (trainer/config.py `check_combinations`), the model registry and the corpus."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainer.config import PlaitConfig, check_combinations, check_data
from trainer.task import OPTIONAL_SECTIONS, TaskFamily, TaskOptions


@dataclass
class PretrainOptions(TaskOptions):
    """No options of its own: pretraining is configured by model, data, optim, parallel, trainer."""


def check(cfg: PlaitConfig, launcher_world: Optional[int]) -> int:
    from trainer.models import model_class

    model_class(cfg.model.name)  # an unknown name: ConfigError naming model.name and the registered ones
    check_data(cfg.data)
    return check_combinations(cfg, launcher_world)


FAMILY = TaskFamily(name="pretrain", options=PretrainOptions, runners=("trainer.pretrain.run",),
                    reads=OPTIONAL_SECTIONS, check=check)
