"""Stream-x: Plait's streaming learners against a straightforward per-parameter implementation of
the same algorithms, and (with --learning) the paper's learning benchmarks.

(1) Steps/s, side by side in one run, one thread, same network sizes, same environments:
    Stream Q(λ) on CartPole-v1 and Stream AC(λ) on Hopper-v5. The reference below is written the
    plain way: gymnasium wrappers for observation normalization and reward scaling, a forward for
    acting and two more for the update, torch.distributions, and an ObGD that loops over
    parameters. Plait's side is `StreamLoop.step()`, what `plait task=stream_*` runs each step.
    The two alternate every 250 steps so machine noise hits both alike; rates are per CPU-second
    of the process (and per wall-second, `wall_ratio`). Prints one JSON line; `ratio` = min over
    the two algorithms of Plait steps/s / reference steps/s (goal >= 1.5).

(2) --learning: Stream Q(λ) on CartPole-v1 (episodes capped at 10,000 steps) and Stream AC(λ) on
    Hopper-v5 over several seeds, through Plait's task runner; learning curves (mean ± standard
    error over seeds) to PNG, and the issue's figures in one JSON line:
      CartPole: mean return over steps 100k-150k per seed (goal >= 9,500 in at least 4 of 5 seeds)
      Hopper:   mean return over the last 25k steps (goal >= 800 at 450k, >= 2,000 at 2M)

    .venv/bin/python bench/stream_x.py [--steps 3000] [--rounds 5]
    .venv/bin/python bench/stream_x.py --learning [--only q|ac] [--seeds 5] [--q-steps 150000]
        [--ac-steps 450000] [--workers 2] [--out runs/bench-stream-x]
    .venv/bin/python bench/stream_x.py --learning --only barrier [--seeds 3] [--barrier-steps 30000]
        (stream-x Q(λ) against SGD Q(λ) with every trick off, at --plain-lr 0.01 0.001 0.0001)
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import time
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# The reference: stream-x written the straightforward way (per parameter, wrappers, 3 forwards).
# ---------------------------------------------------------------------------------------------


class RefNormalizeObservation(gym.Wrapper):
    """Welford mean/variance of observations, updated then applied, as a gymnasium wrapper."""

    def __init__(self, env):
        super().__init__(env)
        shape = env.observation_space.shape
        self.count, self.mean, self.p = 0, np.zeros(shape), np.zeros(shape)

    def normalize(self, obs):
        self.count += 1
        d = obs - self.mean
        self.mean = self.mean + d / self.count
        self.p = self.p + d * (obs - self.mean)
        var = self.p / (self.count - 1) if self.count >= 2 else np.ones_like(self.p)
        return (obs - self.mean) / np.sqrt(var + 1e-8)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self.normalize(obs), reward, terminated, truncated, info

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return self.normalize(obs), info


class RefScaleReward(gym.Wrapper):
    """r / std(u), u the discounted return trace, as a gymnasium wrapper."""

    def __init__(self, env, gamma):
        super().__init__(env)
        self.gamma, self.u, self.count, self.mean, self.p = gamma, 0.0, 0, 0.0, 0.0

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        done = terminated or truncated
        self.u = self.gamma * self.u * (1 - done) + reward
        self.count += 1
        d = self.u - self.mean
        self.mean += d / self.count
        self.p += d * (self.u - self.mean)
        var = self.p / (self.count - 1) if self.count >= 2 else 1.0
        return obs, reward / math.sqrt(var + 1e-8), terminated, truncated, info


def ref_sparse_init(layer, sparsity=0.9):
    fan_in = layer.weight.shape[1]
    bound = 1 / math.sqrt(fan_in)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound)
        for i in range(layer.weight.shape[0]):
            idx = torch.randperm(fan_in)[: int(sparsity * fan_in)]
            layer.weight[i, idx] = 0.0
        layer.bias.zero_()


def ref_body(n_in, hidden):
    layers = [nn.Linear(n_in, hidden), nn.LayerNorm(hidden, elementwise_affine=False), nn.LeakyReLU(),
              nn.Linear(hidden, hidden), nn.LayerNorm(hidden, elementwise_affine=False), nn.LeakyReLU()]
    return nn.Sequential(*layers)


class RefObGD(torch.optim.Optimizer):
    """ObGD with one trace per parameter, looped over parameter by parameter."""

    def __init__(self, params, lr=1.0, gamma=0.99, lamda=0.8, kappa=2.0):
        super().__init__(params, dict(lr=lr, gamma=gamma, lamda=lamda, kappa=kappa))

    def step(self, delta, reset=False):
        z_sum = 0.0
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if len(state) == 0:
                    state["eligibility_trace"] = torch.zeros_like(p.data)
                e = state["eligibility_trace"]
                e.mul_(group["gamma"] * group["lamda"]).add_(p.grad, alpha=1.0)
                z_sum += e.abs().sum().item()
        for group in self.param_groups:
            m = group["lr"] * group["kappa"] * max(abs(delta), 1.0) * z_sum
            step_size = group["lr"] / m if m > 1 else group["lr"]
            for p in group["params"]:
                e = self.state[p]["eligibility_trace"]
                p.data.add_(delta * e, alpha=-step_size)
                if reset:
                    e.zero_()


class RefStreamQ:
    def __init__(self, n_obs, n_actions, hidden=32, gamma=0.99, lamda=0.8, total_steps=150_000,
                 exploration_fraction=0.05):
        self.net = nn.Sequential(*ref_body(n_obs, hidden), nn.Linear(hidden, n_actions))
        for m in self.net:
            if isinstance(m, nn.Linear):
                ref_sparse_init(m)
        self.opt = RefObGD(self.net.parameters(), gamma=gamma, lamda=lamda, kappa=2.0)
        self.n_actions, self.gamma, self.t = n_actions, gamma, 0
        self.decay = exploration_fraction * total_steps

    def epsilon(self):
        return 0.01 + (1.0 - 0.01) * max(0.0, 1 - self.t / self.decay)

    def sample_action(self, s):
        with torch.no_grad():
            q = self.net(s)
        greedy = torch.argmax(q).item()
        a = np.random.randint(self.n_actions) if np.random.rand() < self.epsilon() else greedy
        return a, bool(q[a] != q.max())

    def update(self, s, a, r, s2, terminated, truncated, nongreedy):
        q_sa = self.net(s)[a]
        with torch.no_grad():
            target = r + self.gamma * self.net(s2).max() * (1 - terminated)
        delta = target - q_sa
        self.opt.zero_grad()
        (-q_sa).backward()
        self.opt.step(delta.item(), reset=terminated or truncated or nongreedy)
        self.t += 1


class RefActor(nn.Module):
    def __init__(self, n_obs, n_act, hidden):
        super().__init__()
        self.body = ref_body(n_obs, hidden)
        self.mu, self.pre_std = nn.Linear(hidden, n_act), nn.Linear(hidden, n_act)

    def forward(self, x):
        h = self.body(x)
        return self.mu(h), F.softplus(self.pre_std(h))


class RefStreamAC:
    def __init__(self, n_obs, n_act, hidden=128, gamma=0.99, lamda=0.8, entropy_coef=0.01):
        self.actor = RefActor(n_obs, n_act, hidden)
        self.critic = nn.Sequential(*ref_body(n_obs, hidden), nn.Linear(hidden, 1))
        for m in [*self.actor.modules(), *self.critic.modules()]:
            if isinstance(m, nn.Linear):
                ref_sparse_init(m)
        self.opt_p = RefObGD(self.actor.parameters(), gamma=gamma, lamda=lamda, kappa=3.0)
        self.opt_v = RefObGD(self.critic.parameters(), gamma=gamma, lamda=lamda, kappa=2.0)
        self.gamma, self.c = gamma, entropy_coef

    def sample_action(self, s):
        with torch.no_grad():
            mu, std = self.actor(s)
        return torch.distributions.Normal(mu, std).sample()

    def update(self, s, a, r, s2, terminated, truncated):
        done = terminated or truncated
        v_s = self.critic(s)
        with torch.no_grad():
            v_s2 = self.critic(s2)
        delta = (r + self.gamma * v_s2 * (1 - terminated) - v_s).squeeze()
        mu, std = self.actor(s)
        dist = torch.distributions.Normal(mu, std)
        log_prob, entropy = dist.log_prob(a).sum(), dist.entropy().sum()
        self.opt_v.zero_grad()
        self.opt_p.zero_grad()
        (-v_s).sum().backward()
        (-(log_prob + self.c * torch.sign(delta).item() * entropy)).backward()
        self.opt_v.step(delta.item(), reset=done)
        self.opt_p.step(delta.item(), reset=done)


class RefRunner:
    """The reference's streaming loop: wrapped env, act, step, update."""

    def __init__(self, algo, env_id, seed, total_steps):
        torch.manual_seed(seed)
        np.random.seed(seed)
        env = gym.make(env_id)
        self.env = RefScaleReward(RefNormalizeObservation(env), gamma=0.99)
        n_obs = env.observation_space.shape[0]
        if algo == "q":
            self.agent = RefStreamQ(n_obs, env.action_space.n, total_steps=total_steps)
        else:
            self.agent = RefStreamAC(n_obs, env.action_space.shape[0])
            self.low, self.high = env.action_space.low, env.action_space.high
        self.algo = algo
        self.s, _ = self.env.reset(seed=seed)

    def step(self):
        s = torch.tensor(np.array(self.s), dtype=torch.float32)
        if self.algo == "q":
            a, nongreedy = self.agent.sample_action(s)
            s2, r, term, trunc, _ = self.env.step(a)
            self.agent.update(s, a, r, torch.tensor(np.array(s2), dtype=torch.float32), term, trunc, nongreedy)
        else:
            a = self.agent.sample_action(s)
            s2, r, term, trunc, _ = self.env.step(np.clip(a.numpy(), self.low, self.high))
            self.agent.update(s, a, r, torch.tensor(np.array(s2), dtype=torch.float32), term, trunc)
        self.s = s2
        if term or trunc:
            self.s, _ = self.env.reset()


