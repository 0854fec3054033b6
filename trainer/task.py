"""The task-family contract: how pretraining, RLHF, federated, streaming RL and continual learners
plug into one launcher.

A task family is

- a **runner**, `run(cfg: PlaitConfig, env: DistEnv) -> dict`, named by the task YAML's `_target_`
  and called once in every rank (`trainer.launch.rank.run_rank`);
- a **typed options dataclass**, a subclass of `TaskOptions`: every option of `task.*` with its
  type, its default (stated once, here) and its allowed values or range (`choice`, `bounded`). It
  is stored in Hydra's ConfigStore as `task_options/<family>`, so a task YAML pulls it in with
  `defaults: [/task_options/<family>@task]` and states only what differs, and `task.<key>=value`
  overrides are type-checked while Hydra composes;
- the **core sections it reads** (`model`, `data`, `optim`, `parallel`, `trainer`, or single keys
  such as `trainer.precision`): a setting in any other section that differs from its default is
  an error naming it, not silently ignored;
- a **check**, `check(cfg, launcher_world) -> world size`: the family's cross-field rules, run by
  the CLI before any rank is spawned or any Slurm job submitted (registry names resolved, files
  found, layouts divisible). A rule that can only be found inside a rank raises `ConfigError`
  there: `run_rank` prints one `plait: error:` line and exits 2.

Families are discovered through the `plait.tasks` entry-point group (pyproject.toml), so a package
outside Plait can add one. The module an entry point names must stay light to import (options,
checks; no Ray, no Flower): the CLI loads every family at start; the runner is imported when the
task is validated.

    [project.entry-points."plait.tasks"]
    stream = "streaming_rl.task:FAMILY"
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.errors import ConfigError
from trainer.registry import Registry

if TYPE_CHECKING:
    from trainer.config import PlaitConfig
    from trainer.launch.distributed import DistEnv

ENTRY_POINTS = "plait.tasks"
OPTIONS_GROUP = "task_options"
# Sections every task reads; the others are read only by the families that declare them.
ALWAYS_READ = ("task", "name", "run_dir", "seed", "device", "checkpoint", "launcher", "logger")
OPTIONAL_SECTIONS = ("model", "data", "optim", "parallel", "trainer")


class TaskRunner(Protocol):
    """What a task's `_target_` names: called once per rank with the validated config and the
    rank's process-group environment; returns a summary of the run (logged by nobody: tests,
    notebooks and sweeps read it)."""

    def __call__(self, cfg: "PlaitConfig", env: "DistEnv") -> dict: ...


@dataclass
class TaskOptions:
    """`cfg.task` of every task: the runner (`module.function`) and the task's name. A family
    subclasses this with its own options."""

    _target_: str = MISSING
    name: str = MISSING


def _one_process(cfg: "PlaitConfig", launcher_world: Optional[int]) -> int:
    """The default world-size rule: one process (the runner starts whatever workers it needs)."""
    if launcher_world not in (None, 1):
        raise ConfigError(f"task={cfg.task.name} runs in one process, but the launcher started "
                          f"{launcher_world} ranks; start it once (plait ..., or srun -n 1)")
    return 1


@dataclass(frozen=True)
class TaskFamily:
    """One family: its options schema, the runners it serves, what it reads, its checks."""

    name: str  # its options are the ConfigStore node task_options/<name>
    options: type  # a TaskOptions subclass
    runners: tuple[str, ...]  # the `_target_`s whose `task.*` these options are
    reads: tuple[str, ...] = ()  # core sections (or section.key) read besides ALWAYS_READ
    check: Callable[["PlaitConfig", Optional[int]], int] = _one_process


FAMILIES: Registry[TaskFamily] = Registry("task family")


@functools.lru_cache(maxsize=1)
def load_families() -> Registry[TaskFamily]:
    """Every family installed under the `plait.tasks` entry points (once per process)."""
    for ep in entry_points(group=ENTRY_POINTS):
        family = ep.load()
        if not isinstance(family, TaskFamily):
            raise TypeError(f"entry point {ep.name} = {ep.value} in group {ENTRY_POINTS} is a "
                            f"{type(family).__name__}, not a trainer.task.TaskFamily")
        FAMILIES.add(family.name, family)
    return FAMILIES


def register_options() -> None:
    """Store each family's options in Hydra's ConfigStore (`task_options/<family>`)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, family in load_families().items():
        store.store(group=OPTIONS_GROUP, name=name, node=family.options)


def family_of(target: str) -> TaskFamily:
    """The family whose runner `target` is; a target that does not import, or that no family
    declares, is a ConfigError naming `task._target_`."""
    families = load_families()
    for _, family in families.items():
        if target in family.runners:
            return family
    resolve_target(target)  # a typo'd module says so first
    runners = sorted(r for _, f in families.items() for r in f.runners)
    raise ConfigError(f"task._target_={target!r} is no registered task family's runner; allowed: "
                      f"{', '.join(runners)} (a new family registers in the {ENTRY_POINTS} entry points)")


def resolve_target(path: str) -> TaskRunner:
    """The runner a task config's `_target_` names (`module.function`); ConfigError if there is none."""
    module, _, name = path.rpartition(".")
    if not module or not name:
        raise ConfigError(f"task._target_={path!r} is not a module.function path (e.g. trainer.pretrain.run)")
    try:
        mod = importlib.import_module(module)
    except (ImportError, TypeError, ValueError) as err:  # Type/Value: a relative '..x'
        raise ConfigError(f"task._target_={path!r} cannot be imported: {err}") from None
    runner = getattr(mod, name, None)
    if runner is None:
        raise ConfigError(f"task._target_={path!r} cannot be imported: module {module} has no {name!r}")
    if not callable(runner):
        raise ConfigError(f"task._target_={path!r} is a {type(runner).__name__}, not a runner function")
    return runner


def task_options(family: TaskFamily, task: dict) -> TaskOptions:
    """`cfg.task` as the family's typed options: unknown keys and wrong types name `task.<key>`."""
    allowed = [f.name for f in dataclasses.fields(family.options)]
    unknown = sorted(set(task) - set(allowed))
    if unknown:
        own = [k for k in allowed if k not in ("_target_", "name")]
        raise ConfigError(f"unknown key(s) {', '.join('task.' + k for k in unknown)} for task={task.get('name')}; "
                          f"allowed: {', '.join(own) or '(no options)'}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(family.options), task)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or ""
        raise ConfigError(f"task.{key}: {str(err).splitlines()[0]}") from None


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if dataclasses.is_dataclass(node):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(node):
            out.update(_flat(getattr(node, f.name), f"{prefix}{f.name}."))
        return out
    return {prefix[:-1]: node}


def unread_settings(cfg: "PlaitConfig", family: TaskFamily, defaults: "PlaitConfig") -> list[str]:
    """`key=value` of every setting that differs from its default in a section `family` does not read."""
    reads = set(family.reads)
    out = []
    for section in OPTIONAL_SECTIONS:
        if section in reads:
            continue
        here, default = _flat(getattr(cfg, section), f"{section}."), _flat(getattr(defaults, section), f"{section}.")
        out += [f"{key}={value!r}" for key, value in here.items()
                if key not in reads and value != default[key]]
    return out
