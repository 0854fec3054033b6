"""Task options: one dataclass, errors that name task.<key>, YAML that agrees with the schema."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from streaming_rl.config import DEFAULT_ENV, DEFAULT_TOTAL_STEPS, FIELDS, StreamConfig, env_id, task_config, total_steps
from trainer.config import ConfigError, validate

TASKS = Path(__file__).resolve().parents[2] / "configs" / "task"


def cfg_with(**task):
    return validate({"task": {"_target_": "streaming_rl.run.run", "name": "stream_q", **task}})


def test_defaults_and_agent_defaults():
    cfg = cfg_with()
    c = task_config(cfg)
    assert c == StreamConfig()
    assert env_id(cfg, c) == "CartPole-v1" and total_steps(cfg, c) == 150_000
    cfg = validate({"task": {"_target_": "streaming_rl.run.run", "name": "stream_ac", "agent": "ac"},
                    "env": "Walker2d-v5", "trainer": {"total_steps": 123}})
    c = task_config(cfg)
    assert env_id(cfg, c) == "Walker2d-v5" and total_steps(cfg, c) == 123


@pytest.mark.parametrize("task, words", [
    ({"bogus": 1}, ["task.bogus", "allowed", "kappa_policy"]),
    ({"optimizer": "adam"}, ["task.optimizer='adam'", "obgd, adaptive_obgd, sgd"]),
    ({"agent": "ppo"}, ["task.agent='ppo'", "q, td, sarsa, ac"]),
    ({"init": "xavier"}, ["task.init", "sparse, default"]),
    ({"gamma": "abc"}, ["task.gamma", "abc"]),
    ({"lamda": 1.5}, ["task.lamda=1.5", "[0, 1]"]),
    ({"sparsity": 1.0}, ["task.sparsity", "[0, 1)"]),
    ({"hidden_size": 0}, ["task.hidden_size", ">= 1"]),
    ({"exploration_fraction": 0.0}, ["task.exploration_fraction", "(0, 1]"]),
])
def test_bad_options_name_the_key_and_the_allowed_values(task, words):
    with pytest.raises(ConfigError) as err:
        task_config(cfg_with(**task))
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_shared_options_yaml_agrees_with_the_schema():
    listed = yaml.safe_load((TASKS.parent / "task_options" / "stream.yaml").read_text())
    assert list(listed) == FIELDS
    defaults = dataclasses.asdict(StreamConfig())
    assert {k: v for k, v in listed.items()} == defaults


@pytest.mark.parametrize("agent", ["td", "q", "sarsa", "ac"])
def test_task_yaml_states_the_agents_defaults(agent):
    text = (TASKS / f"stream_{agent}.yaml").read_text()
    assert text.startswith("# @package _global_")
    cfg = yaml.safe_load(text)
    assert cfg["task"] == {"_target_": "streaming_rl.run.run", "name": f"stream_{agent}", "agent": agent}
    assert cfg["env"] == DEFAULT_ENV[agent]
    assert cfg["trainer"]["total_steps"] == DEFAULT_TOTAL_STEPS[agent]


def test_cli_composition_takes_task_overrides_without_plus(tmp_path):
    from hydra import compose, initialize_config_dir

    from trainer.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        raw = compose("plait", overrides=["task=stream_ac", "env=Hopper-v5", "trainer.total_steps=2000000",
                                          "task.gamma=0.95", f"run_dir={tmp_path}"])
    cfg = validate(raw)
    assert cfg.name == "stream_ac-Hopper-v5" and cfg.checkpoint.every == 50_000
    c = task_config(cfg)
    assert c.agent == "ac" and c.gamma == 0.95 and total_steps(cfg, c) == 2_000_000
