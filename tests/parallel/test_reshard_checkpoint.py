"""Checkpoints cross layouts: saved under pipeline x tensor parallelism (pipeline parts, DTensor
shards), loaded in one process, and the reverse; every model and optimizer tensor equal."""

import numpy as np
import pytest
import torch

from layout_harness import BASE, build_loop, world_of
from parallel.activation_checkpoint import unwrapped_fqn
from trainer.checkpoint import Checkpointer
from trainer.checkpoint.state import ModelState, OptimizerState


def full_state(loop) -> dict:
    """Every parameter and optimizer-state tensor this rank holds, whole, keyed by FQN, and the
    optimizer's hyperparameters."""
    out: dict = {"hyperparameters": [{k: v for k, v in g.items() if k != "params"}
                                     for g in loop.p.optimizer.param_groups]}
    for part in loop.p.parts:
        for name, p in part.named_parameters():
            fqn = unwrapped_fqn(name)
            out[fqn] = _whole(p)
            for key, value in loop.p.optimizer.state.get(p, {}).items():
                out[f"optim.{fqn}.{key}"] = _whole(value)
    return out


def _whole(t: torch.Tensor) -> np.ndarray:
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return t.detach().numpy().copy()


def _components(loop) -> dict:
    return {"model": ModelState(loop.p.parts), "optimizer": OptimizerState(loop.p.parts, loop.p.optimizer)}


def train_and_save(cfg_dict: dict, directory: str, n_steps: int = 2) -> dict:
    loop, _ = build_loop(cfg_dict)
    for _ in range(n_steps):
        loop.train_step()
    Checkpointer(directory).save(n_steps, _components(loop))
    return full_state(loop)


def load(cfg_dict: dict, directory: str) -> dict:
    """The state loaded from `directory`; training then goes on from it."""
    loop, _ = build_loop(cfg_dict)
    checkpointer = Checkpointer(directory)
    checkpointer.load(checkpointer.latest(), _components(loop))
    state = full_state(loop)
    loop.train_step()
    return state


def merged(results: list[dict]) -> dict:
    out: dict = {}
    for res in results:
        for k, v in res.items():
            if k in out:
                assert np.array_equal(out[k], v) if k != "hyperparameters" else out[k] == v, k
            out[k] = v
    return out


def assert_equal_states(got: dict, want: dict) -> None:
    assert got.keys() == want.keys(), sorted(got.keys() ^ want.keys())
    assert got.pop("hyperparameters") == want.pop("hyperparameters")
    different = [k for k in want if not np.array_equal(got[k], want[k])]
    assert not different, different


LAYOUTS = [
    ["parallel.pp=2", "parallel.tp=2", "parallel.microbatches=2"],
    ["parallel.pp=2", "parallel.virtual_stages=2", "parallel.schedule=interleaved_1f1b", "parallel.microbatches=2",
     "parallel.dp_shard=2"],
]
IDS = ["pp2-tp2", "pp2-interleaved-dp2"]


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_saved_under_layout_loads_in_one_process(tiny_cfg, run_ranks, tmp_path, layout):
    ckpt = str(tmp_path / "ckpt")
    saved = merged(run_ranks(world_of(layout), train_and_save, tiny_cfg(*BASE, *layout), ckpt))
    assert any(k.startswith("optim.") and k.endswith("exp_avg") for k in saved)
    assert_equal_states(load(tiny_cfg(*BASE), ckpt), saved)


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_saved_in_one_process_loads_under_layout(tiny_cfg, run_ranks, tmp_path, layout):
    ckpt = str(tmp_path / "ckpt")
    saved = train_and_save(tiny_cfg(*BASE), ckpt)
    assert_equal_states(merged(run_ranks(world_of(layout), load, tiny_cfg(*BASE, *layout), ckpt)), saved)


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_saved_under_layout_resumes_under_it(tiny_cfg, run_ranks, tmp_path, layout):
    ckpt = str(tmp_path / "ckpt")
    cfg = tiny_cfg(*BASE, *layout)
    saved = merged(run_ranks(world_of(layout), train_and_save, cfg, ckpt))
    assert_equal_states(merged(run_ranks(world_of(layout), load, cfg, ckpt)), saved)
