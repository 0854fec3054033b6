"""The continual pieces go through the one checkpoint format (DCP + manifest) and resume bitwise:
metric history, a query strategy mid-stream, and a bottleneck's keys, EMA statistics and values."""

import torch

from continual.active import STRATEGIES
from continual.kv_bottleneck import KeyValueBottleneck
from continual.metrics import AccuracyMatrix, PrequentialAccuracy
from trainer.checkpoint import Checkpointer
from trainer.checkpoint.state import ModelState


def _bottleneck(seed):
    return KeyValueBottleneck(4, num_codebooks=3, key_value_pairs_per_codebook=6, dim_values=3, dim_keys=2,
                              splitting="random_projection", threshold_ema_dead_code=0.2, seed=seed)


def test_a_stream_resumed_from_a_checkpoint_continues_bitwise(tmp_path):
    g = torch.Generator().manual_seed(0)
    posteriors = torch.softmax(2 * torch.randn(400, 3, generator=g), 1)
    correct = torch.rand(400, generator=g) < 0.6
    z = torch.randn(64, 4, generator=g)

    def components(seed):
        kvb = _bottleneck(seed)
        return {"history": AccuracyMatrix(2), "prequential": PrequentialAccuracy(0.999),
                "strategy": STRATEGIES.get("randomized_variable_uncertainty")(budget=0.2, seed=seed),
                "model": ModelState([kvb])}, kvb

    run, kvb = components(0)
    kvb.update_keys(z[:32], generator=torch.Generator().manual_seed(1))
    run["history"].record_row(0, [0.9, 0.1])
    for p, c in zip(posteriors[:200], correct[:200]):
        run["strategy"].query(p)
        run["prequential"].update(c)
    path = Checkpointer(tmp_path).save(200, run)

    back, kvb_back = components(5)  # other seed: other keys, projections, RNG
    Checkpointer(tmp_path).load(path, back)
    for name in ("keys", "cluster_size", "embed_sum", "projection", "values"):
        assert torch.equal(getattr(kvb_back, name), getattr(kvb, name)), name
    kvb.update_keys(z[32:], generator=torch.Generator().manual_seed(2))
    kvb_back.update_keys(z[32:], generator=torch.Generator().manual_seed(2))
    assert torch.equal(kvb_back.keys, kvb.keys)
    decisions = [[s.query(p) for p in posteriors[200:]] for s in (run["strategy"], back["strategy"])]
    assert decisions[0] == decisions[1] and any(decisions[0])
    for r in (run, back):
        r["prequential"].update(correct[200:])
    assert back["prequential"].accuracy == run["prequential"].accuracy
    assert torch.equal(back["history"].R.nan_to_num(-1), run["history"].R.nan_to_num(-1))
