"""Registries of the parts researchers swap, looked up by name from config (verl's
`@register_adv_est("grpo")`): models, stream agents, advantage estimators, policy losses, reward
functions, aggregation strategies, query strategies, learners.

    AGENTS = Registry("stream agent", key="task.agent")

    @AGENTS.register("q")
    class StreamQ(StreamAgent): ...

    AGENTS.get(cfg.task.agent)   # unknown name -> ConfigError naming task.agent and the registered names
    AGENTS.resolve("my_pkg.agents:MyAgent")   # or a registered name
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, Optional, TypeVar

from trainer.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """name -> object. `kind` says what is registered ("model", "policy loss"), `key` which config
    key selects one (for the error a user sees)."""

    def __init__(self, kind: str, key: Optional[str] = None):
        self.kind = kind
        self.key = key
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@REGISTRY.register("name")`. Registering the same object again is a no-op
        (a module imported twice); a different object under a taken name is refused."""

        def add(obj: T) -> T:
            self.add(name, obj)
            return obj

        return add

    def add(self, name: str, obj: T) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        held = self._entries.get(name)
        if held is not None and held is not obj and _qualname(held) != _qualname(obj):
            raise ValueError(f"{self.kind} {name!r} is already registered as {_qualname(held)}; "
                             f"refusing {_qualname(obj)} under the same name")
        self._entries[name] = obj

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ConfigError(self.unknown(name))
        return self._entries[name]

    def resolve(self, name: str) -> T:
        """A registered name, or `package.module:attr` (a user's own, imported now)."""
        if ":" not in name:
            return self.get(name)
        module, _, attr = name.partition(":")
        what = f"{self.key}={name!r}" if self.key else f"{self.kind} {name!r}"
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"{what} cannot be imported: {err}") from None

    def unknown(self, name: str) -> str:
        """The message for a name nobody registered: the key, the value, what is allowed."""
        what = f"{self.key}={name!r}" if self.key else f"{self.kind} {name!r}"
        return f"{what} is not a registered {self.kind}; allowed: {', '.join(sorted(self._entries)) or '(none)'}"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def items(self):
        return sorted(self._entries.items())


def _qualname(obj: object) -> str:
    """module.qualname, which stays the same when a module is re-imported (a fresh class object)."""
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"
