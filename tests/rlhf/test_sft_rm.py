"""rlhf/pairs.py, rlhf/sft.py, rlhf/rm.py, rlhf/data: response-only SFT targets, the Bradley–Terry
loss by hand, prompts from a local jsonl file, a reward-model worker in the loop, and SIGTERM to
the driver (save, exit 75, resume)."""

import json
import math
import signal
import subprocess
import sys

import pytest
import torch

from rlhf.data.arithmetic import exact_match, problems, take
from rlhf.data.prompts import build_vocabulary
from rlhf.config import PromptData
from rlhf.pairs import IGNORE, encode_pair, pair_tensors
from rlhf.rm import bradley_terry_loss, wrong_answer
from rlhf_harness import metrics, rlhf_config, run_in_process


def test_sft_targets_are_the_response_only():
    vocab = build_vocabulary(PromptData())
    tokens, plen = encode_pair(vocab, "12+3=", "51", max_length=16)
    assert tokens[0] == vocab.bos_id and tokens[-1] == vocab.eos_id and plen == 6
    inputs, targets = pair_tensors([(tokens, plen)], width=12, pad_id=vocab.pad_id)
    # inputs are tokens[:-1]; a target is the next token, only where that token is the response or EOS
    assert inputs[0, :len(tokens) - 1].tolist() == tokens[:-1]
    assert targets[0].tolist() == [IGNORE] * (plen - 1) + tokens[plen:] + [IGNORE] * (12 - len(tokens))
    assert vocab.decode_response(tokens[plen:]) == "51"


def test_arithmetic_splits_are_disjoint_and_answers_exact():
    train = {p.prompt for p in take(problems(0, 2), 2000)}
    held = take(problems(0, 2, split="heldout"), 200)
    assert not train & {p.prompt for p in held}
    a, b = held[0].prompt[:-1].split("+")
    assert held[0].answer == str(int(a) + int(b))
    reversed_ = take(problems(0, 2, split="heldout", reverse_answer=True), 200)
    assert [p.answer[::-1] for p in reversed_] == [p.answer for p in held]
    assert exact_match(" 58 ", "58") == 1.0 and exact_match("5", "58") == 0.0


def test_bradley_terry_loss_by_hand():
    values = torch.tensor([[0.0, 2.0, 9.0], [0.0, 0.5, 9.0], [1.0, 9.0, 9.0], [3.0, 9.0, 9.0]])
    last = torch.tensor([1, 1, 0, 0])  # chosen rows 0, 1 (read at t=1); rejected rows 2, 3 (t=0)
    expected = -(math.log(1 / (1 + math.exp(-(2.0 - 1.0)))) + math.log(1 / (1 + math.exp(-(0.5 - 3.0))))) / 2
    assert bradley_terry_loss(values, last).item() == pytest.approx(expected, rel=1e-6)
    import random

    rng = random.Random(0)
    assert all(wrong_answer(a, rng) != a and len(wrong_answer(a, rng)) == len(a) for a in ["7", "58", "123"])


def test_prompts_from_a_local_jsonl_file(tmp_path):
    rows = [{"question": f"{i}+{i}=", "target": str(2 * i)} for i in range(40)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = rlhf_config(tmp_path / "run", "task.backend=local", f"task.prompts.source={path}",
                      "task.prompts.prompt_field=question", "task.prompts.answer_field=target", "task.iterations=1")
    result = run_in_process(cfg)
    assert result["iterations"] == 1
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="task.prompts.prompt_field='nope'"):
        rlhf_config(tmp_path / "bad", f"task.prompts.source={path}", "task.prompts.prompt_field=nope")


@pytest.mark.slow
def test_reward_model_scores_in_the_loop(tmp_path):
    rm_dir = tmp_path / "rm"
    result = run_in_process(rlhf_config(rm_dir, "trainer.max_steps=40", "trainer.eval_every=0", "checkpoint.every=0",
                                        task="rm"))
    assert result["loss"] < math.log(2)  # better than chance on chosen vs near-miss answers
    assert 0.5 < result["eval/pairwise_accuracy"] <= 1.0
    run_in_process(rlhf_config(tmp_path / "rl", "task.backend=local", "task.iterations=1",
                               f"task.reward_model_from={rm_dir}/checkpoints"))
    row = metrics(tmp_path / "rl")[1]
    assert 0 <= row["accuracy"] <= 1 and row["reward"] != 0  # scores from the reward model, not a rule


@pytest.mark.slow
def test_sigterm_saves_at_the_next_iteration_and_resume_finishes(tmp_path):
    def command(iterations: int, *more: str) -> list[str]:
        return [sys.executable, "-m", "trainer", "task=rlhf", "task.backend=local", f"run_dir={tmp_path}",
                "logger.progress=false", "model.dim=32", "model.n_layers=2", "model.ffn_dim=64",
                f"task.iterations={iterations}", "task.prompts_per_iteration=8", "task.prompts_per_minibatch=8",
                "task.eval_every=0", "checkpoint.every=0", *more]

    proc = subprocess.Popen(command(400), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("iteration    2"):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "preempted by SIGTERM" in err
    saved = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert saved and (saved[-1] / "plait.json").exists()
    step = int(saved[-1].name.split("_")[1])
    assert 2 <= step < 400
    done = subprocess.run(command(step + 2, "checkpoint.resume=latest"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout and f"done at iteration {step + 2}" in done.stdout
