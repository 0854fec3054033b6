"""PNGs of a federated run: accuracy per round, and the plan (per client: ranks per module, bits,
batch, modelled round time and memory against its budget)."""

from __future__ import annotations

from pathlib import Path


def plot_run(run_dir: Path, accuracy: list[float], pb, sol) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(1, len(accuracy) + 1), accuracy, marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (merged model)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.append(run_dir / "accuracy.png")
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)
    out.append(plot_plan(run_dir / "plan.png", pb, sol))
    return out


def plot_plan(path: Path, pb, sol) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    mods = sorted({m for p in sol.plans for m in p.ranks})
    K = len(sol.plans)
    grid = np.array([[p.ranks.get(m, 0) for m in mods] for p in sol.plans])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 0.9 + 0.45 * max(K, 3)), gridspec_kw={"width_ratios": [2, 1]})
    im = a.imshow(grid, cmap="viridis", aspect="auto")
    a.set_xticks(range(len(mods)), [m.replace("layers.", "L").replace("attention.", "").replace("feed_forward.", "")
                                    for m in mods], rotation=45, ha="right", fontsize=7)
    a.set_yticks(range(K), [f"client {k} ({p.bits}-bit, b={p.batch_size})" for k, p in enumerate(sol.plans)],
                 fontsize=7)
    for k in range(K):
        for j in range(len(mods)):
            a.text(j, k, str(grid[k, j]), ha="center", va="center", color="w", fontsize=7)
    a.set_title("adapter rank per module", fontsize=9)
    fig.colorbar(im, ax=a, fraction=0.03)
    b.barh(range(K), sol.times, color="tab:orange")
    b.set_yticks(range(K), [f"{k} (speed {pb.profiles[k].speed:g})" for k in range(K)], fontsize=7)
    b.invert_yaxis()
    b.set_xlabel("modelled round time (s)", fontsize=8)
    b.set_title("round time per client", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(path: Path, curves: dict[str, list[float]], title: str = "") -> Path:
    """Accuracy per round of several runs (e.g. the aggregation strategies side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, acc in curves.items():
        ax.plot(range(1, len(acc) + 1), acc, marker=".", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (merged model)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
