"""The task-family contract (trainer/task.py): families found by entry point, typed options with
defaults once, settings a task does not read refused, the family's checks run at validation."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from trainer.config import ConfigError, bounded, choice, validate, validate_run
from trainer.task import FAMILIES, TaskFamily, TaskOptions, family_of, load_families, resolve_target

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class ToyOptions(TaskOptions):
    rounds: int = bounded(3, ge=1)
    mode: str = choice("a", "b")


def toy_run(cfg, env):
    return {"rounds": cfg.task.rounds}


def toy_check(cfg, launcher_world):
    if cfg.task.mode == "b" and cfg.task.rounds < 2:
        raise ConfigError(f"task.mode=b needs task.rounds >= 2, got {cfg.task.rounds}")
    return 1


@pytest.fixture
def toy():
    family = TaskFamily("toy", ToyOptions, runners=(f"{__name__}.toy_run",), reads=("trainer.precision",),
                        check=toy_check)
    load_families()
    FAMILIES._entries["toy"] = family
    yield lambda **task: {"task": {"_target_": f"{__name__}.toy_run", "name": "toy", **task}}
    del FAMILIES._entries["toy"]


def test_the_installed_families_and_their_runners():
    families = load_families()
    assert {"pretrain", "stream"} <= set(families.names())
    for name, family in families.items():
        assert issubclass(family.options, TaskOptions), name
        for runner in family.runners:
            assert callable(resolve_target(runner))


def test_options_are_stored_in_hydras_config_store():
    from hydra.core.config_store import ConfigStore

    from trainer.config import register_schema

    register_schema()
    stored = ConfigStore.instance().repo["task_options"]
    assert {"pretrain.yaml", "stream.yaml"} <= set(stored)


def test_typed_options_with_their_defaults_and_checks(toy):
    cfg, world = validate_run(toy())
    assert isinstance(cfg.task, ToyOptions) and cfg.task.rounds == 3 and world == 1
    assert toy_run(cfg, None) == {"rounds": 3}
    for task, words in (({"rounds": 0}, ["task.rounds=0", ">= 1"]), ({"mode": "c"}, ["task.mode='c'", "a, b"]),
                        ({"mode": "b", "rounds": 1}, ["task.mode=b needs task.rounds >= 2"]),
                        ({"extra": 1}, ["task.extra", "rounds, mode"])):
        with pytest.raises(ConfigError) as err:
            validate(toy(**task))
        assert all(w in str(err.value) for w in words), (words, str(err.value))


def test_settings_the_task_does_not_read_are_refused_by_name(toy):
    assert validate({**toy(), "trainer": {"precision": "bf16"}}).trainer.precision == "bf16"  # a key it reads
    with pytest.raises(ConfigError, match=r"model.dim=64, trainer.max_steps=5: not used by task=toy"):
        validate({**toy(), "trainer": {"max_steps": 5}, "model": {"dim": 64}})



def test_the_default_world_size_rule_is_one_process(toy):
    FAMILIES._entries["toy"] = TaskFamily("toy", ToyOptions, runners=(f"{__name__}.toy_run",))
    assert validate_run(toy(), world_size=1)[1] == 1
    with pytest.raises(ConfigError, match="task=toy runs in one process, but the launcher started 2 ranks"):
        validate(toy(), world_size=2)


def test_a_target_nobody_registered_or_that_does_not_import():
    with pytest.raises(ConfigError, match="'os.getcwd' is no registered task family's runner; allowed: .*trainer.pretrain.run"):
        family_of("os.getcwd")
    with pytest.raises(ConfigError, match="cannot be imported: No module named 'nosuch'"):
        family_of("nosuch.run")
    with pytest.raises(ConfigError, match="not a module.function"):
        resolve_target("run")
    with pytest.raises(ConfigError, match="cannot be imported: module os has no .nope."):
        resolve_target("os.nope")


@pytest.mark.parametrize("task", sorted(p.stem for p in (CONFIGS / "task").glob("*.yaml")))
def test_every_task_config_composes_and_validates(task, tmp_path):
    from hydra import compose, initialize_config_dir

    from trainer.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        raw = compose("plait", overrides=[f"task={task}", f"run_dir={tmp_path}"])
    cfg = validate(raw)
    family = family_of(cfg.task._target_)
    assert isinstance(cfg.task, family.options) and cfg.task.name == task
