"""Shared by the RLHF run tests: a small composed config, an in-process run, one Ray per session."""

from __future__ import annotations

import json

import pytest

SMALL = ["model.dim=32", "model.n_layers=2", "model.ffn_dim=64", "logger.progress=false",
         "task.prompts.train_size=256", "task.prompts.heldout_size=32", "task.prompts_per_iteration=8",
         "task.samples_per_prompt=4", "task.prompts_per_minibatch=4", "task.responses_per_micro_batch=8",
         "task.max_new_tokens=4", "task.eval_every=2", "task.reward=answer_prefix", "task.actor_lr=3e-3"]
TIMING = ("tokens_per_s", "time/", "time")


def rlhf_config(run_dir, *overrides: str, task: str = "rlhf") -> dict:
    """The validated config dict the CLI would hand the driver."""
    from hydra import compose, initialize_config_dir

    from trainer.cli import CONFIG_DIR
    from trainer.config import as_dict, validate

    base = SMALL if task == "rlhf" else ["model.dim=32", "model.n_layers=2", "model.ffn_dim=64", "logger.progress=false"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        raw = compose("plait", overrides=[f"task={task}", f"run_dir={run_dir}",
                                          *base, *overrides])
    return as_dict(validate(raw))


def run_in_process(cfg_dict: dict) -> dict:
    """The task's runner in this process (the driver), as `plait` runs it."""
    from trainer.config import validate
    from trainer.launch.distributed import init_distributed
    from trainer.task import resolve_target

    cfg = validate(cfg_dict)
    return resolve_target(cfg.task._target_)(cfg, init_distributed(device="cpu"))


def metrics(run_dir) -> dict[int, dict]:
    """{iteration: metrics without the timing ones} from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting one costs ~5-8 s)."""
    import ray

    from rlhf.groups.ray_group import ensure_ray

    started = ensure_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()
