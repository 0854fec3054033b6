"""rlhf/run.py end to end: SFT → RLHF on the arithmetic task; local backend = Ray with one worker per
role; exact resume; resume on another number of workers; GRPO and PPO on Ray; bad input."""

import pytest
import torch

from rlhf_harness import metrics, ray_session, rlhf_config, run_in_process  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sft")
    result = run_in_process(rlhf_config(run_dir, "trainer.max_steps=100", "trainer.eval_every=0",
                                        "checkpoint.every=0", task="sft"))
    assert result["loss"] < 2.0  # from ~3.4: the answers' format is learned
    assert 0 <= result["eval/exact_match"] <= 1 and (run_dir / "sft_eval.json").exists()
    return str(run_dir / "checkpoints")


def test_local_backend_equals_ray_with_one_worker_per_role(sft_checkpoint, tmp_path, ray_session):
    common = ["task.algorithm=ppo", "task.use_kl_loss=true", f"task.init_from={sft_checkpoint}", "task.iterations=2"]
    run_in_process(rlhf_config(tmp_path / "local", *common, "task.backend=local"))
    run_in_process(rlhf_config(tmp_path / "ray", *common, "task.backend=ray"))
    local, ray_ = metrics(tmp_path / "local"), metrics(tmp_path / "ray")
    assert local.keys() == ray_.keys() == {0, 1, 2}
    for it in local:
        assert local[it] == ray_[it], it
    assert local[2]["actor/grad_norm"] > 0 and "critic/vf_loss" in local[2] and local[2]["kl"] > 0


def test_resume_is_bitwise_equal(sft_checkpoint, tmp_path):
    common = ["task.backend=local", "task.algorithm=grpo", f"task.init_from={sft_checkpoint}", "checkpoint.every=2"]
    run_in_process(rlhf_config(tmp_path / "straight", *common, "task.iterations=4"))
    run_in_process(rlhf_config(tmp_path / "stopped", *common, "task.iterations=2"))
    run_in_process(rlhf_config(tmp_path / "stopped", *common, "task.iterations=4", "checkpoint.resume=latest"))
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "stopped")
    for it in (3, 4):
        assert resumed[it] == straight[it], it
    assert straight[4]["actor/grad_norm"] != straight[3]["actor/grad_norm"]  # it trained


def test_grpo_on_two_workers_resumes_on_one(sft_checkpoint, tmp_path, ray_session):
    """GRPO with the actor FSDP-sharded over 2 Ray workers; resumed with 1 (DCP reshards)."""
    common = ["task.algorithm=grpo", f"task.init_from={sft_checkpoint}", "checkpoint.every=1"]
    run_in_process(rlhf_config(tmp_path, *common, "task.iterations=2", "task.actor.dp_shard=2"))
    result = run_in_process(rlhf_config(tmp_path, *common, "task.iterations=3", "checkpoint.resume=latest"))
    rows = metrics(tmp_path)
    assert result["iterations"] == 3 and set(rows) >= {1, 2, 3}
    assert all(rows[i]["logprob_mismatch_max"] < 1e-4 for i in (1, 2, 3))


def test_remax_rloo_reinforce_pp_run(sft_checkpoint, tmp_path):
    for algorithm in ("remax", "rloo", "reinforce_pp"):
        result = run_in_process(rlhf_config(tmp_path / algorithm, "task.backend=local", f"task.algorithm={algorithm}",
                                            f"task.init_from={sft_checkpoint}", "task.iterations=1"))
        assert result["iterations"] == 1
        row = metrics(tmp_path / algorithm)[1]
        assert row["actor/grad_norm"] > 0, algorithm


@pytest.mark.parametrize("overrides, key", [
    (["task.prompts_per_minibatch=3"], "task.prompts_per_minibatch"),
    (["task.actor.dp_shard=3"], "task.actor"),
    (["task.backend=local", "task.actor.dp_shard=2"], "task.backend=local"),
    (["task.algorithm=grpo", "task.samples_per_prompt=1"], "task.samples_per_prompt"),
    (["task.reward=nope"], "task.reward"),
    (["task.actor.pp=2", "task.actor.virtual_stages=2", "task.actor.schedule=interleaved_1f1b"], "task.actor.schedule"),
    (["task.critic.dp_backend=deepspeed", "task.critic.tp=2", "task.algorithm=ppo"], "task.critic.dp_backend"),
    (["task.max_new_tokens=100"], "model.max_seq_len"),
])
def test_impossible_settings_are_refused_before_any_worker(tmp_path, overrides, key):
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        rlhf_config(tmp_path, *overrides)


