"""The federated fine-tuning task, built offline, and its split over clients with flwr-datasets'
partitioners (IID, Dirichlet(α) label skew, quantity skew) on a local `datasets.Dataset`.

The task is keyword-topic classification: class c owns a set of keyword tokens; a sequence mixes
keywords of its class (each position with probability `keyword_prob`) with uniform filler tokens
and ends with a query token, after which the model answers with the class's label token. Under a
Dirichlet split each client sees its own mix of topics.

    tokens: 0 pad · 1 query · 2 … 2+C−1 the labels · the rest content (keywords and filler)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.errors import ConfigError

QUERY = 1
FIRST_LABEL = 2
KEYWORDS_PER_CLASS = 8


@dataclass(frozen=True)
class TaskSpec:
    num_classes: int
    seq_len: int
    vocab_size: int
    keyword_prob: float

    @property
    def label_tokens(self) -> list[int]:
        return list(range(FIRST_LABEL, FIRST_LABEL + self.num_classes))

    @property
    def first_content(self) -> int:
        return FIRST_LABEL + self.num_classes

    def check(self) -> None:
        content = self.vocab_size - self.first_content
        if content < self.num_classes * KEYWORDS_PER_CLASS + 1:
            raise ConfigError(f"model.vocab_size={self.vocab_size} leaves {content} content tokens; "
                              f"task.num_classes={self.num_classes} needs at least "
                              f"{self.num_classes * KEYWORDS_PER_CLASS + 1} (raise model.vocab_size)")


def keywords(spec: TaskSpec, seed: int) -> torch.Tensor:
    """[C, KEYWORDS_PER_CLASS] disjoint keyword tokens per class (a pure function of the seed)."""
    g = torch.Generator().manual_seed(seed)
    content = spec.first_content + torch.randperm(spec.vocab_size - spec.first_content, generator=g)
    return content[: spec.num_classes * KEYWORDS_PER_CLASS].view(spec.num_classes, KEYWORDS_PER_CLASS)


def generate(spec: TaskSpec, n: int, seed: int, task_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [n, seq_len], labels [n]): balanced labels, keyword sets from `task_seed`, the rest from `seed`."""
    return generate_with(spec, keywords(spec, task_seed), n, seed)


def generate_with(spec: TaskSpec, kw: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`generate` on given keyword sets kw [C, k] (class c's keywords in row c)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % spec.num_classes
    labels = labels[torch.randperm(n, generator=g)]
    body = spec.seq_len - 1
    filler = torch.randint(spec.first_content, spec.vocab_size, (n, body), generator=g)
    pick = kw[labels[:, None], torch.randint(0, kw.shape[1], (n, body), generator=g)]
    use = torch.rand(n, body, generator=g) < spec.keyword_prob
    tokens = torch.where(use, pick, filler)
    tokens = torch.cat([tokens, torch.full((n, 1), QUERY)], dim=1)
    return tokens, labels


def build_dataset(spec: TaskSpec, n: int, seed: int, task_seed: int):
    """The task as a `datasets.Dataset` with columns tokens (list of int) and label."""
    from datasets import Dataset

    tokens, labels = generate(spec, n, seed, task_seed)
    return Dataset.from_dict({"tokens": tokens.tolist(), "label": labels.tolist()})


def make_partitioner(kind: str, num_clients: int, alpha: float, sizes: list[int], seed: int):
    """An flwr-datasets partitioner: iid, dirichlet (label skew, α), linear (client k holds ∝ k+1), size."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, LinearPartitioner, SizePartitioner

    if kind == "iid":
        return IidPartitioner(num_partitions=num_clients)
    if kind == "dirichlet":
        return DirichletPartitioner(num_partitions=num_clients, partition_by="label", alpha=alpha,
                                    min_partition_size=1, self_balancing=False, seed=seed)
    if kind == "linear":
        return LinearPartitioner(num_partitions=num_clients)
    if kind == "size":
        if len(sizes) != num_clients:
            raise ConfigError(f"task.partitioner=size needs task.partition_sizes with one size per client "
                              f"({num_clients}), got {list(sizes)}")
        return SizePartitioner(partition_sizes=list(sizes))
    raise ConfigError(f"task.partitioner={kind!r} is not allowed; choose one of: iid, dirichlet, linear, size")


def partitions(spec: TaskSpec, n: int, num_clients: int, kind: str, alpha: float, sizes: list[int],
               seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each client's (tokens, labels): the same on every machine for the same seed."""
    dataset = build_dataset(spec, n, seed=seed + 1, task_seed=seed)
    partitioner = make_partitioner(kind, num_clients, alpha, sizes, seed)
    partitioner.dataset = dataset
    out = []
    for k in range(num_clients):
        part = partitioner.load_partition(k)
        if len(part) == 0:
            raise ConfigError(f"client {k} got no samples from task.partitioner={kind} (task.alpha={alpha}, "
                              f"task.train_samples={n}); raise task.train_samples or task.alpha")
        out.append((torch.tensor(part["tokens"]), torch.tensor(part["label"])))
    return out


def test_set(spec: TaskSpec, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The server's held-out set: the same keywords, other samples."""
    return generate(spec, n, seed=seed + 2, task_seed=seed)


def label_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels, minlength=num_classes).tolist()
