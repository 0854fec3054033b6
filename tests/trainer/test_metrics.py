"""Metric sinks and throughput arithmetic."""

import json

import torch

from trainer.config import LoggerConfig
from trainer.metrics import MetricLogger, measured_cpu_peak, peak_flops


def test_jsonl_written_on_main_rank_only(tmp_path):
    log = MetricLogger(str(tmp_path / "a"), LoggerConfig(progress=False), {"name": "x"}, 10)
    log.log(1, {"loss": torch.tensor(2.5), "lr": 1e-3})
    log.close()
    row = json.loads((tmp_path / "a" / "metrics.jsonl").read_text())
    assert row["step"] == 1 and row["loss"] == 2.5
    quiet = MetricLogger(str(tmp_path / "b"), LoggerConfig(), {}, 10, is_main=False)
    quiet.log(1, {"loss": 1.0})
    quiet.close()
    assert not (tmp_path / "b").exists()


def test_wandb_offline_run_is_written_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    log = MetricLogger(str(tmp_path), LoggerConfig(name="wandb", mode="offline", progress=False), {"name": "w"}, 5)
    log.log(1, {"loss": 1.0})
    log.close()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_peak_flops_override_and_cpu_measurement():
    assert peak_flops(torch.device("cpu"), override=123.0) == 123.0
    assert 1e8 < measured_cpu_peak(256, 2) < 1e13
