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
        ({"optim": {"lr": -1.0}}, ["optim.lr=-1.0", "a number > 0"]),
        ({"optim": {"beta2": 1.0}}, ["optim.beta2=1.0", "[0, 1)"]),
        ({"optim": {"min_lr_ratio": 2.0}}, ["optim.min_lr_ratio", "[0, 1]"]),
        ({"model": {"norm_eps": 0.0}}, ["model.norm_eps", "> 0"]),
        ({"parallel": {"microbatches": 0}}, ["parallel.microbatches=0", ">= 1, or -1 for pp"]),
        ({"trainer": {"peak_flops": -1.0}}, ["trainer.peak_flops", ">= 0"]),
        ({"launcher": {"timeout_min": 0}}, ["launcher.timeout_min", ">= 1"]),
        ({"checkpoint": {"keep_last": -1}}, ["checkpoint.keep_last", "0 to keep all"]),
        ({"device": "tpu"}, ["device='tpu'", "auto, cpu, cuda, cuda:N"]),
        ({"device": "cuda:x"}, ["device='cuda:x'"]),
        ({"model": {"name": "mamba_1b"}}, ["model.name='mamba_1b'", "llama"]),
        ({"env": "Hopper-v5"}, ["env (now task.env)"]),
        ({"trainer": {"total_steps": 5}}, ["trainer.total_steps", "task.total_steps"]),
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


def test_the_core_schema_holds_no_family_field():
    from trainer.config import PlaitConfig, TrainerConfig

    assert "env" not in PlaitConfig.__dataclass_fields__
    assert "total_steps" not in TrainerConfig.__dataclass_fields__


def test_range_descriptions():
    from trainer.config import Bounds

    assert Bounds(ge=0, lt=1).describe(False) == "a number in [0, 1)"
    assert Bounds(gt=0, le=1).describe(False) == "a number in (0, 1]"
    assert Bounds(ge=1).describe(True) == "an integer >= 1"
    assert Bounds(gt=0).describe(False) == "a number > 0"
    assert Bounds(ge=1, also=(-1,), note="-1 for all").describe(True) == "an integer >= 1, or -1 for all"
    assert Bounds(ge=1, also=(-1,)).allows(-1) and not Bounds(ge=1, also=(-1,)).allows(0)
