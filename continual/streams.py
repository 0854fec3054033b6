"""Streams of experiences built from offline data, by name (`task.stream`): class-incremental
Split-Digits and the DKVB paper's 2-D Gaussian toy, domain-incremental Permuted-Digits, river's
bundled streams and drift generators (sample by sample, for active learning) and regime-shifting
multivariate Hawkes event streams (`continual.hawkes`, period by period, for the TPP learners).

Every stream is a pure function of its seed. Data sits in Hugging Face `datasets.Dataset`s
(columns `x`, `y`; torch format), the same objects a user's own data would arrive in.

Three kinds, which the runners dispatch on:
- `ExperienceStream` (kind "experiences"): T experiences, each a train and a test split over some
  classes, plus an `unlabelled` pool (inputs only) a learner may fit itself to before the stream
  starts (the bottleneck's keys);
- `SampleStream` (kind "samples"): one ordered stream of (x, y), seen once, test-then-train;
- `EventStream` (kind "events", `continual.hawkes`): periods of event sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from trainer.registry import Registry

STREAMS: Registry[Callable[[int], object]] = Registry("stream", key="task.stream")
KINDS = {}  # stream name → "experiences" | "samples" | "events"


def register_stream(name: str, kind: str):
    """Decorator: a stream builder `build(seed) -> stream` registered under `name`."""
    def add(build):
        STREAMS.add(name, build)
        KINDS[name] = kind
        return build
    return add


def as_dataset(x: torch.Tensor, y: torch.Tensor):
    """A `datasets.Dataset` with columns x (float32 vectors) and y (int64), torch format."""
    import datasets

    ds = datasets.Dataset.from_dict({"x": x.float().numpy(), "y": y.long().numpy()})
    return ds.with_format("torch")


def tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [n, d] float32, y [n] int64) of a dataset built by `as_dataset`."""
    cols = ds[:]
    return cols["x"].float(), cols["y"].long()


@dataclass
class Experience:
    index: int
    classes: tuple[int, ...]
    train: object  # datasets.Dataset
    test: object


@dataclass
class ExperienceStream:
    name: str
    scenario: str  # class_incremental | task_incremental | domain_incremental
    num_classes: int
    dim: int
    experiences: list[Experience]
    unlabelled: torch.Tensor  # [n, dim] inputs without labels (never their classes)
    kind: str = field(default="experiences", init=False)

    def __len__(self) -> int:
        return len(self.experiences)


@dataclass
class SampleStream:
    name: str
    num_classes: int
    dim: int
    data: object  # datasets.Dataset, in stream order
    kind: str = field(default="samples", init=False)

    def __len__(self) -> int:
        return len(self.data)


