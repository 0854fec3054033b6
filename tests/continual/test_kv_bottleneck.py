"""Discrete Key-Value Bottleneck: shapes, frozen keys, EMA k-means with dead codes, local updates,
and a short version of the paper's 2-D class-incremental toy against a plain MLP."""

import math

import pytest
import torch
from torch import nn

from continual.kv_bottleneck import KeyValueBottleneck, codebook_voting_logits, ema_update, nearest_keys
from trainer.errors import ConfigError


def test_shapes_chunk_and_random_projection():
    z = torch.randn(7, 12)
    chunk = KeyValueBottleneck(12, num_codebooks=4, key_value_pairs_per_codebook=16, dim_values=5, topk=2)
    assert chunk.dim_keys == 3 and chunk.split(z).shape == (7, 4, 3)
    torch.testing.assert_close(chunk.split(z)[:, 1], z[:, 3:6])
    assert chunk.lookup(z).shape == (7, 4, 2)
    assert chunk.retrieve(z).shape == (7, 4, 5) and chunk(z).shape == (7, 5)
    proj = KeyValueBottleneck(12, num_codebooks=6, key_value_pairs_per_codebook=8, dim_values=3, dim_keys=4,
                              splitting="random_projection")
    assert proj.split(z).shape == (7, 6, 4) and proj(z).shape == (7, 3)
    assert torch.equal(proj(z), torch.zeros(7, 3))  # values start at zero
    with pytest.raises(ValueError, match=r"\[B, 12\]"):
        chunk(torch.randn(7, 11))


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match=r"num_codebooks=5 does not divide .* 12 .*1, 2, 3, 4, 6, 12.*random_projection"):
        KeyValueBottleneck(12, num_codebooks=5, key_value_pairs_per_codebook=8, dim_values=3)
    with pytest.raises(ConfigError, match="dim_keys=4 must equal dim_embed/num_codebooks=3"):
        KeyValueBottleneck(12, num_codebooks=4, key_value_pairs_per_codebook=8, dim_values=3, dim_keys=4)
    with pytest.raises(ConfigError, match="dim_keys=None is required"):
        KeyValueBottleneck(12, num_codebooks=5, key_value_pairs_per_codebook=8, dim_values=3, splitting="random_projection")
    with pytest.raises(ConfigError, match="topk=9"):
        KeyValueBottleneck(12, num_codebooks=4, key_value_pairs_per_codebook=8, dim_values=3, topk=9)
    with pytest.raises(ConfigError, match="splitting='pca'"):
        KeyValueBottleneck(12, num_codebooks=4, key_value_pairs_per_codebook=8, dim_values=3, splitting="pca")


def test_pure_pieces():
    s = torch.tensor([1.0, 2.0])
    assert ema_update(s, torch.tensor([3.0, 0.0]), 0.5) is s and s.tolist() == [2.0, 1.0]
    keys = torch.tensor([[[0.0], [1.0], [5.0]]])  # one codebook, three 1-d keys
    heads = torch.tensor([[[0.9]], [[4.0]]])
    assert nearest_keys(heads, keys, topk=2).tolist() == [[[1, 0]], [[2, 1]]]
    assert codebook_voting_logits(torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])).tolist() == [[0.5, 1.5]]


def test_only_the_selected_values_get_gradients():
    kvb = KeyValueBottleneck(8, num_codebooks=4, key_value_pairs_per_codebook=10, dim_values=3, topk=2)
    assert [name for name, _ in kvb.named_parameters()] == ["values"]
    assert not kvb.keys.requires_grad
    z = torch.randn(5, 8)
    nn.functional.cross_entropy(kvb(z), torch.tensor([0, 1, 2, 0, 1])).backward()
    selected = torch.zeros(4, 10, dtype=torch.bool)
    idx = kvb.lookup(z)
    for c in range(4):
        selected[c, idx[:, c].flatten()] = True
    touched = kvb.values.grad.abs().sum(-1) > 0
    assert torch.equal(touched, selected)


