"""The one checkpoint format: `checkpointer` (saves on any group, resharding loads), `manifest`
(`plait.json`: what a step holds), `commit` (atomic steps, also across several roles' groups),
`finding` (`latest`, `checkpoint.resume`), `groups` (gloo agreement under any backend), `reader`
(verified, zero-staging reads of DCP shards), `state` (the Stateful pieces of a run), `cli`
(`plait-ckpt`: inspect, verify, export to and import from Hugging Face)."""

from trainer.checkpoint.checkpointer import Checkpointer, default_attempt
from trainer.checkpoint.finding import effective_resume, find_step, latest_step, list_steps
from trainer.checkpoint.manifest import (FORMAT_VERSION, LATEST, MANIFEST, RESERVED_KEYS, ROLES_FORMAT_VERSION,
                                         CheckpointError, read_manifest, role_root, roles_of, step_dirname,
                                         stored_keys, tensor_shapes, verify)

__all__ = ["FORMAT_VERSION", "LATEST", "MANIFEST", "RESERVED_KEYS", "ROLES_FORMAT_VERSION", "Checkpointer",
           "CheckpointError", "default_attempt", "effective_resume", "find_step", "latest_step", "list_steps",
           "read_manifest", "role_root", "roles_of", "step_dirname", "stored_keys", "tensor_shapes", "verify"]