def stratified_split(y: torch.Tensor, test_fraction: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test indices, the same fraction of every class in the test split."""
    train, test = [], []
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_test = round(test_fraction * idx.numel())
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def class_incremental(name: str, x: torch.Tensor, y: torch.Tensor, class_order: list[list[int]],
                      test_fraction: float, unlabelled: torch.Tensor, g: torch.Generator) -> ExperienceStream:
    """Experience t holds the classes class_order[t] (train and test); the label space is all classes."""
    tr, te = stratified_split(y, test_fraction, g)
    exps = []
    for t, classes in enumerate(class_order):
        keep = torch.isin(y, torch.tensor(classes))
        a, b = tr[keep[tr]], te[keep[te]]
        a = a[torch.randperm(a.numel(), generator=g)]
        exps.append(Experience(t, tuple(classes), as_dataset(x[a], y[a]), as_dataset(x[b], y[b])))
    return ExperienceStream(name, "class_incremental", int(y.max()) + 1, x.shape[1], exps, unlabelled)


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8×8 digits (1,797 × 64, pixels 0..16) scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.int64)


@register_stream("split_digits", "experiences")
def split_digits(seed: int) -> ExperienceStream:
    """Split-Digits: 5 class-incremental experiences of 2 digits ({0,1}, {2,3}, ...), 25 % test.
    The unlabelled pool is the training inputs of every experience with their labels dropped (how
    the bottleneck's keys are fitted; no learner sees a label before its experience)."""
    g = torch.Generator().manual_seed(seed)
    x, y = load_digits()
    tr, _ = stratified_split(y, 0.25, torch.Generator().manual_seed(seed))
    return class_incremental("split_digits", x, y, [[2 * t, 2 * t + 1] for t in range(5)], 0.25, x[tr], g)


@register_stream("split_digits_task", "experiences")
def split_digits_task(seed: int) -> ExperienceStream:
    """Split-Digits as task-incremental: the same experiences, and at test time the experience's
    identity is given, so a prediction is the arg-max over that experience's two classes only
    (training is unchanged: one head over all classes)."""
    s = split_digits(seed)
    s.name, s.scenario = "split_digits_task", "task_incremental"
    return s


@register_stream("permuted_digits", "experiences")
def permuted_digits(seed: int) -> ExperienceStream:
    """Permuted-Digits: 5 domain-incremental experiences, all 10 digits, experience t's pixels
    permuted by a fixed random permutation (the identity for t = 0), 25 % test."""
    g = torch.Generator().manual_seed(seed)
    x, y = load_digits()
    tr, te = stratified_split(y, 0.25, g)
    exps, pool = [], []
    for t in range(5):
        perm = torch.arange(64) if t == 0 else torch.randperm(64, generator=g)
        xp = x[:, perm]
        a = tr[torch.randperm(tr.numel(), generator=g)]
        exps.append(Experience(t, tuple(range(10)), as_dataset(xp[a], y[a]), as_dataset(xp[te], y[te])))
        pool.append(xp[tr])
    return ExperienceStream("permuted_digits", "domain_incremental", 10, 64, exps, torch.cat(pool))


GAUSSIAN_TOY_STD = 0.035


def gaussian_toy_means(g: torch.Generator, num_classes: int = 8, min_distance: float = 0.2) -> torch.Tensor:
    """Class means in [0.1, 0.9]², drawn until every pair is ≥ min_distance apart."""
    means: list[torch.Tensor] = []
    while len(means) < num_classes:
        m = 0.1 + 0.8 * torch.rand(2, generator=g)
        if all(torch.dist(m, o) >= min_distance for o in means):
            means.append(m)
    return torch.stack(means)


@register_stream("gaussian_toy", "experiences")
def gaussian_toy(seed: int, per_class: int = 100, test_per_class: int = 100) -> ExperienceStream:
    """The DKVB paper's 2-D toy: 8 Gaussian classes (std 0.035) in the unit square as 4
    class-incremental tasks of 2 classes, 100 training samples per class. The unlabelled pool is
    uniform on the unit square (it knows nothing of the classes)."""
    g = torch.Generator().manual_seed(seed)
    means = gaussian_toy_means(g)
    n = per_class + test_per_class
    x = torch.cat([means[c] + GAUSSIAN_TOY_STD * torch.randn(n, 2, generator=g) for c in range(8)])
    y = torch.arange(8).repeat_interleave(n)
    pool = torch.rand(4000, 2, generator=g)
    return class_incremental("gaussian_toy", x, y, [[2 * t, 2 * t + 1] for t in range(4)],
                             test_per_class / n, pool, g)


def river_stream(name: str, dataset, n: int) -> SampleStream:
    """The first n samples of a river dataset as tensors: features in the dataset's key order,
    labels numbered by sorted value."""
    rows = list(dataset.take(n)) if hasattr(dataset, "take") else [r for _, r in zip(range(n), dataset)]
    keys = list(rows[0][0])
    x = torch.tensor([[float(r[0][k]) for k in keys] for r in rows], dtype=torch.float32)
    labels = sorted({r[1] for r in rows}, key=str)
    index = {v: i for i, v in enumerate(labels)}
    y = torch.tensor([index[r[1]] for r in rows], dtype=torch.int64)
    return SampleStream(name, len(labels), x.shape[1], as_dataset(x, y))


@register_stream("phishing", "samples")
def phishing(seed: int) -> SampleStream:
    """river's bundled Phishing websites (1,250 × 9, 2 classes), in its own order (seed unused)."""
    from river import datasets

    return river_stream("phishing", datasets.Phishing(), 1250)


@register_stream("image_segments", "samples")
def image_segments(seed: int) -> SampleStream:
    """river's bundled ImageSegments (2,310 × 18, 7 classes), in its own order (seed unused)."""
    from river import datasets

    return river_stream("image_segments", datasets.ImageSegments(), 2310)


@register_stream("shuttle", "samples")
def shuttle(seed: int) -> SampleStream:
    """river's bundled Shuttle (49,097 × 9, 7 classes, heavily imbalanced), first 10,000 samples
    (2 of the classes occur in them; labels are numbered over those)."""
    from river import datasets

    return river_stream("shuttle", datasets.Shuttle(), 10_000)


@register_stream("sea_drift", "samples")
def sea_drift(seed: int) -> SampleStream:
    """SEA concepts (Street & Kim 2001) with a gradual drift from variant 0 to variant 2 centred at
    sample 2,500 (width 500), 5,000 samples with 10 % label noise (river's ConceptDriftStream)."""
    from river.datasets import synth

    s = synth.ConceptDriftStream(stream=synth.SEA(variant=0, noise=0.1, seed=seed),
                                 drift_stream=synth.SEA(variant=2, noise=0.1, seed=seed + 1),
                                 position=2500, width=500, seed=seed)
    return river_stream("sea_drift", s, 5000)


@register_stream("agrawal_drift", "samples")
def agrawal_drift(seed: int) -> SampleStream:
    """Agrawal's loan function 0 drifting to function 4 around sample 2,500 (width 1,000; river's
    sigmoid overflows for widths much below the distance to the stream's ends), 5,000 samples."""
    from river.datasets import synth

    s = synth.ConceptDriftStream(stream=synth.Agrawal(classification_function=0, seed=seed),
                                 drift_stream=synth.Agrawal(classification_function=4, seed=seed + 1),
                                 position=2500, width=1000, seed=seed)
    return river_stream("agrawal_drift", s, 5000)


def build_stream(name: str, seed: int):
    """The stream registered as `name` (the Hawkes streams register on import of continual.hawkes)."""
    import continual.hawkes  # noqa: F401  (registers its streams)

    return STREAMS.get(name)(seed)


def stream_kind(name: str) -> str:
    import continual.hawkes  # noqa: F401

    STREAMS.get(name)
    return KINDS[name]