def test_ema_kmeans_step_matches_the_formula():
    kvb = KeyValueBottleneck(2, num_codebooks=1, key_value_pairs_per_codebook=2, dim_values=2, decay=0.8)
    kvb.keys.copy_(torch.tensor([[[0.0, 0.0], [10.0, 10.0]]]))
    x1 = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    x2 = torch.tensor([[0.0, 3.0]])
    kvb.update_keys(x1)
    torch.testing.assert_close(kvb.keys[0, 0], x1.mean(0))  # counts start at 0: the first step is the mean
    kvb.update_keys(x2)
    m = 0.8 * 0.2 * x1.sum(0) + 0.2 * x2.sum(0)
    n = 0.8 * 0.2 * 2 + 0.2 * 1
    torch.testing.assert_close(kvb.keys[0, 0], m / n)
    torch.testing.assert_close(kvb.cluster_size[0], torch.tensor([n, 0.0]))
    assert kvb.keys[0, 1].tolist() == [10.0, 10.0]  # never won, threshold 0: left alone


def test_key_init_moves_keys_to_the_cluster_centres():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.2, 0.2], [0.8, 0.2], [0.2, 0.8], [0.8, 0.8]])
    kvb = KeyValueBottleneck(2, num_codebooks=1, key_value_pairs_per_codebook=4, dim_values=4, decay=0.9)
    kvb.keys.copy_((centres + torch.tensor([0.12, -0.1])).unsqueeze(0))
    start = torch.cdist(kvb.keys[0], centres).diagonal()
    for _ in range(40):
        y = torch.randint(4, (64,), generator=g)
        kvb.update_keys(centres[y] + 0.02 * torch.randn(64, 2, generator=g))
    end = torch.cdist(kvb.keys[0], centres).diagonal()
    assert start.min() > 0.15 and end.max() < 0.01


def test_dead_codes_are_replaced_by_batch_samples():
    kvb = KeyValueBottleneck(2, num_codebooks=2, key_value_pairs_per_codebook=3, dim_values=2,
                             threshold_ema_dead_code=0.5, splitting="random_projection", dim_keys=2)
    heads_far = torch.full((2, 3, 2), 100.0)
    heads_far[:, 0] = 0.0  # key 0 of each codebook wins everything; keys 1 and 2 are dead
    kvb.keys.copy_(heads_far)
    z = torch.rand(16, 2)
    kvb.update_keys(z, generator=torch.Generator().manual_seed(3))
    heads = kvb.split(z)
    for c in range(2):
        for n in (1, 2):
            assert (heads[:, c] == kvb.keys[c, n]).all(-1).any(), f"key {n} of codebook {c} is not a batch sample"
    assert kvb.cluster_size[:, 1:].eq(0.5).all()
    torch.testing.assert_close(kvb.keys[:, 0], heads.mean(0))


def test_frozen_keys_and_state_round_trip():
    kvb = KeyValueBottleneck(6, num_codebooks=3, key_value_pairs_per_codebook=5, dim_values=4, dim_keys=2,
                             splitting="random_projection", threshold_ema_dead_code=0.1, seed=1)
    z = torch.randn(32, 6)
    kvb.update_keys(z)
    kvb.freeze_keys()
    with pytest.raises(RuntimeError, match="frozen"):
        kvb.update_keys(z)
    with torch.no_grad():
        kvb.values.normal_()
    state = kvb.state_dict()
    assert set(state) == {"values", "projection", "keys", "cluster_size", "embed_sum", "keys_frozen"}
    fresh = KeyValueBottleneck(6, num_codebooks=3, key_value_pairs_per_codebook=5, dim_values=4, dim_keys=2,
                               splitting="random_projection", threshold_ema_dead_code=0.1, seed=2)
    assert not torch.equal(fresh(z), kvb(z))
    fresh.load_state_dict({k: v.clone() for k, v in state.items()})
    assert torch.equal(fresh(z), kvb(z)) and bool(fresh.keys_frozen)
    assert set(KeyValueBottleneck(6, 3, 5, 4).state_dict()) == state.keys() - {"projection"}


