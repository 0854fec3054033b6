"""Metric sinks and throughput arithmetic: MFU against a known or given peak, never a guessed one."""

import json

import pytest
import torch

from trainer.config import LoggerConfig
from trainer.metrics import MetricLogger, gpu_peak, measured_cpu_peak, peak_flops


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


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12), ("Tesla V100-SXM2-16GB", 125e12),
    ("NVIDIA GeForce RTX 4090", 165e12),
    # not in the table: no assumed A100 (nor a near name's) peak
    ("NVIDIA L40", None), ("NVIDIA GH200 480GB", None), ("NVIDIA B200", None), ("AMD Instinct MI300X", None),
])
def test_gpu_peaks_come_from_the_table_or_are_unknown(name, peak):
    assert gpu_peak(name) == peak


def test_an_unknown_gpu_has_no_peak_unless_the_user_gives_it(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Imaginary X1")
    gpu = torch.device("cuda", 0)
    assert peak_flops(gpu) is None and peak_flops(gpu) is None
    note = capsys.readouterr().err
    assert note.count("\n") == 1, note  # said once, not at every call
    assert "'NVIDIA Imaginary X1'" in note and "MFU is not reported" in note and "trainer.peak_flops=" in note
    assert peak_flops(gpu, override=500e12) == 500e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_flops(gpu) == 989e12 and capsys.readouterr().err == ""


def test_a_run_on_an_unknown_gpu_logs_no_mfu(tiny_cfg, tmp_path, monkeypatch):
    import trainer.pretrain
    from plait_testing import logged
    from trainer.launch.rank import run_rank

    monkeypatch.setattr(trainer.pretrain, "peak_flops", lambda device, override=0.0: None)
    run_rank(tiny_cfg("trainer.max_steps=2", "checkpoint.save_final=false", run_dir=tmp_path / "run"))
    assert sorted(logged(tmp_path / "run", "loss")) == [1, 2] and logged(tmp_path / "run", "mfu") == {}
