"""rlhf/batch.py: fields, rows, union conflicts, chunk/concat, n samples per prompt, padding."""

import numpy as np
import pytest
import torch

from rlhf.batch import Batch, concat


def make(n=5):
    return Batch(
        {"input_ids": torch.arange(n * 3).view(n, 3), "response_mask": torch.ones(n, 3)},
        {"prompt": [f"p{i}" for i in range(n)], "uid": np.arange(n, dtype=object)},
        meta={"temperature": 1.0},
    )


def test_fields_rows_and_len():
    b = make()
    assert len(b) == 5 and set(b.keys()) == {"input_ids", "response_mask", "prompt", "uid"}
    assert b["prompt"][2] == "p2" and b["input_ids"].shape == (5, 3)
    rows = b[1:3]
    assert len(rows) == 2 and list(rows["prompt"]) == ["p1", "p2"] and rows.meta == {"temperature": 1.0}
    picked = b[torch.tensor([4, 0])]
    assert list(picked["prompt"]) == ["p4", "p0"] and picked["input_ids"][0].tolist() == [12, 13, 14]
    masked = b[torch.tensor([True, False, True, False, False])]
    assert list(masked["uid"]) == [0, 2]
    one = b[-1]
    assert len(one) == 1 and one["prompt"][0] == "p4"
    with pytest.raises(KeyError, match="no field 'values'"):
        b["values"]
    with pytest.raises(IndexError):
        b[5]


def test_list_of_lists_stays_one_row_per_item():
    b = Batch({"x": torch.zeros(2, 1)}, {"tokens": [[1, 2], [3, 4]]})
    assert b["tokens"].shape == (2,) and b["tokens"][1] == [3, 4]


def test_mismatched_leading_dims_are_refused():
    with pytest.raises(ValueError, match="different batch sizes"):
        Batch({"a": torch.zeros(3), "b": torch.zeros(4)})
    with pytest.raises(ValueError, match="different batch sizes"):
        Batch({"a": torch.zeros(3)}, {"prompt": ["x", "y"]})


def test_select_and_union():
    b = make()
    s = b.select("input_ids", "prompt")
    assert set(s.keys()) == {"input_ids", "prompt"}
    with pytest.raises(KeyError, match="old_log_prob"):
        b.select("old_log_prob")
    extra = Batch({"old_log_prob": torch.randn(5, 3)}, meta={"step": 3})
    u = s.union(extra).union(b.select("input_ids"))  # an equal shared field is fine
    assert set(u.keys()) == {"input_ids", "prompt", "old_log_prob"} and u.meta == {"temperature": 1.0, "step": 3}
    with pytest.raises(ValueError, match="field 'input_ids' differs"):
        b.union(Batch({"input_ids": torch.zeros(5, 3, dtype=torch.long)}))
    with pytest.raises(ValueError, match="meta 'temperature' differs"):
        b.union(Batch({"v": torch.zeros(5)}, meta={"temperature": 0.5}))
    with pytest.raises(ValueError, match="5 and 4 rows"):
        b.union(Batch({"v": torch.zeros(4)}))


def test_chunk_concat_round_trip():
    b = make(6)
    parts = b.chunk(3)
    assert [len(p) for p in parts] == [2, 2, 2] and list(parts[1]["prompt"]) == ["p2", "p3"]
    back = concat(parts)
    assert torch.equal(back["input_ids"], b["input_ids"]) and list(back["prompt"]) == list(b["prompt"])
    with pytest.raises(ValueError, match="pad_to_divisor\\(4\\)"):
        b.chunk(4)
    with pytest.raises(ValueError, match="has fields"):
        Batch.concat([b, b.select("input_ids")])


def test_repeat_interleave_gives_n_samples_per_prompt():
    b = make(2).repeat_interleave(3)
    assert list(b["prompt"]) == ["p0", "p0", "p0", "p1", "p1", "p1"]
    assert b["input_ids"][:, 0].tolist() == [0, 0, 0, 3, 3, 3]


@pytest.mark.parametrize("n,d,pad", [(5, 4, 3), (8, 4, 0), (1, 4, 3), (3, 2, 1)])
def test_pad_to_divisor_and_unpad(n, d, pad):
    b = make(n)
    padded, got = b.pad_to_divisor(d)
    assert got == pad and len(padded) % d == 0 and len(padded) == n + pad
    # padding repeats real rows from the start (cyclically when the batch is short)
    assert padded["input_ids"][n:, 0].tolist() == [3 * (i % n) for i in range(pad)]
    back = padded.unpad(pad)
    assert torch.equal(back["input_ids"], b["input_ids"]) and list(back["prompt"]) == list(b["prompt"])
    with pytest.raises(ValueError):
        b.unpad(n + 1)


def test_empty_batch_needs_no_padding():
    padded, pad = Batch({"x": torch.zeros(0, 2)}).pad_to_divisor(2)
    assert pad == 0 and len(padded) == 0
