"""trainer/registry.py: names to objects, with errors that name the config key."""

import pytest

from trainer.errors import ConfigError
from trainer.registry import Registry


def test_register_get_and_list():
    losses = Registry("policy loss", key="task.policy_loss")

    @losses.register("ppo")
    def ppo():
        return "clip"

    losses.add("vanilla", len)
    assert losses.get("ppo") is ppo and losses["vanilla"] is len
    assert "ppo" in losses and list(losses) == ["ppo", "vanilla"] and len(losses) == 2
    assert losses.names() == ["ppo", "vanilla"]


def test_unknown_name_is_a_config_error_naming_the_key_and_the_names():
    r = Registry("aggregation strategy", key="task.strategy")
    r.add("fedavg", object)
    with pytest.raises(ConfigError, match=r"task.strategy='krum' is not a registered aggregation strategy; "
                                          r"allowed: fedavg"):
        r.get("krum")
    assert "(none)" in Registry("learner").unknown("x")


def test_a_different_object_under_a_taken_name_is_refused():
    r = Registry("model")

    class A:
        pass

    class B:
        pass

    r.add("a", A)
    r.add("a", A)  # the same object again (a module imported twice): fine
    with pytest.raises(ValueError, match="already registered as .*A; refusing .*B"):
        r.add("a", B)
    with pytest.raises(ValueError, match="non-empty name"):
        r.add("", A)
