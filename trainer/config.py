"""Typed config schemas: every default lives here once; the YAML tree under configs/ mirrors them.

`validate(cfg)` turns a composed Hydra config into a `PlaitConfig`, or raises `ConfigError` with the
key, the value and what is allowed. The CLI exits with status 2 on it, before any rank starts.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from trainer.errors import ConfigError


def choice(default: Any, *allowed: Any):
    """A field restricted to `allowed` (checked by `validate`)."""
    return field(default=default, metadata={"choices": (default, *allowed)})


@dataclass
class ModelConfig:
    name: str = "llama_tiny"
    vocab_size: int = 2048
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 352
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    tie_embeddings: bool = False


@dataclass
class DataConfig:
    # "stdlib" = the Python standard library's own source (ships with every Python; no download),
    # or a local .txt/.jsonl/.json/.parquet file or a directory of them.
    source: str = "stdlib"
    text_field: str = "text"
    streaming: bool = False  # stream a large local corpus instead of tokenizing it up front
    seq_len: int = 128
    # "train": byte-level BPE trained on the corpus and cached; or a path to a tokenizer.json
    tokenizer: str = "train"
    tokenizer_train_bytes: int = 4_000_000
    max_tokens: int = 0  # 0 = the whole corpus; else cap the tokens read (fast demos and tests)
    val_fraction: float = 0.02
    cache_dir: str = ""  # "" = $PLAIT_CACHE, else ~/.cache/plait


@dataclass
class OptimConfig:
    name: str = choice("adamw")
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 20
    schedule: str = choice("cosine", "linear", "constant")
    grad_clip: float = 1.0  # global L2 norm; 0 disables clipping


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = 1  # -1: whatever the world size leaves after the other dimensions
    tp: int = 1
    pp: int = 1
    virtual_stages: int = 1
    microbatches: int = -1  # per pipeline step, per rank; -1: pp (the fewest that keep every 1F1B stage busy)
    schedule: str = choice("1f1b", "gpipe", "interleaved_1f1b")
    sequence_parallel: bool = False  # with tp > 1: norms on sequence shards (less activation memory)
    dp_backend: str = choice("fsdp", "ddp", "deepspeed")
    # dp_backend=deepspeed: what ZeRO partitions over the data-parallel ranks: 1 optimizer state,
    # 2 + gradients, 3 + parameters (one data-parallel rank: the plain loop, as with fsdp/ddp)
    zero_stage: int = choice(1, 2, 3)
    activation_checkpoint: str = choice("none", "full", "selective")


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    batch_size: int = 16  # global batch: sequences per optimizer step, over all data-parallel ranks
    grad_accum: int = 1
    precision: str = choice("fp32", "bf16")
    log_every: int = 10
    eval_every: int = 250  # 0 = only at the end
    eval_batches: int = 4
    sample_prompt: str = "def "
    sample_tokens: int = 48
    peak_flops: float = 0.0  # per device; 0 = look up the GPU or measure a CPU matmul peak
    # environment steps of a streaming learner (task=stream_*); 0 = the task's default
    total_steps: int = 0


@dataclass
class CheckpointConfig:
    dir: str = "${run_dir}/checkpoints"
    every: int = 250  # steps between saves; 0 = only the final one
    keep_last: int = 3  # 0 keeps all
    resume: str = "none"  # none | latest | auto (latest if any) | path to a step directory
    save_final: bool = True
    async_save: bool = False  # write in a background thread while training goes on
    init_from: str = ""  # a checkpoint whose model weights start this run (optimizer, data: fresh)


@dataclass
class LauncherConfig:
    name: str = choice("local", "slurm")
    nodes: int = 1
    tasks_per_node: int = 0  # 0 = world size / nodes
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: int = 0  # 0 = the partition's default
    timeout_min: int = 60
    partition: str = ""
    account: str = ""
    qos: str = ""
    sbatch_extra: dict[str, Any] = field(default_factory=dict)  # more #SBATCH options
    setup: list[str] = field(default_factory=list)  # shell lines run before the tasks start
    dry_run: bool = False  # print the sbatch script instead of submitting
    wait: bool = True  # wait for the job and show its result


@dataclass
class LoggerConfig:
    name: str = choice("console", "wandb")
    mode: str = choice("offline", "online", "disabled")  # wandb's mode
    project: str = "plait"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    progress: bool = True  # live progress bar on rank 0


def default_task() -> dict[str, Any]:
    return {"_target_": "trainer.pretrain.run", "name": "pretrain"}


@dataclass
class PlaitConfig:
    # the runner (`_target_`), its `name`, and options of its own, which the runner validates
    task: dict[str, Any] = field(default_factory=default_task)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    name: str = "${task.name}-${model.name}"
    run_dir: str = "runs/${name}"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # a gymnasium environment id for RL tasks (e.g. Hopper-v5); "" = the task's default
    env: str = ""


def _check_choices(node: Any, prefix: str) -> None:
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_choices(value, key + ".")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            allowed = ", ".join(map(str, f.metadata["choices"]))
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {allowed}")


def _positive(cfg: PlaitConfig, *keys: str, allow_zero: bool = False) -> None:
    for key in keys:
        value = functools.reduce(getattr, key.split("."), cfg)  # not OmegaConf: ~15 ms a key
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else ">= 1"
            raise ConfigError(f"{key}={value} must be {bound}")


def resolve_parallel(p: ParallelConfig, world_size: Optional[int]) -> int:
    """Fill dp_shard=-1 from the world size and check the product; returns the world size."""
    others = p.dp_replicate * p.tp * p.pp
    if p.dp_shard == -1:
        if world_size is None:
            p.dp_shard = 1
        elif world_size % others:
            raise ConfigError(
                f"parallel.dp_shard=-1 cannot fill world size {world_size}: it is not divisible by "
                f"dp_replicate*tp*pp={others}"
            )
        else:
            p.dp_shard = world_size // others
    product = others * p.dp_shard
    if world_size is not None and product != world_size:
        raise ConfigError(
            f"world size {world_size} (from the launcher) != parallel.pp*dp_replicate*dp_shard*tp = "
            f"{p.pp}*{p.dp_replicate}*{p.dp_shard}*{p.tp} = {product}; set the sizes so their product "
            f"is {world_size}, or use parallel.dp_shard=-1"
        )
    return product


# What DeepSpeed ZeRO does not compose with here, and why.
_DEEPSPEED_REFUSED = (
    ("tp", "ZeRO flattens parameters into its own partitions and cannot hold tensor-parallel DTensors"),
    ("pp", "Plait's pipeline stages run their own backward, outside the engine, and DeepSpeed's "
           "PipelineModule has no interleaved schedule and refuses ZeRO-2/3"),
    ("dp_replicate", "ZeRO partitions over every data-parallel rank (no replicate x shard mesh); "
                     "use parallel.dp_shard for the data-parallel size"),
)


def _check_deepspeed(p: ParallelConfig, precision: str) -> None:
    for key, why in _DEEPSPEED_REFUSED:
        value = getattr(p, key)
        if value > 1:
            raise ConfigError(f"parallel.dp_backend=deepspeed with parallel.{key}={value}: {why}; allowed: "
                              f"parallel.{key}=1, or parallel.dp_backend=fsdp")
    if p.zero_stage == 3 and precision == "bf16":
        raise ConfigError(
            "trainer.precision=bf16 with parallel.dp_backend=deepspeed parallel.zero_stage=3: under torch "
            "autocast DeepSpeed 0.19.8's ZeRO-3 gradients differ from Plait's bf16 policy (fp32 weights and "
            "reduction, as DDP and ZeRO-1/2 give to 1e-7) by ~1e-3; allowed: trainer.precision=fp32, or "
            "parallel.zero_stage=1 or 2"
        )
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("parallel.dp_backend=deepspeed needs the deepspeed package, which is not installed: "
                          "pip install 'plait[deepspeed]'; or choose parallel.dp_backend=fsdp or ddp")


def check_combinations(cfg: PlaitConfig, world_size: Optional[int] = None) -> int:
    """Cross-field rules; returns the world size the run needs."""
    _check_choices(cfg, "")
    if cfg.parallel.microbatches == -1:
        cfg.parallel.microbatches = cfg.parallel.pp
    _positive(
        cfg,
        "parallel.dp_replicate", "parallel.tp", "parallel.pp", "parallel.virtual_stages",
        "parallel.microbatches", "trainer.batch_size", "trainer.grad_accum", "trainer.log_every",
        "model.dim", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.vocab_size",
        "data.seq_len",
    )
    _positive(cfg, "trainer.max_steps", "checkpoint.every", "checkpoint.keep_last",
              "trainer.eval_every", allow_zero=True)
    p, m, t = cfg.parallel, cfg.model, cfg.trainer
    if p.dp_shard == 0 or p.dp_shard < -1:
        raise ConfigError(f"parallel.dp_shard={p.dp_shard} must be >= 1, or -1 to fill the world size")
    world = resolve_parallel(p, world_size)
    if m.dim % m.n_heads:
        raise ConfigError(f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}")
    for key, value in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads),
                       ("model.ffn_dim", m.ffn_dim), ("model.vocab_size", m.vocab_size)):
        if value % p.tp:
            raise ConfigError(f"{key}={value} is not divisible by parallel.tp={p.tp}")
    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    dp = p.dp_replicate * p.dp_shard
    if t.batch_size % (dp * t.grad_accum):
        raise ConfigError(
            f"trainer.batch_size={t.batch_size} is not divisible by data-parallel size {dp} x "
            f"trainer.grad_accum={t.grad_accum}; allowed: a multiple of {dp * t.grad_accum}"
        )
    local = t.batch_size // (dp * t.grad_accum)
    if local % p.microbatches:
        raise ConfigError(
            f"the per-rank batch {local} (trainer.batch_size / (dp*grad_accum)) is not divisible by "
            f"parallel.microbatches={p.microbatches}"
        )
    if p.dp_backend == "deepspeed":
        _check_deepspeed(p, t.precision)
    elif p.zero_stage != 1:
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} applies to parallel.dp_backend=deepspeed only "
                          f"(here {p.dp_backend}); allowed: parallel.dp_backend=deepspeed, or leave zero_stage at 1")
    if p.dp_backend == "ddp" and dp > 1 and (p.tp > 1 or p.pp > 1):
        raise ConfigError(
            f"parallel.dp_backend=ddp with parallel.{'tp' if p.tp > 1 else 'pp'}>1: DDP composes with neither "
            "tensor-parallel (DTensor) parameters nor pipeline stages in torch 2.13; allowed: "
            "parallel.dp_backend=fsdp"
        )
    if p.tp > 1 and p.sequence_parallel:
        for key, value in (("data.seq_len", cfg.data.seq_len), ("model.max_seq_len", m.max_seq_len)):
            if value % p.tp:
                raise ConfigError(f"{key}={value} is not divisible by parallel.tp={p.tp}, as "
                                  "parallel.sequence_parallel=true needs; change one or set it false")
    if p.pp == 1 and p.virtual_stages > 1:
        raise ConfigError("parallel.virtual_stages > 1 needs parallel.pp > 1")
    if p.pp > 1:
        from parallel.pipeline import schedule_problem

        problem = schedule_problem(p.schedule, p.pp, p.virtual_stages, p.microbatches, m.n_layers)
        if problem:
            raise ConfigError(
                f"parallel.schedule={p.schedule} with parallel.pp={p.pp}, parallel.virtual_stages="
                f"{p.virtual_stages}, parallel.microbatches={p.microbatches}, model.n_layers={m.n_layers}: "
                f"{problem}"
            )
        if m.tie_embeddings:
            raise ConfigError("model.tie_embeddings=true with parallel.pp>1: the input embedding (first "
                              "stage) and output layer (last stage) cannot share a weight; allowed: false")
    if cfg.checkpoint.resume not in ("none", "latest", "auto") and not os.path.isdir(cfg.checkpoint.resume):
        raise ConfigError(
            f"checkpoint.resume={cfg.checkpoint.resume!r}: no such checkpoint directory; "
            "allowed: none, latest, auto, or a path to a step directory"
        )
    d = cfg.data
    if not 0 <= d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be in [0, 1)")
    if d.max_tokens < 0:
        raise ConfigError(f"data.max_tokens={d.max_tokens} must be >= 0 (0 = the whole corpus)")
    if d.tokenizer == "train" and d.tokenizer_train_bytes < 1:
        raise ConfigError(f"data.tokenizer_train_bytes={d.tokenizer_train_bytes} must be >= 1")
    init = cfg.checkpoint.init_from
    if init and not os.path.isdir(init):
        raise ConfigError(f"checkpoint.init_from={init!r}: no such checkpoint directory")
    src = cfg.data.source
    if not src:
        raise ConfigError("data.source is not set; allowed: stdlib, or a local .txt/.jsonl/.json/.parquet "
                          "file or a directory of them (data=local data.source=PATH)")
    if src != "stdlib" and not os.path.exists(os.path.expanduser(src)):
        raise ConfigError(
            f"data.source={src!r}: no such file or directory; allowed: stdlib, or a local "
            ".txt/.jsonl/.json/.parquet file or a directory of them"
        )
    tok = cfg.data.tokenizer
    if tok != "train" and not os.path.isfile(os.path.expanduser(tok)):
        raise ConfigError(f"data.tokenizer={tok!r}: no such file; allowed: train, or a path to tokenizer.json")
    return world


SECTIONS = {f.name for f in dataclasses.fields(PlaitConfig)}


def _fields_at(path: str) -> list[str]:
    node: Any = PlaitConfig
    for part in path.split("."):
        hints = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in hints or not dataclasses.is_dataclass(hints[part].default_factory
                                                                if hints[part].default_factory is not dataclasses.MISSING
                                                                else None):
            return []
        node = hints[part].default_factory
    return [f.name for f in dataclasses.fields(node)]


def to_schema(cfg: DictConfig | dict) -> PlaitConfig:
    """Merge a composed config onto the schema: unknown keys and wrong types become ConfigError."""
    raw = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    unknown = sorted(set(raw.keys()) - SECTIONS)
    if unknown:
        raise ConfigError(
            f"unknown top-level key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(SECTIONS))}"
        )
    missing = sorted(OmegaConf.missing_keys(raw))
    if missing:
        raise ConfigError(f"{', '.join(missing)}: required but not set (???); set it on the command line, "
                          f"e.g. {missing[0]}=...")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PlaitConfig), raw)
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        msg = str(err).split("\n")[0]
        if isinstance(err, ConfigKeyError) and "." in key:
            allowed = _fields_at(key.rsplit(".", 1)[0])
            if allowed:
                msg = f"unknown key; allowed: {', '.join(allowed)}"
        raise ConfigError(f"{key}: {msg}" if key else msg) from None
    obj = OmegaConf.to_object(merged)
    for key in ("_target_", "name"):
        if not isinstance(obj.task.get(key), str) or not obj.task[key]:
            raise ConfigError(f"task.{key} is missing; a task config names its runner as "
                              "task._target_ (module.function) and task.name")
    return obj


def validate(cfg: DictConfig | dict, world_size: Optional[int] = None) -> PlaitConfig:
    """Schema + cross-field checks; `world_size` is the launcher's if one is present."""
    typed = to_schema(cfg)
    if world_size is None:
        from trainer.launch.distributed import launcher_world_size

        world_size = launcher_world_size()
    check_combinations(typed, world_size)
    return typed


def register_schema() -> None:
    """Make the schema Hydra's base config (`plait_schema`): the YAML tree then only states what
    differs from these defaults, and Hydra type-checks every override as it composes."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="plait_schema", node=PlaitConfig)


def as_dict(cfg: PlaitConfig) -> dict:
    """The resolved config as plain containers (saved in the run directory and manifests)."""
    return dataclasses.asdict(cfg)
