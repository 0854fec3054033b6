"""Task options: one dataclass registered in Hydra's ConfigStore, errors that name task.<key>,
task YAMLs that state only what differs from the schema."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from streaming_rl.config import StreamConfig
from trainer.config import ConfigError, validate

TASKS = Path(__file__).resolve().parents[2] / "configs" / "task"


def cfg_with(**task):
    return validate({"task": {"_target_": "streaming_rl.run.run", "name": "stream_q", **task}})


def test_defaults_come_from_the_schema():
    cfg = cfg_with()
    assert isinstance(cfg.task, StreamConfig)
    assert dataclasses.replace(cfg.task, _target_=StreamConfig._target_, name=StreamConfig.name) == StreamConfig()
    assert cfg.task.env == "CartPole-v1" and cfg.task.total_steps == 100_000
    cfg = cfg_with(agent="ac", env="Walker2d-v5", total_steps=123)
    assert cfg.task.env == "Walker2d-v5" and cfg.task.total_steps == 123


@pytest.mark.parametrize("task, words", [
    ({"bogus": 1}, ["task.bogus", "allowed", "kappa_policy"]),
    ({"optimizer": "adam"}, ["task.optimizer='adam'", "obgd, adaptive_obgd, sgd"]),
    ({"agent": "ppo"}, ["task.agent='ppo'", "ac, q, sarsa, td"]),
    ({"init": "xavier"}, ["task.init", "sparse, default"]),
    ({"gamma": "abc"}, ["task.gamma", "abc"]),
    ({"lamda": 1.5}, ["task.lamda=1.5", "[0, 1]"]),
    ({"lr": -1}, ["task.lr=-1", "> 0"]),
    ({"sparsity": 1.0}, ["task.sparsity", "[0, 1)"]),
    ({"hidden_size": 0}, ["task.hidden_size", ">= 1", "null"]),
    ({"exploration_fraction": 0.0}, ["task.exploration_fraction", "(0, 1]"]),
    ({"total_steps": 0}, ["task.total_steps=0", ">= 1"]),
    ({"env": "Hoper-v5"}, ["task.env='Hoper-v5'", "Hopper-v5"]),
])
def test_bad_options_name_the_key_and_the_allowed_values(task, words):
    with pytest.raises(ConfigError) as err:
        cfg_with(**task)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


@pytest.mark.parametrize("setting, key", [({"trainer": {"max_steps": 5}}, "trainer.max_steps=5"),
                                          ({"model": {"dim": 64}}, "model.dim=64"),
                                          ({"optim": {"lr": 0.1}}, "optim.lr=0.1")])
def test_a_setting_the_task_does_not_read_is_an_error(setting, key):
    with pytest.raises(ConfigError) as err:
        validate({"task": {"_target_": "streaming_rl.run.run", "name": "stream_q"}, **setting})
    assert key in str(err.value) and "not used by task=stream_q" in str(err.value)


@pytest.mark.parametrize("agent", ["td", "q", "sarsa", "ac"])
def test_task_yaml_states_only_what_differs_from_the_schema(agent):
    text = (TASKS / f"stream_{agent}.yaml").read_text()
    assert text.startswith("# @package _global_")
    cfg = yaml.safe_load(text)
    assert cfg["defaults"][0] == "/task_options/stream@task"
    defaults = dataclasses.asdict(StreamConfig())
    stated = {k: v for k, v in cfg["task"].items() if k not in ("_target_", "name")}
    assert stated["agent"] == agent
    assert all(defaults[k] != v for k, v in stated.items() if k != "agent"), stated  # the agent always


def test_cli_composition_takes_task_overrides_without_plus(tmp_path):
    from hydra import compose, initialize_config_dir

    from trainer.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        raw = compose("plait", overrides=["task=stream_ac", "task.env=Walker2d-v5", "task.total_steps=2000",
                                          "task.gamma=0.95", f"run_dir={tmp_path}"])
    cfg = validate(raw)
    assert cfg.name == "stream_ac-Walker2d-v5" and cfg.checkpoint.every == 50_000
    assert cfg.task.agent == "ac" and cfg.task.gamma == 0.95 and cfg.task.total_steps == 2000
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        raw = compose("plait", overrides=["task=stream_ac", f"run_dir={tmp_path}"])
    assert validate(raw).task.env == "Hopper-v5" and validate(raw).task.total_steps == 2_000_000
