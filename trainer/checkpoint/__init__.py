"""The one checkpoint format: `checkpointer` (atomic saves, finding, resharding loads),
`reader` (verified, zero-staging reads of DCP shards), `state` (the Stateful pieces of a run),
`cli` (`plait-ckpt`: inspect, verify, export to and import from Hugging Face)."""

from trainer.checkpoint.checkpointer import (LATEST, MANIFEST, Checkpointer, CheckpointError, effective_resume,
                                             read_manifest, step_dirname, stored_keys, tensor_shapes, verify)

__all__ = ["LATEST", "MANIFEST", "Checkpointer", "CheckpointError", "effective_resume", "read_manifest",
           "step_dirname", "stored_keys", "tensor_shapes", "verify"]
