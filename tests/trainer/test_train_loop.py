"""trainer/loop.py on a model small enough for closed forms: accumulation equals the whole batch,
clipping scales the step to the bound, logging/eval/checkpoint cadence, bitwise resume."""

import json

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from trainer.checkpoint import Checkpointer
from trainer.checkpoint.state import ModelState, OptimizerState, Progress
from trainer.config import CheckpointConfig, LoggerConfig, OptimConfig, PlaitConfig, TrainerConfig
from trainer.loop import LoopParts, TrainLoop
from trainer.metrics import MetricLogger

X = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1


class Rows(Stateful):
    """(inputs, targets) of `batch` consecutive rows of X, Y; its position is its state."""

    def __init__(self, batch: int):
        self.batch, self.pos = batch, 0

    def __next__(self):
        rows = torch.arange(self.pos, self.pos + self.batch) % len(X)
        self.pos += self.batch
        return X[rows], Y[rows]

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = int(state["pos"])


def mse(out, target):
    return ((out - target) ** 2).mean()


def make_loop(tmp_path, *, steps=4, accum=1, batch=8, clip=0.0, every=0, lr=0.1, log_every=1, eval_every=0):
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    cfg = PlaitConfig(trainer=TrainerConfig(max_steps=steps, batch_size=batch, grad_accum=accum, log_every=log_every,
                                            eval_every=eval_every, eval_batches=2),
                      optim=OptimConfig(grad_clip=clip), checkpoint=CheckpointConfig(every=every, keep_last=0),
                      logger=LoggerConfig(progress=False), run_dir=str(tmp_path))
    progress, train = Progress(), Rows(batch // accum)
    components = {"model": ModelState([model]), "optimizer": OptimizerState([model], opt), "lr_scheduler": sched,
                  "data": train, "progress": progress}
    parts = LoopParts(model=model, parts=[model], optimizer=opt, scheduler=sched, train=train,
                      make_val=lambda: iter([(X[:8], Y[:8]), (X[8:16], Y[8:16])]), loss_fn=mse, sample_fn=None,
                      flops_per_token=1.0, peak_flops=1e9, dp_group=None,
                      checkpointer=Checkpointer(str(tmp_path / "checkpoints"), keep_last=0), components=components)
    log = MetricLogger(str(tmp_path), cfg.logger, {}, steps)
    return TrainLoop(cfg, parts, torch.device("cpu"), progress, log, 1), model


def test_accumulated_micro_batches_equal_the_whole_batch(tmp_path):
    whole, w_model = make_loop(tmp_path / "a", accum=1)
    split, s_model = make_loop(tmp_path / "b", accum=2)
    (loss_w, norm_w, tokens_w), (loss_s, norm_s, tokens_s) = whole.train_step(), split.train_step()
    assert tokens_w == tokens_s == 8 * 4
    torch.testing.assert_close(loss_s, loss_w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(norm_s, norm_w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s_model.weight, w_model.weight, rtol=1e-6, atol=1e-7)


def test_clipping_scales_the_step_to_the_bound(tmp_path):
    loop, model = make_loop(tmp_path, clip=0.5, lr=1.0)
    w0 = model.weight.detach().clone()
    x, y = X[:8], Y[:8]
    grad = 2 * ((x @ w0.T - y).T @ x) / 8  # d/dw mean((xw - y)²)
    _, norm, _ = loop.train_step()
    assert norm.item() == pytest.approx(grad.norm().item(), rel=1e-5)  # reported before clipping
    step = model.weight.detach() - w0
    torch.testing.assert_close(step, -grad * 0.5 / grad.norm(), rtol=1e-5, atol=1e-6)


def test_fit_logs_evaluates_and_saves_on_cadence(tmp_path):
    loop, _ = make_loop(tmp_path, steps=5, every=2, log_every=2, eval_every=4)
    history = loop.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 5]
    assert [r["step"] for r in rows if "eval/loss" in r] == [0, 4, 5]
    assert history["first_eval_loss"] > history["eval/loss"]
    assert [p.name for p in Checkpointer(str(tmp_path / "checkpoints")).list()] == [
        "step_000000002", "step_000000004", "step_000000005"]
    manifest = json.loads((tmp_path / "checkpoints" / "step_000000005" / "plait.json").read_text())
    assert manifest["counters"] == {"step": 5, "samples": 40, "tokens": 160}


def test_resume_continues_bitwise(tmp_path):
    straight, s_model = make_loop(tmp_path / "straight", steps=6)
    straight.fit()
    first, _ = make_loop(tmp_path / "cut", steps=3)
    first.fit()
    again, a_model = make_loop(tmp_path / "cut", steps=6)
    ckpt = again.p.checkpointer
    ckpt.load(ckpt.latest(), again.p.components)
    assert again.progress.step == 3 and again.p.train.pos == 24
    again.fit()
    assert torch.equal(a_model.weight, s_model.weight)