def test_a_checkpoint_the_actor_cannot_load_is_one_line_exit_2(sft_checkpoint, tmp_path, capsys):
    """An RM checkpoint (a value head) given as the actor's init: the worker's CheckpointError comes back
    as the CLI's one-line bad-checkpoint error, naming the role."""
    from trainer.launch.rank import run_rank

    rm_dir = tmp_path / "rm"
    run_in_process(rlhf_config(rm_dir, "trainer.max_steps=2", "trainer.eval_every=0", task="rm"))
    with pytest.raises(SystemExit) as exit_:
        run_rank(rlhf_config(tmp_path / "rl", "task.backend=local", f"task.init_from={rm_dir}/checkpoints"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "bad checkpoint" in err and "[actor rank 0]" in err


def test_pipeline_parallel_actor_and_critic_on_ray_resume_without_stages(sft_checkpoint, tmp_path, ray_session):
    """PPO with the actor and the critic on pp=2 (generation through the stages, 1F1B updates),
    resumed on the local backend without pipeline stages (DCP reshards across the layouts)."""
    common = ["task.algorithm=ppo", f"task.init_from={sft_checkpoint}", "checkpoint.every=1"]
    run_in_process(rlhf_config(tmp_path, *common, "task.iterations=1", "task.actor.pp=2", "task.critic.pp=2"))
    result = run_in_process(rlhf_config(tmp_path, *common, "task.iterations=2", "task.backend=local",
                                        "checkpoint.resume=latest"))
    rows = metrics(tmp_path)
    assert result["iterations"] == 2 and rows[1]["actor/grad_norm"] > 0 and "critic/vf_loss" in rows[1]
    assert rows[1]["logprob_mismatch_max"] < 1e-4


def test_deepspeed_zero_actor_on_ray_resumes_on_fsdp(sft_checkpoint, tmp_path, ray_session):
    """GRPO with the actor on 2 ZeRO-2 workers; resumed with 1 plain worker (the checkpoint holds
    full tensors by FQN whatever the backend)."""
    common = ["task.algorithm=grpo", f"task.init_from={sft_checkpoint}", "checkpoint.every=1"]
    run_in_process(rlhf_config(tmp_path, *common, "task.iterations=1", "task.actor.dp_shard=2",
                               "task.actor.dp_backend=deepspeed", "task.actor.zero_stage=2"))
    result = run_in_process(rlhf_config(tmp_path, *common, "task.iterations=2", "task.backend=local",
                                        "checkpoint.resume=latest"))
    rows = metrics(tmp_path)
    assert result["iterations"] == 2 and rows[1]["actor/grad_norm"] > 0 and "actor/pg_loss" in rows[2]


def test_actor_exports_to_hugging_face_and_comes_back(sft_checkpoint, tmp_path):
    """plait-ckpt export --role actor of an RLHF step, then import-hf, then task.init_from=: the
    imported policy scores exactly what the exported one did on the held-out prompts."""
    from trainer.checkpoint.cli import main

    def ckpt(argv: list[str]) -> int:
        try:
            return main(argv)
        except SystemExit as done:
            return done.code

    run_in_process(rlhf_config(tmp_path / "rl", "task.backend=local", f"task.init_from={sft_checkpoint}",
                               "task.iterations=2", "task.eval_every=1"))
    assert ckpt(["export", str(tmp_path / "rl" / "checkpoints"), "--to", "hf", str(tmp_path / "hf"), "--role", "actor"]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    assert ckpt(["import-hf", str(tmp_path / "hf"), str(tmp_path / "imported")]) == 0
    run_in_process(rlhf_config(tmp_path / "again", "task.backend=local", f"task.init_from={tmp_path / 'imported'}",
                               "task.iterations=1"))
    assert metrics(tmp_path / "again")[0]["eval/accuracy"] == metrics(tmp_path / "rl")[2]["eval/accuracy"]


def test_colocated_roles_equal_split_placement(sft_checkpoint, tmp_path, ray_session, capsys):
    """task.placement=colocate: actor, reference and critic in one set of 2 processes (one process
    group, one device each), each idle role's state moved out of the way and back
    (task.offload_idle=on: on CPU a fresh copy each way), give the same run as each role on its own
    2 processes."""
    common = ["task.algorithm=ppo", "task.use_kl_loss=true", f"task.init_from={sft_checkpoint}", "task.iterations=2",
              "task.actor.dp_shard=2", "task.reference.dp_shard=2", "task.critic.dp_shard=2"]
    run_in_process(rlhf_config(tmp_path / "colocate", *common, "task.placement=colocate", "task.offload_idle=on"))
    resident = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resident per rank")][-1]
    run_in_process(rlhf_config(tmp_path / "split", *common, "task.placement=split"))
    colocate, split = metrics(tmp_path / "colocate"), metrics(tmp_path / "split")
    assert colocate == split and colocate[2]["kl"] > 0 and "critic/vf_loss" in colocate[2]
    for role in ("actor", "reference", "critic"):
        assert f"{role} params" in resident and resident.split(f"{role} params")[1].split(";")[0].count("moved to host")


def test_colocated_roles_need_one_size(tmp_path):
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="task.placement=colocate"):
        rlhf_config(tmp_path, "task.placement=colocate", "task.algorithm=ppo", "task.actor.dp_shard=2")
    with pytest.raises(ConfigError, match="task.offload_idle=on"):
        rlhf_config(tmp_path, "task.offload_idle=on")
