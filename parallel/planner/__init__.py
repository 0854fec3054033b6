"""Layout planner: memory per device and a step-time proxy of every (pp, dp_replicate, dp_shard,
tp) layout for a device count, ranked (the `plait-plan` CLI, trainer/plan_cli.py).

  layout.py     what is costed: Layout, Hardware, Workload, bytes per element (Dtypes)
  memory.py     peak bytes per device (Megatron-LM SC'21 §3, Korthikanti et al. 2022 §4), and at start-up
  step_time.py  compute, bubble and exposed communication per step
  search.py     candidate layouts, each evaluated, ranked

Pure arithmetic on plain arguments: `model` is anything with ModelConfig's fields (vocab_size, dim,
n_layers, n_heads, n_kv_heads, ffn_dim, tie_embeddings); which layouts are valid is the caller's
rule (`rank_layouts` takes a `problem` callable; the `plait-plan` CLI passes trainer/config.py's
`check_combinations`), so the divisibility rules live in one place.
"""

from parallel.planner.layout import AC_MODES, FP32, GiB, SCHEDULES, Dtypes, Hardware, Layout, Workload, dtypes
from parallel.planner.memory import (MemoryEstimate, block_params, bubble_fraction, ddp_bucket_bytes, grad_bytes,
                                     layer_activation_bytes, memory_per_device, microbatch_size,
                                     microbatches_in_flight, optimizer_bytes, stage_params, startup_bytes,
                                     total_params, weight_bytes)
from parallel.planner.search import Plan, candidate_layouts, evaluate, rank_layouts
from parallel.planner.step_time import StepTime, step_time

__all__ = [
    "AC_MODES", "FP32", "GiB", "SCHEDULES", "Dtypes", "Hardware", "Layout", "Workload", "dtypes",
    "MemoryEstimate", "block_params", "bubble_fraction", "ddp_bucket_bytes", "grad_bytes",
    "layer_activation_bytes", "memory_per_device", "microbatch_size", "microbatches_in_flight",
    "optimizer_bytes", "stage_params", "startup_bytes", "total_params", "weight_bytes",
    "Plan", "candidate_layouts", "evaluate", "rank_layouts", "StepTime", "step_time",
]
