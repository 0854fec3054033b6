"""RLHF throughput: completion tokens/s of one GRPO iteration (generate, log-probs, update) in Plait
against Hugging Face TRL's GRPOTrainer on the same tiny model, prompts and settings, in one run.

Same model (Plait's Llama exported to a `transformers` LlamaForCausalLM with the same weights),
same character tokenizer, same prompts (the arithmetic task), same batch (prompts × samples per
prompt), same completion length, the same loss (token-mean ≡ TRL loss_type="dapo",
group-normalised advantages ≡ scale_rewards="group", no KL: beta=0, one update per generation),
one torch thread each, the dense `answer_prefix` reward (so gradients are not zero). The two alternate in blocks of --steps iterations so machine noise hits
both alike; rates are completion tokens over the median iteration time. Prints one JSON line:
plait_tokens_per_s (task.backend=local, one worker), trl_tokens_per_s, ratio (Plait / TRL), and
Plait on Ray with one and with two actor workers.

Needs TRL (benchmark only): pip install -c .venv/torch-constraint.txt trl==1.16.0
    .venv/bin/python bench/rlhf_throughput.py [--steps 6] [--rounds 2] [--prompts 8] [--samples 4] [--tokens 16]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from rlhf.config import PromptData, RLHFOptions  # noqa: E402
from rlhf.data.prompts import PromptLoader, build_vocabulary, prompt_records  # noqa: E402
from rlhf.driver import RLHFDriver  # noqa: E402
from rlhf.kl_control import FixedKLController  # noqa: E402
from rlhf.rewards import answer_prefix_reward  # noqa: E402
from rlhf.workers import ActorWorker  # noqa: E402
from rlhf.workers.base import WorkerSpec  # noqa: E402
from trainer.config import ModelConfig, OptimConfig, ParallelConfig  # noqa: E402

MODEL = ModelConfig(name="llama_bench", vocab_size=32, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=176,
                    max_seq_len=64)
LR = 1e-5


def options(a, backend: str = "local", dp: int = 1) -> RLHFOptions:
    return RLHFOptions(algorithm="grpo", backend=backend, prompts=PromptData(train_size=2048),
                       prompts_per_iteration=a.prompts, samples_per_prompt=a.samples, prompts_per_minibatch=a.prompts,
                       responses_per_micro_batch=a.prompts * a.samples, max_new_tokens=a.tokens, actor_lr=LR,
                       loss_agg_mode="token-mean", actor=ParallelConfig(dp_shard=dp), threads=1)


def spec(o: RLHFOptions, vocab, world: int = 1) -> WorkerSpec:
    return WorkerSpec(role="actor", rank=0, world_size=world, model=MODEL, layout=o.actor,
                      optim=OptimConfig(lr=LR, weight_decay=0.0, warmup_steps=0, schedule="constant", grad_clip=1.0),
                      options=o, seed=0, device="cpu", eos_id=vocab.eos_id, pad_id=vocab.pad_id)


class PlaitSide:
    """The driver of task=rlhf with its actor group (local or Ray)."""

    def __init__(self, a, backend: str = "local", dp: int = 1):
        o = options(a, backend, dp)
        self.vocab = build_vocabulary(o.prompts)
        if backend == "local":
            from rlhf.groups.local import LocalWorkerGroup

            self.group = LocalWorkerGroup("actor", ActorWorker, spec(o, self.vocab)).start()
        else:
            from rlhf.groups.ray_group import RayWorkerGroup

            self.group = RayWorkerGroup("actor", ActorWorker, spec(o, self.vocab, dp), num_cpus=0.01).start()
        loader = PromptLoader(prompt_records(o.prompts, "train", 0), o.prompts_per_iteration, 0)
        self.driver = RLHFDriver(o, {"actor": self.group}, self.vocab, loader, [], answer_prefix_reward,
                                 FixedKLController(0.0), 0)
        self.iteration = 0

    def state_dict(self) -> dict:
        return {k: v.detach().clone() for k, v in self.group.worker.model.state_dict().items()}

    def step(self) -> tuple[float, int]:
        self.iteration += 1
        start = time.perf_counter()
        m = self.driver.step(self.iteration)
        return time.perf_counter() - start, int(round(m["response_length"] * m["responses"]))

    def close(self) -> None:
        self.group.close()


class TRLSide:
    """TRL's GRPOTrainer on the same weights, tokenizer and prompts; times each optimizer step."""

    def __init__(self, a, plait_weights: dict, vocab, workdir: str):
        from datasets import Dataset
        from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        from trainer.models.hf import to_hf_config, to_hf_state_dict

        model = LlamaForCausalLM(to_hf_config(MODEL))
        model.load_state_dict(to_hf_state_dict(plait_weights), strict=False)
        tok = PreTrainedTokenizerFast(tokenizer_object=vocab.tokenizer, bos_token="<bos>", eos_token="<eos>",
                                      pad_token="<pad>", unk_token="<unk>", padding_side="left")
        model.generation_config.eos_token_id = vocab.eos_id
        model.generation_config.pad_token_id = vocab.pad_id
        rows = prompt_records(PromptData(train_size=2048), "train", 0)
        data = Dataset.from_dict({"prompt": ["<bos>" + r["prompt"] for r in rows], "answer": [r["answer"] for r in rows]})

        def reward(completions, answer, **_):
            return [answer_prefix_reward("", c, a_) for c, a_ in zip(completions, answer)]

        self.times: list[float] = []
        self.tokens: list[int] = []
        side = self

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                side._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                side.times.append(time.perf_counter() - side._t)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "completions/mean_length" in logs:
                    side.tokens.append(int(round(logs["completions/mean_length"] * a.prompts * a.samples)))

        responses = a.prompts * a.samples
        self.args = dict(output_dir=workdir, use_cpu=True, bf16=False, learning_rate=LR, beta=0.0, loss_type="dapo",
                         scale_rewards="group", num_generations=a.samples, max_completion_length=a.tokens,
                         per_device_train_batch_size=responses, generation_batch_size=responses,
                         gradient_accumulation_steps=1, num_iterations=1, logging_steps=1, save_strategy="no",
                         report_to=[], disable_tqdm=True, dataloader_num_workers=0, weight_decay=0.0,
                         lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, seed=0)
        self.make = lambda steps: GRPOTrainer(model=model, reward_funcs=reward, train_dataset=data,
                                              processing_class=tok, callbacks=[Clock()],
                                              args=GRPOConfig(max_steps=steps, **self.args))

    def run(self, steps: int) -> list[tuple[float, int]]:
        start = len(self.times)
        with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints every log dict
            self.make(steps).train()
        times = self.times[start:]
        tokens = self.tokens[start:start + len(times)] or [0] * len(times)
        return list(zip(times, tokens))