# ---------------------------------------------------------------------------------------------
# (1) steps/s side by side
# ---------------------------------------------------------------------------------------------

def plait_loop(algo, env_id, seed, total_steps):
    from streaming_rl.run import build_loop
    from trainer.config import validate

    torch.manual_seed(seed)
    # no time feature: the reference's networks see the raw observation size
    cfg = validate({"task": {"_target_": "streaming_rl.run.run", "name": f"stream_{algo}", "agent": algo,
                             "time_feature": False, "env": env_id, "total_steps": total_steps},
                    "seed": seed})
    return build_loop(cfg, cfg.task)


def timed(step, n):
    """(wall seconds, CPU seconds of this process) for n steps."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        step()
    return time.perf_counter() - wall, time.process_time() - cpu


def throughput(algo, env_id, steps, rounds, chunk=250, warmup=300):
    """Both learners advance `chunk` steps in turn until each has done steps × rounds. Rates are
    per CPU-second of this process (other processes sharing the cores do not count against
    either side) and per wall-second."""
    total = steps * rounds
    plait, ref = plait_loop(algo, env_id, 0, total), RefRunner(algo, env_id, 0, total)
    timed(plait.step, warmup)
    timed(ref.step, warmup)
    p_wall = p_cpu = r_wall = r_cpu = 0.0
    for _ in range(total // chunk):
        w, c = timed(plait.step, chunk)
        p_wall, p_cpu = p_wall + w, p_cpu + c
        w, c = timed(ref.step, chunk)
        r_wall, r_cpu = r_wall + w, r_cpu + c
    n = chunk * (total // chunk)
    return {"plait_steps_per_s": round(n / p_cpu, 1), "reference_steps_per_s": round(n / r_cpu, 1),
            "ratio": round(r_cpu / p_cpu, 3), "plait_steps_per_wall_s": round(n / p_wall, 1),
            "reference_steps_per_wall_s": round(n / r_wall, 1), "wall_ratio": round(r_wall / p_wall, 3)}


# ---------------------------------------------------------------------------------------------
# (2) learning runs through the task runner
# ---------------------------------------------------------------------------------------------

def job_dir(job) -> Path:
    """Where one seed of one configuration runs: <out>/<label>-<env>/seed<seed>."""
    label, _, env_id, seed, _, _, out = job
    return Path(out) / f"{label}-{env_id}" / f"seed{seed}"


def learning_run(job):
    """One seed of one configuration through `streaming_rl.run.run`; returns its episodes
    (end step, return) and, if the learner blew up, where."""
    label, algo, env_id, seed, steps, extra, out = job
    torch.set_num_threads(1)
    from streaming_rl.run import run
    from trainer.config import validate
    from trainer.launch.distributed import DistEnv, seed_everything

    run_dir = job_dir(job)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    cfg = validate({
        "task": {"_target_": "streaming_rl.run.run", "name": f"stream_{algo}", "agent": algo,
                 "summary_every": 50_000, "env": env_id, "total_steps": steps, **extra},
        "seed": seed,
        "checkpoint": {"every": 0, "save_final": False}, "logger": {"progress": False},
        "name": f"bench-{label}-{seed}", "run_dir": str(run_dir),
    })
    seed_everything(seed)
    start, diverged = time.perf_counter(), None
    try:
        run(cfg, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    except SystemExit as exit_:  # a diverged learner (the stream barrier) stops with exit status 1
        if exit_.code != 1:  # 2 is bad input, 75 a preemption: neither is a learner blowing up
            raise
        diverged = True
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    episodes = [(r["step"], r["episode/return"]) for r in rows if "episode/return" in r]
    if diverged:
        diverged = episodes[-1][0] if episodes else 0
    summary = {"diverged_at": diverged, "seconds": time.perf_counter() - start,
               "steps": steps, "options": extra, "code": code_version()}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "bench_result.json").write_text(json.dumps(summary))
    return {"label": label, "seed": seed, "episodes": episodes, **summary}


def code_version() -> str:
    """What produced a learning run: a hash of the learner's code (streaming_rl/ and the core
    modules its loop runs through) and the versions of the libraries that simulate and compute."""
    import hashlib
    from importlib.metadata import version

    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "streaming_rl").rglob("*.py")) + [root / "trainer" / "boundary.py",
                                                              root / "trainer" / "running_stats.py"]
    digest = hashlib.sha256()
    for f in files:
        if f.exists():
            digest.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    libs = ",".join(f"{p}={version(p)}" for p in ("torch", "gymnasium", "mujoco", "numpy"))
    return f"{digest.hexdigest()[:16]};{libs}"


def finished(job) -> bool:
    """This seed already ran to the end with these steps and options, by the same code (a rerun
    with more seeds adds only the missing ones; a code change reruns them all)."""
    steps, extra = job[4], job[5]
    result = job_dir(job) / "bench_result.json"
    if not result.exists():
        return False
    summary = json.loads(result.read_text())
    return (summary.get("steps") == steps and summary.get("options") == json.loads(json.dumps(extra))
            and summary.get("code") == code_version())


def stored_run(job):
    """A finished learning run read back from its run directory (for --replot)."""
    label, seed, run_dir = job[0], job[3], job_dir(job)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = {"diverged_at": None, "seconds": float("nan")}
    if (run_dir / "bench_result.json").exists():
        summary = json.loads((run_dir / "bench_result.json").read_text())
    episodes = [(r["step"], r["episode/return"]) for r in rows if "episode/return" in r]
    return {"label": label, "seed": seed, "episodes": episodes, **summary}


def curve(episodes, grid, window=0):
    """At each grid step, the mean return of the episodes that ended within the last `window`
    steps, or of the latest finished episode when none did (NaN before the first)."""
    steps = np.array([s for s, _ in episodes])
    rets = np.array([r for _, r in episodes])
    last = np.searchsorted(steps, grid, side="right") - 1
    out = np.where(last >= 0, rets[np.clip(last, 0, None)], np.nan)
    if window > 0:
        first = np.searchsorted(steps, np.asarray(grid) - window, side="right")
        cums = np.concatenate([[0.0], np.cumsum(rets)])
        count = last + 1 - first
        out = np.where(count > 0, (cums[last + 1] - cums[np.minimum(first, last + 1)]) / np.maximum(count, 1), out)
    return out


def window_mean(episodes, lo, hi):
    """Mean return of episodes that end within steps (lo, hi]."""
    inside = [r for s, r in episodes if lo < s <= hi]
    return float(np.mean(inside)) if inside else float("nan")


def curve_mean(episodes, lo, hi):
    """Mean over steps (lo, hi] of the learning curve (return of the latest finished episode)."""
    values = curve(episodes, np.arange(lo + 1, hi + 1, 100))
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")


def plot(groups, total, title, path, goal=None):
    """Mean ± standard error over seeds of each group's curve; a diverged seed counts until it
    diverged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(total / 200, total, 200)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, results in groups.items():
        curves = np.array([curve(r["episodes"], grid, window=total / 100) if r["episodes"]
                           else np.full(len(grid), np.nan) for r in results])
        for row, r in zip(curves, results):
            if r["diverged_at"] is not None:
                row[grid > r["diverged_at"]] = np.nan
        n = np.sum(~np.isnan(curves), axis=0)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(curves, axis=0)
            se = np.nanstd(curves, axis=0, ddof=1) / np.sqrt(n) if len(results) > 1 else 0 * mean
        se = np.nan_to_num(se)
        diverged = sum(r["diverged_at"] is not None for r in results)
        note = f", {diverged} diverged" if diverged else ""
        line, = ax.plot(grid, mean, label=f"{name}, {len(results)} seed(s){note}")
        ax.fill_between(grid, mean - se, mean + se, alpha=0.3, color=line.get_color())
    if goal is not None:
        ax.axhline(goal, color="gray", linestyle="--", linewidth=1, label=f"goal {goal:,}")
    ax.set_xlabel("environment steps")
    ax.set_ylabel(f"episodic return (episodes of the last {total / 100:,.0f} steps)")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def minutes(results):
    """Mean wall minutes per seed (None when the runs were only read back)."""
    m = statistics.mean(r["seconds"] for r in results) / 60
    return None if math.isnan(m) else round(m, 2)


