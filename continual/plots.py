"""PNGs of a run, written into its run directory: the accuracy (or log-likelihood) matrix R as a
heat map beside the metric curves over the stream; the prequential accuracy and labels spent of an
active-learning run. matplotlib (Agg) is imported only here."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_matrix(R: torch.Tensor, curves: dict[str, list[float]], path: Path, title: str,
                value: str = "accuracy") -> Path:
    """Left: R[i, j] (row: trained through experience i; column: evaluated on j). Right: each
    curve against the experiences trained through."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2))
    T = R.shape[0]
    shown = R.numpy()
    im = a.imshow(shown, cmap="viridis", vmin=0 if value == "accuracy" else None, vmax=1 if value == "accuracy" else None)
    lo, hi = im.get_clim()
    for i in range(T):
        for j in range(T):
            if not math.isnan(shown[i, j]):
                light = (shown[i, j] - lo) / max(hi - lo, 1e-12) > 0.6  # viridis is light at the top
                a.text(j, i, f"{shown[i, j]:.2f}", ha="center", va="center", fontsize=7, color="k" if light else "w")
    a.set_xlabel("evaluated on experience j")
    a.set_ylabel("trained through experience i")
    a.set_title(f"R[i, j] ({value})")
    fig.colorbar(im, ax=a, fraction=0.046)
    for name, ys in curves.items():
        b.plot(range(len(ys)), ys, marker="o", label=name)
    b.set_xlabel("trained through experience")
    b.set_xticks(range(T))
    b.legend()
    b.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_prequential(seen: list[int], accuracy: list[float], labels: list[float], path: Path, title: str) -> Path:
    plt = _pyplot()
    fig, a = plt.subplots(figsize=(6.5, 4))
    a.plot(seen, accuracy, label="prequential accuracy")
    a.plot(seen, labels, label="labels spent (fraction)")
    a.set_xlabel("samples seen")
    a.set_ylim(0, 1)
    a.legend()
    a.grid(alpha=0.3)
    a.set_title(title)
    return _save(plt, fig, path)