def rate(samples: list[tuple[float, int]]) -> float:
    """Completion tokens per second at the median iteration time."""
    return statistics.median(n for _, n in samples) / statistics.median(t for t, _ in samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="iterations per block")
    p.add_argument("--rounds", type=int, default=2, help="alternating blocks of each side")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--tokens", type=int, default=16, help="max completion tokens")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray rows")
    a = p.parse_args()
    torch.set_num_threads(1)
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("bench/rlhf_throughput.py needs TRL: .venv/bin/pip install -c .venv/torch-constraint.txt trl==1.16.0")

    plait = PlaitSide(a)
    params = sum(v.numel() for v in plait.state_dict().values())
    with tempfile.TemporaryDirectory() as workdir:
        trl_side = TRLSide(a, plait.state_dict(), plait.vocab, workdir)
        plait.step(), trl_side.run(1)  # warm-up: first-call costs out of the timings
        ours, theirs = [], []
        for _ in range(a.rounds):
            ours += [plait.step() for _ in range(a.steps)]
            theirs += trl_side.run(a.steps)
    plait.close()
    out = {"plait_tokens_per_s": round(rate(ours), 1), "trl_tokens_per_s": round(rate(theirs), 1)}
    out["ratio"] = round(out["plait_tokens_per_s"] / out["trl_tokens_per_s"], 3)
    if not a.no_ray:
        from rlhf.groups.ray_group import ensure_ray

        ensure_ray(num_cpus=os.cpu_count())
        for dp in (1, 2):
            side = PlaitSide(a, "ray", dp)
            side.step()
            out[f"plait_ray_{dp}_workers_tokens_per_s"] = round(rate([side.step() for _ in range(a.steps)]), 1)
            side.close()
        import ray

        ray.shutdown()
    out.update(setup={"params": params, "reward": "answer_prefix (dense: every group has variance)",
                      "prompts": a.prompts, "samples_per_prompt": a.samples, "max_completion_tokens": a.tokens,
                      "loss": "token-mean (TRL dapo)", "beta": 0.0, "threads": 1, "device": "cpu"})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
