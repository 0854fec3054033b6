"""`plait`: the Hydra app. Validates the whole config (core schema, the task family's typed options,
its cross-field checks: trainer/task.py), then runs the task's `_target_` in-process, spawns local
ranks, or submits to Slurm. Exit status 2 for bad input, before any rank starts or job is submitted."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import configs
from trainer.atomic import write_text_atomic
from trainer.config import MOVED, ConfigError, PlaitConfig, as_dict, register_schema, validate_run
from trainer.errors import EXIT_BAD_INPUT
from trainer.launch.accelerate import accelerate_overrides
from trainer.launch.distributed import detect_launcher, launcher_world_size
from trainer.launch.rank import run_rank
from trainer.launch.spawn import spawn_local

register_schema()
CONFIG_DIR = str(Path(configs.__file__).parent)
_composed = False  # set once Hydra has composed a config: errors before that are config errors


def fail(message: str) -> None:
    print(f"plait: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


def save_resolved(cfg: PlaitConfig) -> None:
    """The resolved config next to the run's outputs (Hydra's .hydra/ keeps the unresolved one)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    write_text_atomic(Path(cfg.run_dir) / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(as_dict(cfg))))


def preflight(cfg: PlaitConfig) -> None:
    """Checks on the run directory that must not wait for ranks to start."""
    from trainer.checkpoint import Checkpointer, effective_resume

    ckpt = Checkpointer(cfg.checkpoint.dir)
    latest = ckpt.latest()
    resume = effective_resume(cfg.checkpoint.resume)
    if resume == "none" and latest is not None:
        fail(f"{cfg.checkpoint.dir} already holds checkpoints (latest: {latest.name}); pass "
             "checkpoint.resume=latest to continue that run, or a new name=... to start another")
    if resume == "latest" and latest is None:
        fail(f"checkpoint.resume=latest but {cfg.checkpoint.dir} holds no complete checkpoint; "
             "use checkpoint.resume=auto to start fresh when there is none")


def submit_to_slurm(cfg: PlaitConfig, cfg_dict: dict, world: int) -> None:
    from trainer.launch.slurm import SlurmError, SlurmJobFailed, sbatch_script, submit, wait_and_report

    folder = str(Path(cfg.run_dir) / "slurm")
    try:
        if cfg.launcher.dry_run:
            print(sbatch_script(cfg.launcher, folder, cfg.name, world))
            return
        save_resolved(cfg)
        job = submit(cfg.launcher, run_rank, (cfg_dict,), folder, cfg.name, world)
        print(f"plait: submitted Slurm job {job.job_id} ({cfg.launcher.nodes} node(s), {world} task(s)); "
              f"logs in {folder}", flush=True)
        if cfg.launcher.wait:
            wait_and_report(job)
    except ConfigError as err:
        fail(f"bad config: {err}")
    except SlurmJobFailed as err:
        print(f"plait: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except SlurmError as err:  # Slurm missing or the job refused: nothing ran
        fail(str(err))


def launch(raw: DictConfig) -> None:
    try:
        # accelerate's choices first, so that validation judges what will run
        cfg, world = validate_run(accelerate_overrides(raw), launcher_world_size())
    except ConfigError as err:
        fail(f"bad config: {err}")
    cfg_dict = as_dict(cfg)
    launcher = detect_launcher()
    preflight(cfg)  # on every rank, so a refusal never leaves the others waiting for a peer
    if cfg.launcher.name == "slurm" and launcher is None:
        submit_to_slurm(cfg, cfg_dict, world)
        return
    save_resolved(cfg)
    if launcher is None and world > 1:
        spawn_local(world, cfg_dict)
    else:
        run_rank(cfg_dict)


@hydra.main(config_path=CONFIG_DIR, config_name="plait", version_base="1.3")
def hydra_entry(raw: DictConfig) -> None:
    global _composed
    _composed = True
    launch(raw)


def moved_keys(argv: list[str]) -> None:
    """Overrides of keys that moved into a task's options fail with the new key's name (Hydra
    would only say the old key is unknown)."""
    for arg in argv:
        key = arg.lstrip("+~").split("=", 1)[0]
        if "=" in arg and key in MOVED:
            fail(f"{key}= is now {MOVED[key]}= (a task option); e.g. plait task=stream_ac "
                 f"{MOVED[key]}={arg.split('=', 1)[1]}")


def main() -> None:
    moved_keys(sys.argv[1:])
    try:
        hydra_entry()
    except SystemExit as exit_:
        # Hydra reports composition errors (unknown key, missing group option, bad override) with
        # status 1 before our function runs: those are bad input too.
        if exit_.code == 1 and not _composed:
            raise SystemExit(EXIT_BAD_INPUT) from None
        raise


if __name__ == "__main__":
    main()
