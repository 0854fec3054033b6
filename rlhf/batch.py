"""The batch the RLHF driver passes between roles (verl's DataProto): named tensor fields and
non-tensor fields (numpy object arrays: prompt text, ids) that share one leading dimension, plus
a `meta` dict for values that describe the whole batch (temperature, the iteration).

    batch = Batch({"input_ids": ids, "response_mask": mask}, {"prompt": texts}, meta={"n": 4})
    batch["input_ids"]              # a field
    batch[2:6], batch[index]        # rows (a slice, an int, an index or bool tensor/array)
    padded, pad = batch.pad_to_divisor(4); ...; out.unpad(pad)
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

Field = Union[torch.Tensor, np.ndarray]


def _as_object_array(name: str, value: Any) -> np.ndarray:
    """A non-tensor field as a numpy array whose first axis is the batch (lists become 1-D
    object arrays even when their items are lists themselves)."""
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            raise ValueError(f"non-tensor field {name!r} must have a batch dimension, got a 0-d array")
        return value
    if isinstance(value, torch.Tensor):
        raise TypeError(f"field {name!r} is a tensor: pass it among the tensor fields")
    items = list(value)
    array = np.empty(len(items), dtype=object)
    array[:] = items if items else []
    return array


def _equal(a: Field, b: Field) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and bool(np.all(a == b))
    return False


def _meta_equal(a: Any, b: Any) -> bool:
    if isinstance(a, (torch.Tensor, np.ndarray)) or isinstance(b, (torch.Tensor, np.ndarray)):
        return type(a) is type(b) and _equal(a, b)
    return bool(a == b)


class Batch:
    """Rows of named fields: `tensors` (torch), `non_tensors` (numpy), and a `meta` dict."""

    def __init__(self, tensors: Optional[Mapping[str, torch.Tensor]] = None,
                 non_tensors: Optional[Mapping[str, Any]] = None, meta: Optional[Mapping[str, Any]] = None):
        self.tensors: dict[str, torch.Tensor] = dict(tensors or {})
        self.non_tensors: dict[str, np.ndarray] = {k: _as_object_array(k, v) for k, v in (non_tensors or {}).items()}
        self.meta: dict[str, Any] = dict(meta or {})
        both = self.tensors.keys() & self.non_tensors.keys()
        if both:
            raise ValueError(f"fields {sorted(both)} are given both as tensors and as non-tensors")
        for k, v in self.tensors.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"tensor field {k!r} is a {type(v).__name__}, not a torch.Tensor")
            if v.dim() == 0:
                raise ValueError(f"tensor field {k!r} must have a batch dimension, got a 0-d tensor")
        sizes = {k: len(v) for k, v in self._fields().items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"fields have different batch sizes (leading dims): {sizes}")
        self._len = next(iter(sizes.values()), 0)

    # --- reading -------------------------------------------------------------------------------

    def _fields(self) -> dict[str, Field]:
        return {**self.tensors, **self.non_tensors}

    def keys(self) -> list[str]:
        return list(self.tensors) + list(self.non_tensors)

    def __contains__(self, key: object) -> bool:
        return key in self.tensors or key in self.non_tensors

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, item):
        """A field by name, or the rows picked by a slice, an int (a batch of that one row), or an
        index / bool mask (tensor, numpy array or list)."""
        if isinstance(item, str):
            if item in self.tensors:
                return self.tensors[item]
            if item in self.non_tensors:
                return self.non_tensors[item]
            raise KeyError(f"batch has no field {item!r}; fields: {', '.join(self.keys()) or '(none)'}")
        return self._rows(item)

    def _rows(self, item) -> "Batch":
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            i = int(item)
            if not -self._len <= i < self._len:
                raise IndexError(f"row {i} is out of range for a batch of {self._len}")
            item = slice(i, i + 1) if i != -1 else slice(i, None)
        if isinstance(item, slice):
            t_index, n_index = item, item
        else:
            index = torch.as_tensor(np.asarray(item) if isinstance(item, (list, tuple)) else item)
            if index.dtype == torch.bool:
                if index.shape != (self._len,):
                    raise IndexError(f"a bool mask must have shape ({self._len},), got {tuple(index.shape)}")
            elif index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
                raise IndexError(f"rows are picked by a slice, an int, or an integer/bool index; got {index.dtype}")
            else:
                index = index.long()
            t_index, n_index = index, index.cpu().numpy()
        return Batch({k: v[t_index.to(v.device) if isinstance(t_index, torch.Tensor) else t_index]
                      for k, v in self.tensors.items()},
                     {k: v[n_index] for k, v in self.non_tensors.items()}, self.meta)

    def __repr__(self) -> str:
        t = ", ".join(f"{k}: {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" for k, v in self.tensors.items())
        n = ", ".join(f"{k}: {v.shape}" for k, v in self.non_tensors.items())
        return f"Batch(len={self._len}, tensors={{{t}}}, non_tensors={{{n}}}, meta={sorted(self.meta)})"

    # --- fields --------------------------------------------------------------------------------

    def select(self, *keys: str) -> "Batch":
        """The same rows with only the named fields (meta kept)."""
        missing = [k for k in keys if k not in self]
        if missing:
            raise KeyError(f"batch has no field(s) {missing}; fields: {', '.join(self.keys()) or '(none)'}")
        return Batch({k: v for k, v in self.tensors.items() if k in keys},
                     {k: v for k, v in self.non_tensors.items() if k in keys}, self.meta)

    def union(self, other: "Batch") -> "Batch":
        """Fields and meta of both, row for row. A key in both must hold equal values: a
        conflict is refused, not silently overwritten."""
        if len(self) != len(other) and self.keys() and other.keys():
            raise ValueError(f"cannot union batches of {len(self)} and {len(other)} rows")
        for k in set(self.keys()) & set(other.keys()):
            if not _equal(self[k], other[k]):
                raise ValueError(f"cannot union: field {k!r} differs between the two batches")
        for k in self.meta.keys() & other.meta.keys():
            if not _meta_equal(self.meta[k], other.meta[k]):
                raise ValueError(f"cannot union: meta {k!r} differs ({self.meta[k]!r} vs {other.meta[k]!r})")
        return Batch({**self.tensors, **other.tensors}, {**self.non_tensors, **other.non_tensors},
                     {**self.meta, **other.meta})

    # --- rows ----------------------------------------------------------------------------------

    def chunk(self, n: int) -> list["Batch"]:
        """n batches of equal size, in order. A batch that n does not divide is refused: pad it
        first with `pad_to_divisor(n)` (dispatch does)."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"chunk needs a positive number of chunks, got {n!r}")
        if len(self) % n:
            raise ValueError(f"a batch of {len(self)} rows does not split into {n} equal chunks; "
                             f"use pad_to_divisor({n}) first")
        size = len(self) // n
        return [self[i * size:(i + 1) * size] for i in range(n)]

    @staticmethod
    def concat(batches: Sequence["Batch"]) -> "Batch":
        """The rows of every batch in order; all must have the same fields. Meta is the first
        batch's (as verl's DataProto.concat)."""
        batches = list(batches)
        if not batches:
            raise ValueError("concat needs at least one batch")
        first = batches[0]
        t_keys, n_keys = set(first.tensors), set(first.non_tensors)
        for i, b in enumerate(batches[1:], 1):
            if set(b.tensors) != t_keys or set(b.non_tensors) != n_keys:
                raise ValueError(f"cannot concat: batch {i} has fields {sorted(b.keys())}, batch 0 has "
                                 f"{sorted(first.keys())}")
        return Batch({k: torch.cat([b.tensors[k] for b in batches]) for k in first.tensors},
                     {k: np.concatenate([b.non_tensors[k] for b in batches]) for k in first.non_tensors},
                     first.meta)

    def repeat_interleave(self, n: int) -> "Batch":
        """Each row n times in a row (n samples per prompt): rows a, b -> a, a, b, b for n=2."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"repeat_interleave needs a positive count, got {n!r}")
        index = torch.arange(len(self)).repeat_interleave(n)
        return self[index]

    def pad_to_divisor(self, d: int) -> tuple["Batch", int]:
        """(the batch grown to a multiple of d rows, the number of rows added). The added rows
        repeat the first rows (cyclically when the batch is shorter than the pad), so every
        worker computes on real data; `unpad(pad)` drops them from a result."""
        if not isinstance(d, int) or d < 1:
            raise ValueError(f"pad_to_divisor needs a positive divisor, got {d!r}")
        pad = -len(self) % d
        if pad == 0:  # an empty batch included
            return self, 0
        padding = self[torch.arange(pad) % len(self)]
        return Batch.concat([self, padding]), pad

    def unpad(self, pad: int) -> "Batch":
        """Drop the last `pad` rows (what pad_to_divisor added)."""
        if not isinstance(pad, int) or not 0 <= pad <= len(self):
            raise ValueError(f"cannot remove {pad!r} padding rows from a batch of {len(self)}")
        return self if pad == 0 else self[:len(self) - pad]

    def to(self, device: Union[str, torch.device]) -> "Batch":
        return Batch({k: v.to(device) for k, v in self.tensors.items()}, self.non_tensors, self.meta)


def concat(batches: Iterable[Batch]) -> Batch:
    """Module-level alias of Batch.concat."""
    return Batch.concat(list(batches))
