"""Parallelism on one named DeviceMesh: mesh, data parallel (FSDP2 / DDP), gradient clipping.

Knows nothing of tasks or config files: functions take plain arguments and a `DeviceMesh`.
"""
