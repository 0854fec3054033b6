"""Independent RLHF stages overlap on split placement: the actor's log-probs, the reference's and
the critic's values of one batch as three futures on three Ray worker groups at once, against the
same three calls one after another, alternating, in one run (HybridFlow: independent nodes of the
dataflow run in parallel when their resource pools differ).

Prints one JSON line: `overlapped_s`, `sequential_s` (medians), `speedup` = sequential / overlapped
(bounded by the cores: 2 here, three groups).

    .venv/bin/python bench/rlhf_overlap.py [--rounds 7] [--responses 256] [--dim 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from rlhf.batch import Batch  # noqa: E402
from rlhf.config import RLHFOptions  # noqa: E402
from rlhf.data.prompts import build_vocabulary, prompt_batch, prompt_records  # noqa: E402
from rlhf.groups.ray_group import RayWorkerGroup, ensure_ray  # noqa: E402
from rlhf.workers import ActorWorker, CriticWorker, ReferenceWorker  # noqa: E402
from rlhf.workers.actor import TEACHER_FORCED  # noqa: E402
from rlhf.workers.base import WorkerSpec  # noqa: E402
from rlhf.workers.critic import value_config  # noqa: E402
from trainer.config import ModelConfig, OptimConfig, ParallelConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--responses", type=int, default=256)
    p.add_argument("--dim", type=int, default=128)
    a = p.parse_args()
    ensure_ray(num_cpus=os.cpu_count())
    model = ModelConfig(name="llama_overlap", vocab_size=32, dim=a.dim, n_layers=4, n_heads=4, n_kv_heads=2,
                        ffn_dim=a.dim * 11 // 4 // 8 * 8, max_seq_len=64)
    o = RLHFOptions(max_new_tokens=8, responses_per_micro_batch=a.responses)

    def group(role, cls, cfg):
        spec = WorkerSpec(role=role, rank=0, world_size=1, model=cfg, layout=ParallelConfig(), optim=OptimConfig(),
                          options=o, seed=0, device="cpu")
        return RayWorkerGroup(role, cls, spec, num_cpus=0.01).start()

    actor, reference, critic = (group("actor", ActorWorker, model), group("reference", ReferenceWorker, model),
                                group("critic", CriticWorker, value_config(model)))
    vocab = build_vocabulary(o.prompts)
    records = prompt_records(o.prompts, "train", 0)[:a.responses]
    prompts = prompt_batch(records, vocab)
    batch = actor.generate(Batch(prompts.select("prompts", "prompt_mask").tensors, meta={"iteration": 1}))
    view = batch.select(*TEACHER_FORCED)

    def overlapped() -> float:
        start = time.perf_counter()
        futures = [actor.compute_log_prob.future(view), reference.compute_ref_log_prob.future(view),
                   critic.compute_values.future(view)]
        for f in futures:
            f.result()
        return time.perf_counter() - start

    def sequential() -> float:
        start = time.perf_counter()
        actor.compute_log_prob(view)
        reference.compute_ref_log_prob(view)
        critic.compute_values(view)
        return time.perf_counter() - start

    overlapped(), sequential()  # warm-up
    ours, theirs = [], []
    for _ in range(a.rounds):
        ours.append(overlapped())
        theirs.append(sequential())
    for g in (actor, reference, critic):
        g.close()
    o_s, s_s = statistics.median(ours), statistics.median(theirs)
    print(json.dumps({"overlapped_s": round(o_s, 4), "sequential_s": round(s_s, 4), "speedup": round(s_s / o_s, 3),
                      "responses": a.responses, "groups": 3, "cpus": os.cpu_count(), "rounds": a.rounds}))


if __name__ == "__main__":
    main()
