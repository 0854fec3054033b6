"""Parallelism on one named DeviceMesh: mesh, tensor (DTensor plans), pipeline (schedules of
torch.distributed.pipelining), data parallel (FSDP2 / DDP / DeepSpeed ZeRO), activation
checkpointing, gradient clipping across meshes, layout-invariant initialisation of the local
shards; `parallelize` composes them. What to shard and where to cut is the model's own plan
(plan.py).

Knows nothing of tasks or config files: functions take plain arguments and a `DeviceMesh`.
"""
