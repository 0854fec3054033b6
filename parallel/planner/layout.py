"""Planner inputs: a candidate `Layout`, the `Hardware` it is costed on, the `Workload` of one
optimizer step, and the bytes per element (`Dtypes`) that Plait's precision policy gives each
kind of tensor. The cost model is in memory.py and step_time.py, the search in search.py."""

from __future__ import annotations

from dataclasses import dataclass

from parallel.mesh import ParallelDims

GiB = 2**30
SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b")
AC_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout(ParallelDims):
    """One candidate: the mesh sizes (ParallelDims), the `parallel.*` choices, `trainer.grad_accum`."""

    virtual_stages: int = 1
    microbatches: int = 1
    schedule: str = "1f1b"
    sequence_parallel: bool = False
    dp_backend: str = "fsdp"
    zero_stage: int = 1  # dp_backend=deepspeed: ZeRO partitions optimizer state (1), + gradients (2), + parameters (3)
    activation_checkpoint: str = "none"
    grad_accum: int = 1

    @property
    def fsdp(self) -> bool:
        return self.dp_backend == "fsdp" and self.dp > 1

    @property
    def zero(self) -> int:
        """The DeepSpeed ZeRO stage in effect (0: not DeepSpeed, or one data-parallel rank)."""
        return self.zero_stage if self.dp_backend == "deepspeed" and self.dp > 1 else 0

    def describe(self) -> str:
        parts = [f"tp={self.tp}", f"pp={self.pp}"]
        if self.pp > 1:
            parts.append(self.schedule + (f" v={self.virtual_stages}" if self.virtual_stages > 1 else ""))
            parts.append(f"m={self.microbatches}")
        if self.dp_replicate > 1:
            parts.append(f"dp_replicate={self.dp_replicate}")
        backend = {"fsdp": "dp_shard", "ddp": "ddp", "deepspeed": f"zero{self.zero_stage}"}[self.dp_backend]
        parts.append(f"{backend}={self.dp_shard if self.dp_backend == 'fsdp' else self.dp}")
        if self.grad_accum > 1:
            parts.append(f"accum={self.grad_accum}")
        if self.sequence_parallel:
            parts.append("sp")
        parts.append(f"ac={self.activation_checkpoint}")
        return " ".join(parts)


@dataclass(frozen=True)
class Hardware:
    """What the step-time proxy and the fit test assume about a device and its links."""

    gpus_per_node: int = 8
    memory_bytes: float = 80 * GiB
    peak_flops: float = 989e12  # dense bf16 per device (H100 SXM); fp32 runs count half
    flops_efficiency: float = 0.5  # fraction of peak a transformer step reaches (MFU ~ 40-55%)
    intra_node_bw: float = 300e9  # bytes/s of collective bandwidth per device inside a node (NVLink)
    inter_node_bw: float = 45e9  # bytes/s per device across nodes (one 400 Gb/s NIC per GPU)
    headroom: float = 0.1  # kept free: allocator fragmentation, CUDA context, NCCL buffers
    optimizer_foreach: bool = True  # torch's AdamW on GPU (foreach: one parameter-sized temporary)


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of what one layer keeps, as Plait's precision policy makes them."""

    residual: int  # the residual stream between blocks (RMSNorm itself saves fp32, upcasting if need be)
    compute: int  # matmul inputs/outputs, attention, SwiGLU
    attn_copies: int  # copies of the attention norm's output kept by wq/wk/wv
    ffn_copies: int  # copies of the MLP norm's output kept by w1/w3
    weight_copy: int  # bytes per matrix parameter of low-precision copies held through backward
    unsharded: int  # bytes per parameter of FSDP's gathered (unsharded) parameters


def dtypes(precision: str, fsdp: bool) -> Dtypes:
    """fp32: everything 4 bytes. bf16: FSDP2 casts parameters to bf16 (all activations bf16);
    without FSDP the loop runs under torch.autocast (fp32 residual and norms, bf16 matmuls, one
    cast of a norm's output per matmul, bf16 weight copies kept for backward)."""
    if precision == "fp32":
        return Dtypes(4, 4, 1, 1, 0, 4)
    if precision != "bf16":
        raise ValueError(f"precision {precision!r}; allowed: fp32, bf16")
    if fsdp:
        return Dtypes(2, 2, 1, 1, 0, 2)
    return Dtypes(4, 2, 3, 2, 2, 2)


FP32 = dtypes("fp32", False)


@dataclass(frozen=True)
class Workload:
    """What one optimizer step processes: sequences of `seq_len` tokens, `batch_size` of them
    over all data-parallel ranks, in `precision` (fp32 | bf16)."""

    seq_len: int
    batch_size: int
    precision: str = "bf16"