# The paper's CartPole setting: episodes capped at 10,000 steps, the time feature in the observation
# (so the cap ends an episode of the time-augmented task), and ε decaying over its first 25,000
# steps (0.05 of its 500k-step runs); the goal's window, steps 100k-150k, ends this run.
Q_CARTPOLE = {"max_episode_steps": 10_000, "time_feature": True}
Q_EPSILON_STEPS = 25_000
# The paper's MuJoCo setting: time in the observation, so the 1,000-step limit ends an episode.
AC_HOPPER = {"time_feature": True}

# Every stream-x trick off: SGD on the same traces, PyTorch's init, no LayerNorm, raw inputs.
PLAIN = {"optimizer": "sgd", "init": "default", "layer_norm": False, "normalize_obs": False,
         "scale_rewards": False, "time_feature": False}


def learning(args):
    out = Path(args.out)
    jobs = []
    if args.only in ("", "q"):
        q_opts = {**Q_CARTPOLE, "exploration_fraction": min(1.0, Q_EPSILON_STEPS / args.q_steps)}
        jobs += [("stream_q", "q", "CartPole-v1", s, args.q_steps, q_opts, str(out)) for s in range(args.seeds)]
    if args.only in ("", "ac"):
        jobs += [("stream_ac", "ac", "Hopper-v5", s, args.ac_steps, AC_HOPPER, str(out)) for s in range(args.seeds)]
    if args.only == "barrier":
        for lr in args.plain_lr:
            jobs += [(f"plain_q_lr{lr:g}", "q", "CartPole-v1", s, args.barrier_steps, {**PLAIN, "lr": lr}, str(out))
                     for s in range(args.seeds)]
        jobs += [("stream_q", "q", "CartPole-v1", s, args.barrier_steps, {"time_feature": False}, str(out))
                 for s in range(args.seeds)]
    todo = [] if args.replot else [job for job in jobs if not finished(job)]
    fresh = {}
    if todo:
        with mp.get_context("spawn").Pool(min(args.workers, len(todo))) as pool:
            fresh = dict(zip(map(id, todo), pool.map(learning_run, todo, chunksize=1)))
    results = [fresh[id(job)] if id(job) in fresh else stored_run(job) for job in jobs]
    by_label: dict = {}
    for r in results:
        by_label.setdefault(r["label"], []).append(r)
    report = {"bench": "stream_x_learning"}
    if args.only == "barrier":
        png = out / "stream_barrier_cartpole.png"
        groups = {("stream-x Q(λ)" if k == "stream_q" else f"plain Q(λ): SGD α={k.split('lr')[1]}, no tricks"): v
                  for k, v in by_label.items()}
        plot(groups, args.barrier_steps, "The stream barrier: CartPole-v1 (500-step episodes)", png)
        report["barrier_cartpole"] = {
            k: {"seeds": len(v), "diverged": sum(r["diverged_at"] is not None for r in v),
                "mean_return_last_20_episodes": [round(float(np.mean([x for _, x in r["episodes"][-20:]])), 1)
                                                 if r["episodes"] else None for r in v]}
            for k, v in by_label.items()}
        report["barrier_cartpole"]["png"] = str(png)
        print(json.dumps(report), flush=True)
        return
    q = by_label.get("stream_q", [])
    if q:
        lo, hi = 100_000 * args.q_steps / 150_000, args.q_steps
        per_seed = [window_mean(r["episodes"], lo, hi) for r in q]
        png = out / "stream_q_cartpole.png"
        plot({"Plait stream-x Q(λ)": q}, args.q_steps, f"Stream Q(λ), CartPole-v1 (cap 10,000), {len(q)} seeds",
             png, goal=9_500)
        report["q_cartpole"] = {
            "steps": args.q_steps, "seeds": len(q), "window": [int(lo), int(hi)],
            "mean_return_per_seed": [round(x, 1) for x in per_seed],
            "seeds_at_or_above_9500": sum(x >= 9_500 for x in per_seed),
            "curve_mean_per_seed": [round(curve_mean(r["episodes"], lo, hi), 1) for r in q],
            "final_return_per_seed": [r["episodes"][-1][1] if r["episodes"] else None for r in q],
            "minutes_per_seed": minutes(q), "png": str(png)}
    ac = by_label.get("stream_ac", [])
    if ac:
        per_seed = [window_mean(r["episodes"], args.ac_steps - 25_000, args.ac_steps) for r in ac]
        png = out / "stream_ac_hopper.png"
        goal = 2_000 if args.ac_steps >= 2_000_000 else 800
        plot({"Plait stream-x AC(λ)": ac}, args.ac_steps, f"Stream AC(λ), Hopper-v5, {len(ac)} seeds", png,
             goal=goal)
        report["ac_hopper"] = {
            "steps": args.ac_steps, "seeds": len(ac),
            "mean_return_last_25k_per_seed": [round(x, 1) for x in per_seed],
            "curve_mean_last_25k_per_seed": [round(curve_mean(r["episodes"], args.ac_steps - 25_000, args.ac_steps), 1)
                                             for r in ac],
            "mean_over_seeds": round(float(np.nanmean(per_seed)), 1),
            "minutes_per_seed": minutes(ac), "png": str(png)}
    print(json.dumps(report), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--learning", action="store_true")
    ap.add_argument("--only", choices=["", "q", "ac", "barrier"], default="",
                    help="barrier: stream-x Q(λ) against plain SGD Q(λ) with every trick off, on CartPole")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--q-steps", type=int, default=150_000)
    ap.add_argument("--ac-steps", type=int, default=450_000)
    ap.add_argument("--replot", action="store_true", help="figures from the runs already in --out "
                    "(without it, seeds already finished there with the same steps, options and code are reused)")
    ap.add_argument("--barrier-steps", type=int, default=30_000)
    ap.add_argument("--plain-lr", type=float, nargs="+", default=[0.01, 0.001, 0.0001])
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default="runs/bench-stream-x")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.learning:
        learning(args)
        return
    q = throughput("q", "CartPole-v1", args.steps, args.rounds)
    ac = throughput("ac", "Hopper-v5", args.steps, args.rounds)
    print(json.dumps({"bench": "stream_x", "ratio": min(q["ratio"], ac["ratio"]), "stream_q_cartpole": q,
                      "stream_ac_hopper": ac, "steps_per_round": args.steps, "rounds": args.rounds,
                      "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
