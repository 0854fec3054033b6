"""rlhf/kl_control.py: fixed and adaptive β by hand, and β surviving a state round trip."""

import pytest

from rlhf.kl_control import KL_CONTROLLERS, AdaptiveKLController, FixedKLController
from trainer.errors import ConfigError


def test_fixed_keeps_its_value():
    c = KL_CONTROLLERS.get("fixed")(0.05)
    assert c.update(current_kl=3.0, n_steps=64) == 0.05


def test_adaptive_by_hand():
    c = AdaptiveKLController(0.1, target_kl=0.5, horizon=1000)
    # KL 0.6: error .2 -> beta .1 * (1 + .2 * 100/1000) = .102
    assert c.update(0.6, 100) == pytest.approx(0.102)
    # KL 5: error clipped to .2 again; KL .25: error -.5 clipped to -.2
    assert c.update(5.0, 100) == pytest.approx(0.102 * 1.02)
    assert c.update(0.25, 500) == pytest.approx(0.102 * 1.02 * 0.9)
    d = AdaptiveKLController(1.0, target_kl=0.5, horizon=1000)
    d.load_state_dict(c.state_dict())
    assert d.value == c.value and d.update(0.55, 1000) == pytest.approx(c.value * 1.1)


def test_bad_values_name_their_key():
    with pytest.raises(ConfigError, match="task.target_kl=0"):
        AdaptiveKLController(0.1, target_kl=0, horizon=10)
    with pytest.raises(ConfigError, match="task.kl_coef=-1"):
        FixedKLController(-1)
    with pytest.raises(ConfigError, match="task.kl_ctrl='pid'"):
        KL_CONTROLLERS.get("pid")
