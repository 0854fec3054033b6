"""Helpers the tests share: forked gloo ranks and a tiny, fast config (imported by conftest)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from trainer.launch.forked import free_port, run_ranks  # noqa: F401  (shared by the tests)


TINY = [
    "data.max_tokens=60000", "data.tokenizer_train_bytes=200000", "data.seq_len=32",
    "model.max_seq_len=64", "model.vocab_size=512", "model.dim=64", "model.n_layers=2",
    "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128", "trainer.batch_size=8",
    "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=2", "trainer.sample_tokens=8",
    "optim.warmup_steps=2", "logger.progress=false",
]


def compose(overrides: list[str], run_dir) -> dict:
    """A validated, resolved config dict as the CLI would hand it to ranks (tiny model, tiny data)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from trainer.cli import CONFIG_DIR
    from trainer.config import as_dict, validate

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        raw = hydra_compose("plait", overrides=TINY + [f"run_dir={run_dir}"] + list(overrides))
    return as_dict(validate(raw))


def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm's client tools are not installed (bash .ci/slurm.sh installs and starts one)"
    try:
        # answers at once, where sinfo retries a down controller for ~20 s
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
        if ping.returncode != 0:
            said = (ping.stdout or ping.stderr).strip().splitlines()[:1]
            return f"slurmctld does not answer ({' '.join(said)}); run bash .ci/slurm.sh"
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15)
    except (subprocess.TimeoutExpired, OSError) as err:
        return f"Slurm does not answer ({err}); run bash .ci/slurm.sh"
    usable = {"idle", "mix", "alloc", "comp"}
    if out.returncode != 0 or not usable & set(out.stdout.split()):
        detail = (out.stderr or out.stdout).strip()[:200]
        return f"no usable Slurm node ({detail or 'sinfo printed nothing'}); run bash .ci/slurm.sh"
    return None


_problem = _cluster_problem()
# CI sets PLAIT_REQUIRE_SLURM=1 so a cluster that failed to start fails the tests, not skips them
needs_cluster = pytest.mark.skipif(
    _problem is not None and os.environ.get("PLAIT_REQUIRE_SLURM") != "1", reason=str(_problem))


def logged(run_dir, key: str = "loss") -> dict[int, float]:
    """{step: value} of one metric from a run's metrics.jsonl."""
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def plait_process(*args: str, cwd, tiny: bool = True) -> subprocess.Popen:
    """`python -m trainer` (on the tiny pretraining config unless `tiny=False`), as a user starts it
    (flags first, then overrides)."""
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    return subprocess.Popen([sys.executable, "-m", "trainer", *flags, *(TINY if tiny else []), *overrides], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def plait_run(*args: str, cwd, timeout: float = 300, tiny: bool = True) -> subprocess.CompletedProcess:
    proc = plait_process(*args, cwd=cwd, tiny=tiny)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
