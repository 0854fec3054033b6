"""Activation checkpointing (parallel/activation_checkpoint.py): recomputes, saves less, changes
neither the numbers nor the checkpoint keys."""

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from layout_harness import BASE, assert_same, check_layout, merge, reference, steps
from parallel.activation_checkpoint import apply_ac, unwrapped_fqn
from trainer.config import ModelConfig, OptimConfig
from trainer.models import build_model
from trainer.models.loss import cross_entropy_loss
from trainer.optim import build_optimizer

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32)


def _forward_backward(mode: str):
    """(block forward calls, bytes autograd saved outside checkpoints, grads) for one step."""
    torch.manual_seed(0)
    model = build_model(CFG)
    calls = []
    for block in model.layers.values():
        block.register_forward_pre_hook(lambda *_: calls.append(1))  # recompute stops early: no post-hook
    apply_ac(model, mode)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    grads = {unwrapped_fqn(n): p.grad for n, p in model.named_parameters()}
    return len(calls), sum(saved), grads


def test_recomputes_blocks_saves_less_and_gives_the_same_gradients():
    calls, saved, grads = _forward_backward("none")
    assert calls == 2
    for mode in ("full", "selective"):
        m_calls, m_saved, m_grads = _forward_backward(mode)
        assert m_calls == 4, mode  # each block's forward runs again in backward
        assert m_grads.keys() == grads.keys()
        for k in grads:
            torch.testing.assert_close(m_grads[k], grads[k], rtol=1e-6, atol=0, msg=f"{mode} {k}")
        if mode == "full":  # only block inputs are kept: the blocks' insides are not saved
            assert m_saved < saved / 3, (m_saved, saved)


def test_checkpoint_keys_are_the_unwrapped_fqns():
    plain = build_model(CFG)
    keys = set(get_model_state_dict(plain))
    opt_keys = set(get_optimizer_state_dict(plain, build_optimizer([plain], OptimConfig()))["state"])
    for mode in ("full", "selective"):
        model = apply_ac(build_model(CFG), mode)
        assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
        assert set(get_model_state_dict(model)) == keys == set(model.state_dict())
        optimizer = build_optimizer([model], OptimConfig())
        assert set(get_optimizer_state_dict(model, optimizer)["state"]) == opt_keys
        assert {unwrapped_fqn(n) for n, _ in model.named_parameters()} == keys


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="allowed: none, full, selective"):
        apply_ac(build_model(CFG), "some")


@pytest.mark.parametrize("layout", [
    ["parallel.activation_checkpoint=full"],
    ["parallel.activation_checkpoint=selective"],
    # selective keeps the tensor-parallel collectives' outputs: nothing is communicated twice
    ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.activation_checkpoint=selective"],
    ["parallel.pp=2", "parallel.dp_shard=2", "parallel.microbatches=2", "parallel.activation_checkpoint=full"],
], ids=["full", "selective", "tp2-sp-selective", "pp2-dp2-full"])
def test_layouts_with_recomputation_match_single_process(tiny_cfg, run_ranks, layout):
    if len(layout) == 1:  # one process: against the same run without recomputation
        assert_same(merge([steps(tiny_cfg(*BASE, *layout), 3, True)]), reference(tiny_cfg, []))
    else:
        check_layout(tiny_cfg, run_ranks, *layout)
