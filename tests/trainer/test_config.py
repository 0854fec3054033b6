"""Schema validation: wrong keys, types, values and combinations fail with the key named."""

import pytest

from trainer.config import ConfigError, as_dict, validate


def test_defaults_validate():
    cfg = validate({})
    assert cfg.model.name == "llama_tiny" and cfg.checkpoint.dir == "runs/pretrain-llama_tiny/checkpoints"
    assert as_dict(cfg)["task"]["_target_"] == "trainer.pretrain.run"


@pytest.mark.parametrize(
    "override, words",
    [
        ({"trainer": {"max_steps": "abc"}}, ["trainer.max_steps", "abc"]),
        ({"trainer": {"max_stepz": 3}}, ["trainer.max_stepz", "max_steps"]),
        ({"bogus": 1}, ["bogus", "allowed"]),
        ({"parallel": {"schedule": "zigzag"}}, ["parallel.schedule", "interleaved_1f1b"]),
        ({"optim": {"schedule": "step"}}, ["optim.schedule", "cosine"]),
        ({"model": {"n_heads": 3}}, ["model.dim", "n_heads"]),
        ({"model": {"n_kv_heads": 3}}, ["n_kv_heads"]),
        ({"data": {"seq_len": 1024}}, ["data.seq_len", "max_seq_len"]),
        ({"parallel": {"dp_shard": 2}, "trainer": {"batch_size": 3}}, ["trainer.batch_size", "multiple of 2"]),
        ({"parallel": {"dp_shard": 2, "microbatches": 3}, "trainer": {"batch_size": 8}}, ["microbatches"]),
        ({"parallel": {"dp_shard": 0}}, ["parallel.dp_shard"]),
        ({"trainer": {"grad_accum": 0}}, ["trainer.grad_accum", ">= 1"]),
        ({"data": {"source": "/no/such/corpus.jsonl"}}, ["data.source", "no such file"]),
        ({"data": {"tokenizer": "/no/tok.json"}}, ["data.tokenizer"]),
        ({"checkpoint": {"resume": "/no/such/step"}}, ["checkpoint.resume", "latest"]),
        ({"task": {"_target_": ""}}, ["task._target_"]),
    ],
)
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        validate(override)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_world_size_from_launcher_must_match():
    with pytest.raises(ConfigError, match="world size 4"):
        validate({"parallel": {"dp_shard": 2}}, world_size=4)
    assert validate({"parallel": {"dp_shard": -1}}, world_size=4).parallel.dp_shard == 4
    assert validate({"parallel": {"dp_shard": -1}}).parallel.dp_shard == 1
