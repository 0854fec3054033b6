"""Task runner of `task=active`: stream-based active learning, test-then-train, under a budget.

Each sample of the stream (standardised by the running statistics of the inputs so far): the learner predicts (scored for the prequential accuracy), the query
strategy decides from the predicted probabilities whether to buy its label, and only then, if
bought, the learner learns from it. One step = one sample. The step boundary saves the learner,
the strategy (threshold, labels spent, samples seen, its RNG), the prequential tally, the curve so
far and the stream position every `checkpoint.every` samples and on a preemption signal; a resumed
run makes bitwise the same decisions. At the end: `active.png` (accuracy and labels spent).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from continual.active import STRATEGIES
from continual.config import ActiveConfig
from continual.metrics import PrequentialAccuracy
from continual.online import ONLINE_LEARNERS, Predictions, prequential_step, running_standardise
from continual.streams import build_stream, tensors
from continual.task import strategy_kwargs
from trainer.boundary import StepBoundary
from trainer.checkpoint import Checkpointer
from trainer.checkpoint.state import Progress, RNGState, TensorDict
from trainer.config import PlaitConfig, as_dict
from trainer.launch.distributed import DistEnv
from trainer.launch.preemption import PreemptionHandler
from trainer.metrics import MetricLogger


def run(cfg: PlaitConfig, env: DistEnv) -> dict:
    c: ActiveConfig = cfg.task
    torch.set_num_threads(c.threads)
    stream = build_stream(c.stream, cfg.seed)
    if cfg.device not in ("auto", "cpu"):
        print(f"plait: note: active learning runs on the CPU (device={cfg.device} ignored): one sample at a "
              "time is bound by latency, not arithmetic", file=sys.stderr)
    x, y = tensors(stream.data)
    n = min(len(y), c.max_samples) if c.max_samples else len(y)
    z, y = running_standardise(x[:n].double().numpy()), y[:n].tolist()
    learner = ONLINE_LEARNERS.get(c.learner)(stream.dim, stream.num_classes, c.lr, c.l2, cfg.seed)
    cls = STRATEGIES.get(c.strategy)
    strategy = cls(budget=c.budget, seed=cfg.seed, **strategy_kwargs(cls, c))
    prequential = PrequentialAccuracy(c.fading)
    points = n // c.log_every
    curve = TensorDict({"accuracy": torch.full((points,), float("nan"), dtype=torch.float64),
                        "labels": torch.full((points,), float("nan"), dtype=torch.float64)})
    progress = Progress()
    components = {"learner": learner, "strategy": strategy, "prequential": prequential, "curve": curve,
                  "rng": RNGState(env.rank), "progress": progress}
    checkpointer = Checkpointer(cfg.checkpoint.dir, cfg.checkpoint.keep_last, async_save=cfg.checkpoint.async_save,
                                meta={"task": c.name, "stream": c.stream, "strategy": c.strategy,
                                      "config": as_dict(cfg), "world_size": 1})
    log = MetricLogger(cfg.run_dir, cfg.logger, as_dict(cfg), n, is_main=env.is_main)
    log.text(f"plait: active {c.strategy} (budget {c.budget}) with {c.learner} on {c.stream}, {n:,} samples, "
             f"seed {cfg.seed}")
    resume = checkpointer.resolve(cfg.checkpoint.resume)
    if resume is not None:
        checkpointer.load(resume, components)
        log.text(f"resumed from {resume} at sample {progress.step:,}")
        log.advance(progress.step)
    boundary = StepBoundary(checkpointer, components, every=cfg.checkpoint.every, last=n,
                            save_final=cfg.checkpoint.save_final, log=log.text, preemption=PreemptionHandler(),
                            counters=lambda: {"labels": strategy.spent},
                            saved_at=progress.step if resume is not None else -1)
    predictions = Predictions(learner, z)
    unshown = 0
    try:
        while progress.step < n:
            i = progress.step
            labelled = prequential_step(learner, predictions, strategy, prequential, i, y[i])
            progress.step = i + 1
            progress.samples += int(labelled)
            unshown += 1
            if progress.step % c.log_every == 0:
                k = progress.step // c.log_every - 1
                curve.tensors["accuracy"][k] = prequential.accuracy
                curve.tensors["labels"][k] = strategy.labels_fraction
                log.log(progress.step, {"prequential_acc": prequential.accuracy, "labels_spent": strategy.spent,
                                        "labels_fraction": strategy.labels_fraction, "threshold": strategy.threshold})
                log.advance(unshown)
                unshown = 0
            boundary(progress.step)
    finally:
        log.advance(unshown)
        boundary.close()
        log.close()
    result = {"samples": progress.step, "accuracy": prequential.accuracy, "labels_spent": strategy.spent,
              "labels_fraction": strategy.labels_fraction, "threshold": strategy.threshold,
              "curve": curve.tensors["accuracy"].tolist()}
    if env.is_main and points:
        from continual.plots import plot_prequential

        seen = [(k + 1) * c.log_every for k in range(points)]
        result["png"] = str(plot_prequential(seen, curve.tensors["accuracy"].tolist(), curve.tensors["labels"].tolist(),
                                             Path(cfg.run_dir) / "active.png",
                                             f"{c.strategy} (B = {c.budget}) on {c.stream}"))
    if env.is_main:
        print(f"plait: done: {c.strategy} on {c.stream}: prequential accuracy {result['accuracy']:.4f} with "
              f"{result['labels_fraction']:.3f} of the labels ({strategy.spent}/{progress.step})", flush=True)
    return result
