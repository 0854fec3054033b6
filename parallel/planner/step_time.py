"""Step-time proxy of a layout: compute at a fraction of peak, the pipeline bubble, and the
tensor-, pipeline- and data-parallel communication that compute does not hide (ring collectives
over NVLink inside a node, the NIC across nodes). For ranking layouts, not for predicting."""

from __future__ import annotations

from dataclasses import dataclass

from parallel.planner.layout import Hardware, Layout, Workload, dtypes
from parallel.planner.memory import block_params, bubble_fraction, microbatch_size, stage_params

# --- step time -----------------------------------------------------------------------------------

@dataclass
class StepTime:
    """Seconds per optimizer step on one device, by cause (a proxy for ranking, not a prediction)."""

    compute: float  # model FLOPs (+ recomputation) at hw.flops_efficiency of peak
    bubble: float  # pipeline idle time: compute x bubble fraction
    tp_comm: float  # tensor-parallel all-reduces (or reduce-scatter + all-gather), not overlapped
    pp_comm: float  # activations and gradients sent between stages
    dp_comm: float  # data-parallel gathers and reductions left over after overlapping with compute
    total: float


def group_bandwidth(size: int, stride: int, hw: Hardware) -> float:
    """A mesh group of `size` ranks `stride` apart (Plait's order: pp, dp_replicate, dp_shard, tp;
    tp innermost) stays inside a node iff size·stride <= gpus_per_node."""
    return hw.intra_node_bw if size * stride <= hw.gpus_per_node else hw.inter_node_bw


def ring_seconds(nbytes: float, group: int, bandwidth: float, kind: str = "all_reduce") -> float:
    """Ring collective time: all-reduce 2(g-1)/g · bytes/bw; reduce-scatter and all-gather (g-1)/g."""
    if group <= 1:
        return 0.0
    factor = 2 if kind == "all_reduce" else 1
    return factor * (group - 1) / group * nbytes / bandwidth


def recompute_flops_per_token(model, seq_len: int, ac: str) -> float:
    """Extra forward FLOPs per token: full 2·N_blocks + 4·L·h·s (one more forward of every block);
    selective 4·L·h·s (the attention core only); none 0."""
    if ac == "none":
        return 0.0
    attention = 4 * model.n_layers * model.dim * seq_len
    if ac == "selective":
        return attention
    matrix, norms = block_params(model)
    return 2 * model.n_layers * (matrix + norms) + attention


def step_time(model, layout: Layout, work: Workload, hw: Hardware, flops_per_token: float) -> StepTime:
    """compute · (1 + bubble) + TP + PP communication + the DP communication compute does not hide;
    `flops_per_token` is the model's training FLOPs per token (6N + 12·L·h·s for Llama)."""
    lay, s = layout, work.seq_len
    tokens = work.batch_size * s
    peak = hw.peak_flops * hw.flops_efficiency * (0.5 if work.precision == "fp32" else 1.0)
    flops = tokens * (flops_per_token + recompute_flops_per_token(model, s, lay.activation_checkpoint))
    compute = flops / (lay.world_size * peak)
    bubble = compute * bubble_fraction(lay.schedule, lay.pp, lay.virtual_stages, lay.microbatches)

    dt = dtypes(work.precision, lay.fsdp)
    b = microbatch_size(lay, work.batch_size)
    passes = lay.microbatches * lay.grad_accum  # microbatches per step through this device
    layers = model.n_layers / lay.pp
    hidden = dt.compute * s * b * model.dim  # one microbatch's activations between blocks
    # per block: 2 collectives forward, 2 backward, 2 more when full recomputation replays forward
    n_coll = 4 + (2 if lay.activation_checkpoint == "full" else 0)
    tp_bw = group_bandwidth(lay.tp, 1, hw)
    tp = passes * layers * n_coll * ring_seconds(hidden, lay.tp, tp_bw)
    pp_bw = group_bandwidth(lay.pp, lay.dp * lay.tp, hw)
    sent = hidden / (lay.tp if lay.sequence_parallel and lay.tp > 1 else 1)
    pp = 0.0 if lay.pp == 1 else 2 * passes * lay.virtual_stages * sent / pp_bw

    st = stage_params(model, lay.pp, lay.tp, lay.virtual_stages, 0)
    shard_bw = group_bandwidth(lay.dp_shard, lay.tp, hw)
    rep_bw = group_bandwidth(lay.dp_replicate, lay.dp_shard * lay.tp, hw)
    if lay.zero == 3 or lay.fsdp:
        # gather forward and again in backward (per micro-step, once per step under a pipeline),
        # reduce-scatter fp32 gradients; HSDP all-reduces the shards across replicas
        gathers = 2 * (1 if lay.pp > 1 else lay.grad_accum)
        u = 4 if lay.zero else dt.unsharded
        dp = gathers * ring_seconds(u * st.total, lay.dp_shard, shard_bw, "all_gather") \
            + ring_seconds(4 * st.total, lay.dp_shard, shard_bw, "reduce_scatter") \
            + ring_seconds(4 * st.total / lay.dp_shard, lay.dp_replicate, rep_bw)
    else:
        dp = ring_seconds(4 * st.total, lay.dp, group_bandwidth(lay.dp, lay.tp, hw))
    exposed = max(0.0, dp - compute)
    return StepTime(compute=compute, bubble=bubble, tp_comm=tp, pp_comm=pp, dp_comm=exposed,
                    total=compute + bubble + tp + pp + exposed)

