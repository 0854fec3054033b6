"""How optimizer hyperparameters are stored in a checkpoint, whatever the backend (torch or ZeRO).

Tensors are keyed by parameter FQN (`state.<fqn>.exp_avg`) so they reshard; hyperparameters are kept
per param group in one JSON item (`param_groups`), since flattened per parameter they would be a
dozen checkpoint objects for every parameter and DCP pays per object.
"""

from __future__ import annotations

import json


def param_groups_to_json(param_groups: list[dict]) -> str:
    """The optimizer's groups without their parameter lists."""
    return json.dumps([{k: v for k, v in g.items() if k != "params"} for g in param_groups])


def param_groups_from_json(text: str) -> list[dict]:
    """Inverse of `param_groups_to_json` (JSON lists back to the tuples optimizers use, e.g. betas)."""
    return [{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()} for g in json.loads(text)]
