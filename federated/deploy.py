"""`task.mode=deploy`: the federation through a Flower SuperLink and SuperNodes, launched with
`flwr run` (flwr 1.42). Since flwr 1.26 the connection settings live in `$FLWR_HOME/config.toml`;
each run gets its own FLWR_HOME under the run directory, so nothing is read from or written to ~/.flwr.

With `task.spawn_local=true` (the default) this process starts one SuperLink
(`flower-superlink --insecure`) and `task.num_clients` SuperNodes (`flower-supernode --insecure
--node-config 'partition-id=k num-partitions=K'`) on this machine, and stops them at the end. With
`spawn_local=false` they run elsewhere and `task.superlink` names the SuperLink; in a Slurm job of
several nodes (`launcher=slurm launcher.nodes=N`) federated/cluster.py starts them across the
nodes. The ServerApp (federated/flower_app.py `server_app`) runs Plait's server loop inside the
SuperLink's `flwr-serverapp` process: it reads the config from the JSON file named by the run
config `plait-config` and writes its summary next to it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from trainer.config import PlaitConfig, as_dict

APP_TOML = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "plait-federated"
version = "1.0.0"
description = "Plait's federated LoRA ServerApp and ClientApp (federated/flower_app.py)"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "plait"

[tool.flwr.app.components]
serverapp = "federated.flower_app:server_app"
clientapp = "federated.flower_app:client_app"

[tool.flwr.app.config]
plait-config = ""
"""

FLOWER_CONFIG = """[superlink]
default = "plait"

[superlink.plait]
address = "{address}"
insecure = true
"""


def flwr_home(root: Path) -> Path:
    """This run's FLWR_HOME: its config.toml names the SuperLink (flwr ≥ 1.26 reads nothing else)."""
    return root / "flwr_home"


def write_app(root: Path, superlink: str) -> Path:
    """The Flower app directory (pyproject.toml naming Plait's apps) and FLWR_HOME's config.toml
    naming the SuperLink."""
    app, home = root / "flwr_app", flwr_home(root)
    app.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(APP_TOML)
    (home / "config.toml").write_text(FLOWER_CONFIG.format(address=superlink))
    return app


def wait_port(host: str, port: int, seconds: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening on {host}:{port}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on {host}:{port} within {seconds:.0f} s")


class Processes:
    """Flower's processes this run started, each in its own session, stopped (whole group) at the end."""

    def __init__(self, root: Path, env: dict):
        self.root, self.env = root, env
        root.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        (self.root / "pids.json").write_text(json.dumps({n: p.pid for n, p in self.procs.items()}))
        return proc

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


BIN_DIR = Path(sys.executable).parent  # flower-superlink, flower-supernode and flwr beside this interpreter


def flower_env(cfg: PlaitConfig, root: Path) -> dict:
    """The environment of Flower's processes: this run's FLWR_HOME, this interpreter's bin first."""
    return {**os.environ, "FLWR_HOME": str(flwr_home(root)), "PATH": f"{BIN_DIR}:{os.environ.get('PATH', '')}",
            "OMP_NUM_THREADS": str(cfg.task.threads)}


def start_superlink(procs: Processes, host: str, port: int, reach: str) -> None:
    """`flower-superlink --insecure` on host:port, returning once it listens (reached at `reach`)."""
    link = procs.start("superlink", [_bin("flower-superlink"), "--insecure", "--host", host, "--port", str(port),
                                     "--disable-runtime-dependency-installation"])
    wait_port(reach, port, 60, "flower-superlink", link)


def start_supernodes(procs: Processes, superlink: str, clients, num_clients: int, port_of) -> None:
    """One `flower-supernode` per client k (partition-id=k; its ClientApps served on port_of(k))."""
    for k in clients:
        procs.start(f"supernode{k}", [_bin("flower-supernode"), "--insecure", "--superlink", superlink,
                                      "--node-config", f"partition-id={k} num-partitions={num_clients}",
                                      "--port", str(port_of(k))])


def _bin(name: str) -> str:
    return str(BIN_DIR / name)


def prepare(cfg: PlaitConfig, superlink: str) -> tuple[Path, Path]:
    """(the Flower app, the federation's JSON config) under <run_dir>/flwr."""
    root = Path(cfg.run_dir) / "flwr"
    root.mkdir(parents=True, exist_ok=True)
    app = write_app(root, superlink)
    spec = root / "federation.json"
    (root / "federation.summary.json").unlink(missing_ok=True)
    spec.write_text(json.dumps({**as_dict(cfg), "run_dir": str(Path(cfg.run_dir).resolve())}))
    return app, spec


def run_app(app: Path, spec: Path, env: dict) -> dict:
    """`flwr run` of Plait's app on the SuperLink that FLWR_HOME names: the server loop's summary."""
    summary_path = spec.with_name("federation.summary.json")
    run = subprocess.Popen([_bin("flwr"), "run", str(app), "plait", "--stream",
                            "--run-config", f'plait-config="{spec.resolve()}"'],
                           env=env, cwd=str(app), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in run.stdout:  # live: the ServerApp's own lines (Flower's INFO lines left out)
        lines.append(line.rstrip("\n"))
        if line.startswith(("plait", "round", "client", "planner", "modules", "checkpoint", "objective",
                            "resumed", " ")) or "dropped" in line:
            print(line, end="", flush=True)
    status = run.wait()
    if not summary_path.exists():
        tail = "\n".join(lines[-30:])
        raise RuntimeError(f"flwr run ended (status {status}) without Plait's summary; its output:\n{tail}")
    return json.loads(summary_path.read_text())


def deploy(cfg: PlaitConfig) -> dict:
    c = cfg.task
    app, spec = prepare(cfg, c.superlink)
    host, port = c.superlink.rsplit(":", 1)
    env = flower_env(cfg, spec.parent)
    procs = Processes(spec.parent, env)
    try:
        if c.spawn_local:
            start_superlink(procs, host, int(port), host)
            start_supernodes(procs, c.superlink, range(c.num_clients), c.num_clients, lambda k: c.supernode_port + k)
        return run_app(app, spec, env)
    finally:
        procs.stop()
