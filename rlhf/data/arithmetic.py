"""A generated task with an exact rule-based reward: multi-digit arithmetic ("37+485=" -> "522").

Problems come from a seeded generator, so the training prompts, the held-out prompts and the SFT
pairs are reproducible on every machine without a download. Held-out problems are disjoint from
the training ones (a problem's split is a hash of its text).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Iterator

ALPHABET = "0123456789+-*= "
OPERATORS = ("+", "-", "*")


@dataclass(frozen=True)
class Problem:
    prompt: str  # "37+485="
    answer: str  # "522"


def is_heldout(prompt: str, heldout_fraction: float) -> bool:
    """Whether a problem belongs to the held-out split (stable across runs and machines)."""
    return (zlib.crc32(prompt.encode()) % 10_000) < heldout_fraction * 10_000


def problems(seed: int, digits: int = 2, operators: str = "+", split: str = "train",
             heldout_fraction: float = 0.1, reverse_answer: bool = False) -> Iterator[Problem]:
    """An endless stream of problems with operands of 1..`digits` digits, of one split.
    `reverse_answer`: the answer's digits least significant first, the order in which a small
    transformer can compute carries (Lee et al. 2023, "Teaching Arithmetic to Small Transformers")."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}; allowed: train, heldout")
    rng = random.Random(seed)
    ops = [op for op in operators if op in OPERATORS]
    if not ops or len(ops) != len(operators):
        raise ValueError(f"operators={operators!r}; allowed: a string of {''.join(OPERATORS)}")
    top = 10 ** digits
    while True:
        a, b, op = rng.randrange(top), rng.randrange(top), rng.choice(ops)
        if op == "-" and b > a:
            a, b = b, a  # answers stay non-negative
        prompt = f"{a}{op}{b}="
        if is_heldout(prompt, heldout_fraction) != (split == "heldout"):
            continue
        answer = str(eval(f"{a}{op}{b}"))  # noqa: S307 - two integers and an operator
        yield Problem(prompt, answer[::-1] if reverse_answer else answer)


def take(stream: Iterator[Problem], n: int) -> list[Problem]:
    return [next(stream) for _ in range(n)]


def exact_match(response: str, answer: str) -> float:
    """1 when the response (up to its end token, spaces stripped) is exactly the answer, else 0."""
    return float(response.strip() == answer)
