"""Memory per device of a layout by the analytical model of Megatron-LM (Narayanan et al. SC'21,
§3) and of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", §4), with the activation counts re-derived from the Llama forward in
trainer/models/llama.py.

State. Plait keeps parameters in fp32 under both precisions (bf16 runs compute on bf16 copies:
FSDP2's gathered parameters, or autocast's casts), so a parameter costs 4 (weight) + 4 (fp32
gradient) + 8 (AdamW's two moments) = 16 bytes, all divided by dp_shard under FSDP (ZeRO-3);
Megatron's bf16 weights + fp32 master copy come to 18 (2 + 4 + 4 + 8).

Activations. Korthikanti et al. count s·b·h·(34 + 5·a·s/h) bytes per GPT layer in fp16, the
5·a·s/h part being the a·s² softmax tensors. Plait's block differs: RMSNorm works in fp32 and saves
x (or its fp32 upcast), x·rsqrt(mean x²) and the rsqrt; RoPE on q and k; grouped-query attention
through `scaled_dot_product_attention`, a flash kernel that keeps no s² tensor (only q, the
repeated k and v, the output and a per-head log-sum-exp); a SwiGLU MLP of width f (w1·x, its
silu, w3·x and their product). Per layer and microbatch, with c the bytes of matmul inputs and
outputs (fp32: 4, bf16: 2) and k_a, k_f the copies of a norm's output kept by the q/k/v and w1/w3
matmuls (1 each; 3 and 2 under autocast, which casts the input once per matmul):

    2·(8·sbh + 4·sb)                  the two RMSNorms             (÷ t under sequence parallelism)
  + (k_a + k_f)·c·sbh                 matmul inputs (the whole sequence also under SP: DTensor keeps
                                      the all-gathered input, where Megatron re-gathers it)
  + 4·c·sbh/t + 4·a·sb/t              q, k and v after RoPE/repeat, attention output; log-sum-exp
  + 4·c·sbf/t                         SwiGLU

i.e. fp32 40·sbh + 16·sbf + (8 + 4a)·sb bytes, bf16 under autocast 34·sbh + 8·sbf + (8 + 4a)·sb
(plus the bf16 weight copies), bf16 under FSDP2 28·sbh + 8·sbf + (8 + 4a)·sb: the three are checked
against what autograd saves in tests/parallel/test_planner.py. Full recomputation keeps only the
block input, r·sbh (r: 4, or 2 under FSDP bf16; ÷ t under SP), and rebuilds one block at a time in
backward; selective recomputation (parallel/activation_checkpoint.py) keeps matmul and collective
outputs. The last stage adds the final norm, the output matmul's input, the fp32 log-softmax
(4·sbV/t) and, in the loss backward, two more logits-sized fp32 buffers (three under TP's
`loss_parallel`): at s = 8192 and V = 128256 that is 12.6 GB per sequence, often the peak.

Peak. Estimates are of live tensor bytes at a step's peak moment, validated on CPU against the
allocator's count (tests/parallel/test_planner.py: 15 layouts on 1-4 ranks within 7%); GPU
allocator caching and fragmentation, the CUDA context and NCCL buffers are `Hardware.headroom`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from parallel.deepspeed_zero import zero_bucket_elements
from parallel.pipeline import layer_split, stage_ids
from parallel.planner.layout import AC_MODES, FP32, SCHEDULES, Dtypes, Hardware, Layout, Workload, dtypes

# --- parameters ------------------------------------------------------------------------------

def block_params(model) -> tuple[int, int]:
    """(matrix, norm) parameters of one block: h·hd·(2a + 2kv) + 3·h·f, and 2·h."""
    h, hd = model.dim, model.dim // model.n_heads
    matrix = h * hd * (2 * model.n_heads + 2 * model.n_kv_heads) + 3 * h * model.ffn_dim
    return matrix, 2 * h


def total_params(model) -> int:
    """L·(block) + V·h (embedding) + h (final norm) + V·h (output, unless tied)."""
    matrix, norms = block_params(model)
    out = 0 if model.tie_embeddings else model.vocab_size * model.dim
    return model.n_layers * (matrix + norms) + model.vocab_size * model.dim + model.dim + out


def stage_layers(n_layers: int, pp: int, virtual_stages: int, pp_rank: int) -> list[int]:
    """Layers in each chunk pipeline rank `pp_rank` holds (Megatron's chunk i -> rank i mod pp)."""
    split = layer_split(n_layers, pp * virtual_stages)
    return [len(split[c]) for c in stage_ids(pp_rank, pp, virtual_stages)]


@dataclass(frozen=True)
class StageParams:
    """Parameters one device holds before data-parallel sharding (tensor-parallel shards)."""

    total: int
    root: int  # embedding, final norm, output: FSDP's root unit (gathered for the whole step)
    block: int  # one block: FSDP's unit
    largest: int  # the largest single tensor (per-tensor optimizer temporaries)
    matrices: int  # matrix parameters (what autocast copies to bf16)
    layers: int
    first: bool  # holds the embedding
    last: bool  # holds the output layer and the loss


def stage_params(model, pp: int, tp: int, virtual_stages: int = 1, pp_rank: int = 0) -> StageParams:
    """Blocks: matrices/t + norms; embedding V·h/t on the first stage, h + V·h/t on the last
    (vocabulary-parallel under TP; a tied output weight counts once, pp = 1 only)."""
    matrix, norms = block_params(model)
    layers = sum(stage_layers(model.n_layers, pp, virtual_stages, pp_rank))
    first, last = pp_rank == 0, pp_rank == pp - 1  # chunk 0, and chunk pp·v - 1 on rank pp - 1
    vh = model.vocab_size * model.dim // tp
    root = (vh if first else 0) + ((model.dim + (0 if model.tie_embeddings else vh)) if last else 0)
    block = matrix // tp + norms
    per_tensor = [model.dim * model.ffn_dim // tp] + ([vh] if root else [])
    return StageParams(total=layers * block + root, root=root, block=block, largest=max(per_tensor),
                       matrices=layers * (matrix // tp) + (vh if last else 0),  # output: cast even if tied
                       layers=layers, first=first, last=last)


def weight_bytes(params: int, dp_shard: int, fsdp: bool) -> float:
    """4·P/d: parameters stay fp32 (under bf16 they are the master copy), sharded by FSDP."""
    return 4 * params / (dp_shard if fsdp else 1)


def grad_bytes(params: int, dp_shard: int, fsdp: bool) -> float:
    """4·P/d: fp32 gradients (FSDP reduces in fp32); DDP and one process keep them whole."""
    return 4 * params / (dp_shard if fsdp else 1)


def optimizer_bytes(params: int, dp_shard: int, fsdp: bool) -> float:
    """8·P/d: AdamW's two fp32 moments, sharded like the parameters (ZeRO-3 / FSDP)."""
    return 8 * params / (dp_shard if fsdp else 1)


def ddp_bucket_bytes(params: int, ddp: bool) -> float:
    """4·P under DDP: its gradient buckets are a second fp32 copy (gradient_as_bucket_view=False)."""
    return 4 * params if ddp else 0




def zero_state_bytes(params: int, dp: int, stage: int) -> tuple[float, float, float]:
    """DeepSpeed ZeRO (Rajbhandari et al. SC'20) with Plait's fp32 weights: (parameters 4·P, /d at
    stage 3; gradients 4·P, /d from stage 2; optimizer 12·P/d = the fp32 partition it steps + AdamW's
    two moments)."""
    return (4 * params / (dp if stage >= 3 else 1), 4 * params / (dp if stage >= 2 else 1), 12 * params / dp)


def optimizer_temp_bytes(params: int, largest: int, dp_shard: int, fsdp: bool, foreach: bool) -> float:
    """AdamW step temporaries: foreach (GPU) 4·P/d for sqrt(v); per tensor (CPU) 2·4·largest/d."""
    div = dp_shard if fsdp else 1
    return (4 * params if foreach else 8 * largest) / div


# --- start-up ---------------------------------------------------------------------------------

def largest_whole_param(model, first: bool, last: bool) -> int:
    """The largest parameter a rank draws whole at start (parallel/init.py): V·h for the embedding
    (first stage) or the output (last), else a block matrix, max(h·f, h·a·hd)."""
    matrix = max(model.dim * model.ffn_dim, model.dim * model.dim)
    return max(matrix, model.vocab_size * model.dim if first or last else 0)


def rope_bytes(model, chunks: int) -> float:
    """Each model chunk's RoPE tables: cos and sin, fp32 [max_seq_len, head_dim]."""
    return chunks * 2 * 4 * model.max_seq_len * (model.dim // model.n_heads)


def startup_bytes(model, layout: Layout, pp_rank: int = 0) -> float:
    """Start-up peak of a rank (meta model -> parallelize -> allocate and initialise its shards,
    parallel/init.py): its own fp32 shards, plus the one whole parameter being drawn (the largest)
    and the RoPE tables: 4·P_local + 4·P_max + rope. DDP materialises the stage whole and then
    broadcasts it in coalesced buffers (rank 0 holds two more copies): 12·P + 2·rope. ZeRO also
    materialises the stage whole before `deepspeed.initialize` partitions it (counted as
    4·P + 4·P_max + rope, the materialised model, not ZeRO's own flattening)."""
    lay = layout
    st = stage_params(model, lay.pp, lay.tp, lay.virtual_stages, pp_rank)
    local = weight_bytes(st.total, lay.dp_shard, lay.fsdp)
    rope = rope_bytes(model, lay.virtual_stages if lay.pp > 1 else 1)
    drawing = local + 4 * largest_whole_param(model, st.first, st.last) + rope
    if lay.dp_backend == "ddp" and lay.dp > 1:
        return max(drawing, 3 * local + 2 * rope)
    return drawing


# --- activations ------------------------------------------------------------------------------

def layer_activation_bytes(s: int, b: int, model, t: int = 1, sp: bool = False,
                           dt: Dtypes = FP32, ac: str = "none") -> float:
    """Bytes one block keeps for backward per microbatch (module docstring): none =
    (16·sbh + 8·sb)/t' + (k_a+k_f)·c·sbh + (4c·sbh + 4a·sb)/t + 4c·sbf/t (t' = t under SP);
    full = r·sbh/t'; selective = r·sbh/t' + c·(sbh + 2·sb·kv·hd + 2·sbf)/t + 2c·sbh, and under TP
    + 2c·sbh/t' (all-reduce / reduce-scatter outputs) + 2r·sbh (SP's all-gathers)."""
    h, f, a = model.dim, model.ffn_dim, model.n_heads
    sbh, sb = s * b * h, s * b
    tn = t if sp and t > 1 else 1
    if ac == "full":
        return dt.residual * sbh / tn
    if ac == "selective":
        kv = model.n_kv_heads * (h // a)
        mm = dt.compute * (sbh + 2 * sb * kv + 2 * sb * f) / t + 2 * dt.compute * sbh  # wq wk wv w1 w3; wo w2
        # the two all-reduce (under SP: reduce-scatter) outputs; under SP also the two all-gathered norm outputs
        collectives = (2 * dt.compute * sbh / tn + (2 * dt.residual * sbh if sp else 0)) if t > 1 else 0
        return dt.residual * sbh / tn + mm + collectives
    if ac != "none":
        raise ValueError(f"activation checkpointing {ac!r}; allowed: {', '.join(AC_MODES)}")
    norms = (2 * 8 * sbh + 2 * 4 * sb) / tn  # x (or its fp32 upcast), x·rsqrt, rsqrt: fp32
    inputs = (dt.attn_copies + dt.ffn_copies) * dt.compute * sbh
    attention = (4 * dt.compute * sbh + 4 * a * sb) / t
    mlp = 4 * dt.compute * s * b * f / t
    return norms + inputs + attention + mlp


def recompute_bytes(s: int, b: int, model, t: int, sp: bool, dt: Dtypes, ac: str) -> float:
    """Backward of one recomputed block: its whole `none` activations, live at once (0 without AC)."""
    return 0.0 if ac == "none" else layer_activation_bytes(s, b, model, t, sp, dt, "none")


def head_activation_bytes(s: int, b: int, model, t: int = 1, sp: bool = False,
                          dt: Dtypes = FP32) -> float:
    """Last stage, kept for backward: final norm (8·sbh + 4·sb)/t', output input c·sbh, fp32
    log-softmax 4·sbV/t."""
    tn = t if sp and t > 1 else 1
    sbh = s * b * model.dim
    return (8 * sbh + 4 * s * b) / tn + dt.compute * sbh \
        + 4 * s * b * model.vocab_size / t


def loss_backward_bytes(s: int, b: int, vocab: int, t: int = 1) -> float:
    """Cross-entropy backward on top of the saved log-softmax: 8·sbV (grad of log-softmax, grad of
    logits), or 12·sbV/t under TP's loss_parallel (the sharded softmax keeps one buffer more)."""
    return (12 if t > 1 else 8) * s * b * vocab / t


def microbatches_in_flight(schedule: str, pp: int, virtual_stages: int, microbatches: int,
                           pp_rank: int = 0) -> int:
    """Chunk-microbatches whose activations a rank holds at once: gpipe m; 1f1b min(m, p - rank);
    interleaved (v-1)·m_r + 2(p-1-rank) + 1, m_r = m / max(1, m // p) (torch's rounds; for m >= 2p
    Megatron's v·p + p - 1 = p·v·(1 + (p-1)/(p·v)) on rank 0), at most m·v."""
    if pp == 1:
        return 1
    if schedule == "gpipe":
        return microbatches
    if schedule == "1f1b":
        return min(microbatches, pp - pp_rank)
    if schedule == "interleaved_1f1b":
        per_round = microbatches // max(1, microbatches // pp)
        return min((virtual_stages - 1) * per_round + 2 * (pp - 1 - pp_rank) + 1, microbatches * virtual_stages)
    raise ValueError(f"schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")


def bubble_fraction(schedule: str, pp: int, virtual_stages: int, microbatches: int) -> float:
    """Pipeline bubble over ideal compute time (Megatron-LM §2.2): (p-1)/(v·m); gpipe, 1f1b: (p-1)/m."""
    if pp == 1:
        return 0.0
    v = virtual_stages if schedule == "interleaved_1f1b" else 1
    return (pp - 1) / (v * microbatches)

# --- one device's memory -----------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Bytes on one device at its peak, by what holds them; they add up to `peak`."""

    params: float
    grads: float  # live at the peak (none yet at a loss-time peak without accumulation)
    optimizer: float  # AdamW moments (+ DDP's bucket copy)
    activations: float  # kept for backward by every microbatch in flight
    other: float  # loss buffers, a recomputed block, FSDP-gathered parameters, bf16 weight copies,
    # pipeline receive buffers, DeepSpeed's bucket, optimizer temporaries: what the peak moment holds
    peak: float
    phase: str  # "activations" | "end of backward" | "optimizer step"
    pp_rank: int
    microbatch_size: int
    in_flight: int  # chunk-microbatches whose activations are held at once
    startup: float = 0.0  # the start-up peak, before the first step (`startup_bytes`; not in `peak`)


def microbatch_size(layout: Layout, batch_size: int) -> int:
    """Sequences per microbatch: global batch / (dp · grad_accum · microbatches)."""
    return max(1, batch_size // (layout.dp * layout.grad_accum * layout.microbatches))


def pipeline_buffer_bytes(pp: int, virtual_stages: int, microbatches: int, pp_rank: int,
                          boundary: float) -> float:
    """torch.distributed.pipelining's receive buffers, one per microbatch and direction:
    m · boundary for each chunk that receives activations (not chunk 0) or gradients (not the last)."""
    if pp == 1:
        return 0.0
    chunks = stage_ids(pp_rank, pp, virtual_stages)
    last = pp * virtual_stages - 1
    return microbatches * boundary * sum((c != 0) + (c != last) for c in chunks)


def memory_per_device(model, layout: Layout, work: Workload, hw: Hardware = Hardware(),
                      pp_rank: Optional[int] = None) -> MemoryEstimate:
    """Peak bytes on pipeline rank `pp_rank` (None: the higher of the first and last): the largest of
    (1) the activation peak, as the last forward's loss backward starts (or a pipeline holds the most
    microbatches): params + optimizer [+ grads if earlier microbatches went through backward] +
    in flight x activations + loss buffers; (2) the end of backward: params + optimizer + grads +
    the first layer's activations (rebuilt under recomputation); (3) the optimizer step: params +
    grads + optimizer + its temporaries; plus FSDP's gathered units and pipeline buffers throughout."""
    if pp_rank is None:  # the first rank holds the most microbatches and layers, the last the loss
        return max((memory_per_device(model, layout, work, hw, r) for r in {0, layout.pp - 1}),
                   key=lambda e: e.peak)
    lay, s = layout, work.seq_len
    sp = lay.sequence_parallel and lay.tp > 1
    tn = lay.tp if sp else 1  # what sequence parallelism divides
    dt = dtypes(work.precision, lay.fsdp)
    st = stage_params(model, lay.pp, lay.tp, lay.virtual_stages, pp_rank)
    b = microbatch_size(lay, work.batch_size)
    boundary = dt.residual * s * b * model.dim / tn  # one microbatch's hidden states between chunks
    ddp = lay.dp_backend == "ddp" and lay.dp > 1
    params = weight_bytes(st.total, lay.dp_shard, lay.fsdp)
    grads = grad_bytes(st.total, lay.dp_shard, lay.fsdp)
    optim = optimizer_bytes(st.total, lay.dp_shard, lay.fsdp) + ddp_bucket_bytes(st.total, ddp)
    if lay.zero:
        params, grads, optim = zero_state_bytes(st.total, lay.dp, lay.zero)

    # each chunk-microbatch in flight: its layers' saved tensors, and the chunk's output, which the
    # pipeline stage holds until that microbatch's backward; on the last chunk instead (one
    # microbatch at a time but under gpipe) the head, the logits a stage keeps, the targets; the
    # token ids on the first
    layer = layer_activation_bytes(s, b, model, lay.tp, sp, dt, lay.activation_checkpoint)
    in_flight = microbatches_in_flight(lay.schedule, lay.pp, lay.virtual_stages, lay.microbatches, pp_rank)
    n_head = 0 if not st.last else (lay.microbatches if lay.pp > 1 and lay.schedule == "gpipe" else 1)
    head = head_activation_bytes(s, b, model, lay.tp, sp, dt) + 8 * s * b
    if lay.pp > 1:
        head += dt.compute * s * b * model.vocab_size / lay.tp
    chunk = st.layers / lay.virtual_stages * layer + (boundary if lay.pp > 1 else 0.0)
    acts = in_flight * chunk + n_head * (head - (boundary if lay.pp > 1 else 0.0))
    if st.first:
        acts += in_flight * 8 * s * b
    loss = loss_backward_bytes(s, b, model.vocab_size, lay.tp) if st.last else 0.0
    # autocast's bf16 weight copies, saved from forward to backward; inside recomputed blocks they
    # are not saved (autocast's cache is dropped when forward ends) but re-made one block at a time
    block_copies = dt.weight_copy * (st.block - 2 * model.dim)
    copies = dt.weight_copy * st.matrices
    if lay.activation_checkpoint != "none":
        copies -= st.layers * block_copies
    buffers = pipeline_buffer_bytes(lay.pp, lay.virtual_stages, lay.microbatches, pp_rank, boundary)
    if lay.zero:
        buffers += 4 * zero_bucket_elements(st.total)  # one fp32 bucket per rank

    # FSDP2: the root unit (embedding, norm, output) stays gathered all step; blocks but the last
    # are resharded after forward; in backward a block's parameters and its unsharded fp32 gradients
    # (the reduce-scatter input) are live beside the root's. Under a pipeline torch keeps every
    # chunk gathered, with unsharded gradients, until the last microbatch's backward
    # (PipelineStage.backward_maybe_with_nosync).
    accumulating = lay.grad_accum > 1 or (lay.pp > 1 and lay.microbatches * lay.virtual_stages > in_flight)
    gathered_fwd = gathered_bwd = 0.0
    if lay.zero == 3:  # ZeRO-3 gathers module by module, like FSDP2 (in fp32: autocast casts later);
        # reducing a bucket flattens its gradients and the collective takes a copy (gloo)
        gathered_fwd = (st.root + st.block) * 4
        gathered_bwd = (st.root + st.block) * 8 + 8 * min(st.total, zero_bucket_elements(st.total))
    if lay.fsdp:
        u = dt.unsharded
        if lay.pp > 1:
            gathered_fwd = st.total * (u + (4 if accumulating else 0))
            gathered_bwd = st.total * (u + 4)
        else:
            gathered_fwd = (st.root + st.block) * u
            gathered_bwd = (st.root + st.block) * (u + 4)

    rebuilt = recompute_bytes(s, b, model, lay.tp, sp, dt, lay.activation_checkpoint)
    if rebuilt:
        rebuilt += block_copies
    flowing = 2 * dt.residual * s * b * model.dim  # the gradient arriving at a block and the one it sends on
    temp = optimizer_temp_bytes(st.total, st.largest, lay.dp if lay.zero else lay.dp_shard,
                                lay.fsdp or bool(lay.zero), hw.optimizer_foreach)
    # accumulating gradients: sharded ones, except under FSDP x PP where they stay unsharded (above)
    held_grads = grads if accumulating and not (lay.fsdp and lay.pp > 1) else 0.0
    phases = {  # phase: (grads live, activations, other)
        "activations": (held_grads, acts, loss + copies + gathered_fwd + buffers),
        # the first microbatch's backward ends while the others in flight keep theirs; under a
        # pipeline the schedule runs inside autocast, whose cache keeps the bf16 weights all step
        "end of backward": (held_grads if lay.fsdp and lay.pp > 1 else grads, (in_flight - 1) * chunk + layer,
                            rebuilt + flowing + gathered_bwd + buffers + (copies if lay.pp > 1 else 0.0)),
        "optimizer step": (grads, 0.0, temp + buffers),
    }
    phase = max(phases, key=lambda k: sum(phases[k]))
    g, a, other = phases[phase]
    return MemoryEstimate(params=params, grads=g, optimizer=optim, activations=a, other=other,
                          peak=params + optim + g + a + other, phase=phase, pp_rank=pp_rank,
                          microbatch_size=b, in_flight=in_flight, startup=startup_bytes(model, lay, pp_rank))

