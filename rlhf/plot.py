"""The learning curves of an RLHF run as a PNG (reward, held-out accuracy, KL, response length)."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (("reward", "reward"), ("eval/accuracy", "held-out accuracy"), ("kl", "KL to reference"),
          ("entropy", "entropy"), ("response_length", "response length"), ("logprob_mismatch_max",
                                                                           "max |log-prob mismatch|"))


def plot_curves(metrics_file: Path, out: Path, title: str) -> Path | None:
    """Draw every panel the metrics have; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    panels = [(k, name) for k, name in PANELS if any(k in r for r in rows)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), squeeze=False)
    for ax, (key, name) in zip(axes[0], panels):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