def _one_sgd_step(kvb, x, y, lr=1.0):
    opt = torch.optim.SGD(kvb.parameters(), lr=lr)
    opt.zero_grad()
    nn.functional.cross_entropy(kvb(x), y).backward()
    opt.step()


def test_a_local_update_leaves_inputs_routed_elsewhere_unchanged():
    g = torch.Generator().manual_seed(0)
    kvb = KeyValueBottleneck(2, num_codebooks=8, key_value_pairs_per_codebook=32, dim_values=2, dim_keys=2,
                             splitting="random_projection", threshold_ema_dead_code=1e-3)
    for _ in range(10):
        kvb.update_keys(torch.rand(256, 2, generator=g), generator=g)
    kvb.freeze_keys()
    with torch.no_grad():
        kvb.values.normal_(generator=g)
    class0 = torch.tensor([0.2, 0.2]) + 0.03 * torch.randn(20, 2, generator=g)
    probes = torch.rand(200, 2, generator=g)
    touched = kvb.lookup(class0)  # [20, C, 1]
    hits = torch.stack([(kvb.lookup(probes)[:, c] == touched[:, c].flatten()).any(-1) for c in range(8)], 1)
    elsewhere = ~hits.any(1)  # probes that share no selected key with the trained inputs
    assert 20 < int(elsewhere.sum()) < 200
    before_probes, before_class0 = kvb(probes), kvb(class0)
    _one_sgd_step(kvb, class0, torch.zeros(20, dtype=torch.long))
    after_probes = kvb(probes)
    assert torch.equal(after_probes[elsewhere], before_probes[elsewhere])
    assert not torch.equal(after_probes[~elsewhere], before_probes[~elsewhere])
    assert (kvb(class0)[:, 0] - kvb(class0)[:, 1]).mean() > (before_class0[:, 0] - before_class0[:, 1]).mean()


def test_two_d_toy_class_incremental_without_replay():
    """Paper §4.1, shortened (50 samples and 30 epochs per task instead of 100 and 1000)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    angle = torch.arange(8) * 2 * math.pi / 8
    centres = 0.5 + 0.35 * torch.stack([angle.cos(), angle.sin()], 1)  # 8 classes in the unit square

    def sample(classes, n):
        y = torch.tensor(classes).repeat_interleave(n)
        return centres[y] + 0.035 * torch.randn(len(y), 2, generator=g), y

    tasks = [sample([2 * t, 2 * t + 1], 50) for t in range(4)]
    x_test, y_test = sample(list(range(8)), 100)

    kvb = KeyValueBottleneck(2, num_codebooks=16, key_value_pairs_per_codebook=64, dim_values=8, dim_keys=2,
                             splitting="random_projection", threshold_ema_dead_code=1e-3)
    unlabelled = torch.rand(2000, 2, generator=g)  # keys fitted on unlabelled points of the square
    for _ in range(20):
        kvb.update_keys(unlabelled[torch.randint(2000, (256,), generator=g)], generator=g)
    kvb.freeze_keys()
    mlp = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 8))
    learners = [(kvb, torch.optim.SGD(kvb.parameters(), lr=1.0)), (mlp, torch.optim.Adam(mlp.parameters(), lr=1e-2))]
    for x, y in tasks:  # task by task, no replay, no task labels
        for _ in range(30):
            for model, opt in learners:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    with torch.no_grad():
        kvb_acc = (kvb(x_test).argmax(1) == y_test).float().mean().item()
        mlp_acc = (mlp(x_test).argmax(1) == y_test).float().mean().item()
    assert kvb_acc >= 0.9, (kvb_acc, mlp_acc)
    assert mlp_acc <= 0.5 and kvb_acc - mlp_acc >= 0.4, (kvb_acc, mlp_acc)
