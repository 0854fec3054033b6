"""The manifest: what `meta` may add, and what only the checkpointer writes."""

import pytest

from trainer.checkpoint import RESERVED_KEYS, Checkpointer, CheckpointError, read_manifest
from trainer.checkpoint.state import Progress


@pytest.mark.parametrize("key", sorted(RESERVED_KEYS))
def test_meta_cannot_replace_what_the_manifest_says(tmp_path, key):
    with pytest.raises(CheckpointError, match=rf"meta key\(s\) {key} are written by the checkpointer"):
        Checkpointer(tmp_path, meta={"task": "x", key: 1})


def test_meta_adds_its_keys_beside_the_reserved_ones(tmp_path):
    path = Checkpointer(tmp_path, meta={"task": "x", "layout": {"tp": 2}}).save(4, {"progress": Progress(4)},
                                                                               counters={"samples": 8})
    manifest = read_manifest(path)
    assert manifest["task"] == "x" and manifest["layout"] == {"tp": 2}
    assert manifest["counters"] == {"step": 4, "samples": 8} and manifest["components"] == ["progress"]
