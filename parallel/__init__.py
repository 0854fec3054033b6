"""Parallelism on one named DeviceMesh: mesh, tensor (DTensor plans), pipeline (schedules of
torch.distributed.pipelining), data parallel (FSDP2 / DDP / DeepSpeed ZeRO), activation
checkpointing, gradient clipping across meshes; `parallelize` composes them.

Knows nothing of tasks or config files: functions take plain arguments and a `DeviceMesh`.
"""
