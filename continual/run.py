"""Task runner of `task=continual`: a learner through a stream of experiences (classifiers) or of
event periods (the TPPs), evaluated after each on every experience's test split.

One step = one experience. After step i the row R[i, :] is measured (accuracy; for event streams
the test log-likelihood per event, with next-event time RMSE and type error rate beside it), the
running summary (ACC, BWT, forgetting both ways, FWT) goes to metrics.jsonl / W&B, and the step
boundary saves (every `checkpoint.every` experiences, at the end, and on a preemption signal) the
learner (weights, buffers, keys and EMA statistics, prompt pool, RNG), the metric history and the
stream position. A resumed run continues with experience `progress.step` and ends bitwise where an
uninterrupted one does. At the end: `continual.png` in the run directory.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from continual.config import ContinualConfig
from continual.learners import LearnerSpec, LearnerState, build_learner
from continual.metrics import AccuracyMatrix
from continual.streams import build_stream, tensors
from trainer.boundary import StepBoundary
from trainer.checkpoint import Checkpointer
from trainer.checkpoint.state import Progress, RNGState
from trainer.config import PlaitConfig, as_dict
from trainer.errors import ConfigError
from trainer.launch.distributed import DistEnv
from trainer.launch.preemption import PreemptionHandler
from trainer.metrics import MetricLogger


def build(cfg: PlaitConfig):
    """The stream and the learner of a run (ConfigErrors name `task.<key>`)."""
    c: ContinualConfig = cfg.task
    stream = build_stream(c.stream, cfg.seed)
    if stream.kind == "events":
        spec = LearnerSpec(0, stream.num_types, c, cfg.seed)
    else:
        spec = LearnerSpec(stream.dim, stream.num_classes, c, cfg.seed)
    try:
        learner = build_learner(c.learner, spec)
    except ConfigError as err:
        text = str(err)
        raise ConfigError(text if text.startswith("task.") else f"task.{text}") from None
    return stream, learner


class Evaluator:
    """Scores the learner on every experience's test split: one number per experience for R, and
    for event streams the RMSE and type error rate too."""

    def __init__(self, stream, learner):
        self.stream, self.learner = stream, learner
        if stream.kind == "events":
            self.tests = [p.test for p in stream.periods]
        else:
            task_il = stream.scenario == "task_incremental"
            self.tests = [(*tensors(e.test), e.classes if task_il else None) for e in stream.experiences]

    def __call__(self) -> list[dict]:
        if self.stream.kind == "events":
            return [self.learner.evaluate(ds, self.stream.horizon) for ds in self.tests]
        return [{"acc": self.learner.accuracy(x, y, classes)} for x, y, classes in self.tests]

    def train(self, i: int) -> dict:
        if self.stream.kind == "events":
            return self.learner.train_experience(self.stream.periods[i].train, self.stream.horizon)
        x, y = tensors(self.stream.experiences[i].train)
        return self.learner.train_experience(x, y)


def run(cfg: PlaitConfig, env: DistEnv) -> dict:
    c: ContinualConfig = cfg.task
    torch.set_num_threads(c.threads)
    stream, learner = build(cfg)
    if cfg.device not in ("auto", "cpu"):
        print(f"plait: note: continual learners run on the CPU (device={cfg.device} ignored): small models, "
              "per-experience loops", file=sys.stderr)
    T = len(stream)
    events = stream.kind == "events"
    evaluate = Evaluator(stream, learner)
    history = AccuracyMatrix(T)  # accuracy, or test log-likelihood per event
    rmse, type_error = AccuracyMatrix(T), AccuracyMatrix(T)
    progress = Progress()
    components = {"learner": LearnerState(learner), "history": history, "rng": RNGState(env.rank),
                  "progress": progress}
    if events:
        components.update(rmse=rmse, type_error=type_error)
    checkpointer = Checkpointer(cfg.checkpoint.dir, cfg.checkpoint.keep_last, async_save=cfg.checkpoint.async_save,
                                meta={"task": c.name, "stream": c.stream, "learner": c.learner,
                                      "config": as_dict(cfg), "world_size": 1})
    log = MetricLogger(cfg.run_dir, cfg.logger, as_dict(cfg), T, is_main=env.is_main)
    n_params = sum(p.numel() for p in learner.parameters())
    log.text(f"plait: continual {c.learner} on {c.stream} ({stream.kind}, {T} experiences), "
             f"{n_params:,} parameters, seed {cfg.seed}")
    resume = checkpointer.resolve(cfg.checkpoint.resume)
    if resume is not None:
        checkpointer.load(resume, components)
        log.text(f"resumed from {resume} after experience {progress.step} of {T}")
        log.advance(progress.step)
    else:
        if not events:
            learner.prepare(stream.unlabelled)
        for j, scores in enumerate(evaluate()):  # b[j]: the untrained learner, for forward transfer
            history.record_random_init(j, scores["ll" if events else "acc"])
    boundary = StepBoundary(checkpointer, components, every=cfg.checkpoint.every, last=T,
                            save_final=cfg.checkpoint.save_final, log=log.text, preemption=PreemptionHandler(),
                            counters=lambda: {"experiences": progress.step},
                            saved_at=progress.step if resume is not None else -1)
    try:
        while progress.step < T:
            i = progress.step
            stats = evaluate.train(i)
            rows = evaluate()
            history.record_row(i, [r["ll" if events else "acc"] for r in rows])
            if events:
                rmse.record_row(i, [r["rmse"] for r in rows])
                type_error.record_row(i, [r["type_error"] for r in rows])
            progress.step = i + 1
            progress.samples += stats["steps"]
            metrics = step_metrics(history, rmse, type_error, i, events, stats)
            log.log(i + 1, metrics)
            log.advance()
            log.text(f"experience {i + 1}/{T}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                             if "/" not in k and k != "steps"))
            boundary(i + 1)
            if c.stop_after and progress.step >= c.stop_after and progress.step < T:
                if boundary.saved_at != progress.step:
                    boundary.save(progress.step)
                log.text(f"stopped after experience {progress.step} (task.stop_after); resume with "
                         "checkpoint.resume=latest")
                break
    finally:
        boundary.close()
        log.close()
    done = progress.step
    result = {"experiences": done, "R": history.R.tolist(), **history.summary(after=done - 1)} if done else {}
    if events and done:
        result.update(next_period(history, rmse, type_error, done - 1))
    if env.is_main and done == T:
        from continual.plots import plot_matrix

        curves = {k: [history.summary(after=i)[k] for i in range(T)] for k in ("acc", "forgetting")}
        if events:
            curves = {"mean LL": curves["acc"], "forgetting": curves["forgetting"],
                      "next-period LL": [history.R[i, i + 1].item() for i in range(T - 1)]}
        png = plot_matrix(history.R, curves, Path(cfg.run_dir) / "continual.png",
                          f"{c.learner} on {c.stream}", "log-likelihood per event" if events else "accuracy")
        result["png"] = str(png)
        score = f"mean LL per event {result['acc']:.4f}, next-period LL {result['next_ll']:.4f}" if events else \
            f"acc {result['acc']:.4f}"
        print(f"plait: done: {c.learner} on {c.stream}: {score}, forgetting {result['forgetting']:.4f}; {png}",
              flush=True)
    return result


def next_period(history: AccuracyMatrix, rmse: AccuracyMatrix, type_error: AccuracyMatrix, k: int) -> dict:
    """PromptTPP's protocol: trained through period i, tested on period i + 1, averaged over i < k."""
    if k == 0:
        return {}
    i = torch.arange(k)
    return {"next_ll": float(history.R[i, i + 1].mean()), "next_rmse": float(rmse.R[i, i + 1].mean()),
            "next_type_error": float(type_error.R[i, i + 1].mean())}


def step_metrics(history, rmse, type_error, i, events, stats) -> dict:
    out = {k: v for k, v in history.summary(after=i).items()}
    if events:
        out = {("ll" if k == "acc" else k): v for k, v in out.items()}
        out.update(next_period(history, rmse, type_error, i) if i else {})
        out["rmse"] = float(rmse.R[i, : i + 1].mean())
        out["type_error"] = float(type_error.R[i, : i + 1].mean())
    out["loss"] = stats["loss"]
    out["steps"] = stats["steps"]
    out.update({f"R/{j}": v for j, v in enumerate(history.R[i].tolist()) if not math.isnan(v)})
    return out
