"""Typed config schemas: every default lives here once; the YAML tree under configs/ mirrors them.

`validate(cfg)` turns a composed Hydra config into a `PlaitConfig`, or raises `ConfigError` with the
key, the value and what is allowed. The CLI exits with status 2 on it, before any rank starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from trainer.errors import ConfigError


def choice(default: Any, *allowed: Any):
    """A field restricted to `allowed` (checked by `check_fields`)."""
    return field(default=default, metadata={"choices": (default, *allowed)})


@dataclass(frozen=True)
class Bounds:
    """Where a number may lie: ge/gt below, le/lt above, plus `also` (sentinels such as -1)."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    also: tuple = ()
    note: str = ""  # what a sentinel means, for the error

    def allows(self, v: Any) -> bool:
        if v in self.also:
            return True
        return not ((self.ge is not None and v < self.ge) or (self.gt is not None and v <= self.gt)
                    or (self.le is not None and v > self.le) or (self.lt is not None and v >= self.lt))

    def describe(self, integer: bool) -> str:
        kind = "an integer" if integer else "a number"
        lo = (f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None)
        hi = (f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None)
        if lo and hi:
            text = f"{kind} in {lo}, {hi}"
        elif lo:
            text = f"{kind} {'>=' if self.ge is not None else '>'} {lo[1:]}"
        else:
            text = f"{kind} {'<=' if self.le is not None else '<'} {hi[:-1]}"
        return text + (f", or {self.note}" if self.note else "")


def bounded(default: Any, *, ge=None, gt=None, le=None, lt=None, also: tuple = (), note: str = ""):
    """A numeric field with a range (checked by `check_fields`); None passes where the type is Optional."""
    return field(default=default, metadata={"bounds": Bounds(ge, gt, le, lt, tuple(also), note)})


def check_fields(node: Any, prefix: str = "") -> None:
    """Every `choice` and `bounded` field of a (nested) dataclass, with the key in the error."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_fields(value, key + ".")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            allowed = ", ".join(map(str, f.metadata["choices"]))
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {allowed}")
        elif "bounds" in f.metadata and value is not None and not f.metadata["bounds"].allows(value):
            integer = isinstance(value, int) and not isinstance(value, bool)
            allowed = f.metadata["bounds"].describe(integer)
            raise ConfigError(f"{key}={value!r} is out of range; allowed: {allowed}")


@dataclass
class ModelConfig:
    name: str = "llama_tiny"  # a registered family (trainer/models), optionally _<size>
    vocab_size: int = bounded(2048, ge=1)
    dim: int = bounded(128, ge=1)
    n_layers: int = bounded(4, ge=1)
    n_heads: int = bounded(4, ge=1)
    n_kv_heads: int = bounded(2, ge=1)
    ffn_dim: int = bounded(352, ge=1)
    max_seq_len: int = bounded(256, ge=1)
    norm_eps: float = bounded(1e-5, gt=0)
    rope_theta: float = bounded(10000.0, gt=0)
    init_std: float = bounded(0.02, gt=0)
    tie_embeddings: bool = False


@dataclass
class DataConfig:
    # "stdlib" = the Python standard library's own source (ships with every Python; no download),
    # or a local .txt/.jsonl/.json/.parquet file or a directory of them.
    source: str = "stdlib"
    text_field: str = "text"
    streaming: bool = False  # stream a large local corpus instead of tokenizing it up front
    seq_len: int = bounded(128, ge=1)
    # "train": byte-level BPE trained on the corpus and cached; or a path to a tokenizer.json
    tokenizer: str = "train"
    tokenizer_train_bytes: int = bounded(4_000_000, ge=1)
    max_tokens: int = bounded(0, ge=0, note="0 for the whole corpus")  # cap the tokens read (fast demos, tests)
    val_fraction: float = bounded(0.02, ge=0, lt=1)
    cache_dir: str = ""  # "" = $PLAIT_CACHE, else ~/.cache/plait


@dataclass
class OptimConfig:
    name: str = choice("adamw")
    lr: float = bounded(3e-3, gt=0)
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)
    weight_decay: float = bounded(0.1, ge=0)
    beta1: float = bounded(0.9, ge=0, lt=1)
    beta2: float = bounded(0.95, ge=0, lt=1)
    eps: float = bounded(1e-8, gt=0)
    warmup_steps: int = bounded(20, ge=0)
    schedule: str = choice("cosine", "linear", "constant")
    grad_clip: float = bounded(1.0, ge=0)  # global L2 norm; 0 disables clipping


@dataclass
class ParallelConfig:
    dp_replicate: int = bounded(1, ge=1)
    # -1: whatever the world size leaves after the other dimensions
    dp_shard: int = bounded(1, ge=1, also=(-1,), note="-1 to fill the world size")
    tp: int = bounded(1, ge=1)
    pp: int = bounded(1, ge=1)
    virtual_stages: int = bounded(1, ge=1)
    # per pipeline step, per rank; -1: pp (the fewest that keep every 1F1B stage busy)
    microbatches: int = bounded(-1, ge=1, also=(-1,), note="-1 for pp")
    schedule: str = choice("1f1b", "gpipe", "interleaved_1f1b")
    sequence_parallel: bool = False  # with tp > 1: norms on sequence shards (less activation memory)
    dp_backend: str = choice("fsdp", "ddp", "deepspeed")
    # dp_backend=deepspeed: what ZeRO partitions over the data-parallel ranks: 1 optimizer state,
    # 2 + gradients, 3 + parameters (one data-parallel rank: the plain loop, as with fsdp/ddp)
    zero_stage: int = choice(1, 2, 3)
    activation_checkpoint: str = choice("none", "full", "selective")


@dataclass
class TrainerConfig:
    max_steps: int = bounded(1000, ge=0)  # optimizer steps
    batch_size: int = bounded(16, ge=1)  # global batch: sequences per optimizer step, over all data-parallel ranks
    grad_accum: int = bounded(1, ge=1)
    precision: str = choice("fp32", "bf16")
    log_every: int = bounded(10, ge=1)
    eval_every: int = bounded(250, ge=0, note="0 for only at the end")
    eval_batches: int = bounded(4, ge=1)
    sample_prompt: str = "def "
    sample_tokens: int = bounded(48, ge=0)
    # per device, FLOP/s; 0 = the GPU's datasheet bf16 peak if Plait knows the GPU (else MFU is
    # not reported), a measured fp32 matmul peak on CPU
    peak_flops: float = bounded(0.0, ge=0)


@dataclass
class CheckpointConfig:
    dir: str = "${run_dir}/checkpoints"
    every: int = bounded(250, ge=0, note="0 for only the final one")  # steps between saves
    keep_last: int = bounded(3, ge=0, note="0 to keep all")
    # none | latest | auto (latest if any) | a step directory | a run's checkpoints directory
    resume: str = "none"
    save_final: bool = True
    async_save: bool = False  # write in a background thread while training goes on
    init_from: str = ""  # a checkpoint whose model weights start this run (optimizer, data: fresh)


@dataclass
class LauncherConfig:
    name: str = choice("local", "slurm")
    nodes: int = bounded(1, ge=1)
    tasks_per_node: int = bounded(0, ge=0, note="0 for world size / nodes")
    gpus_per_node: int = bounded(0, ge=0)
    cpus_per_task: int = bounded(1, ge=1)
    mem_gb: int = bounded(0, ge=0, note="0 for the partition's default")
    timeout_min: int = bounded(60, ge=1)
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
    # the runner (`_target_`), its `name` and its options: a dict as composed, the family's typed
    # options (a trainer.task.TaskOptions) once validated
    task: Any = field(default_factory=default_task)
    # LM-training sections: read by the families that declare them (trainer.task.TaskFamily.reads)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # every task's
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    name: str = "${task.name}-${model.name}"
    run_dir: str = "runs/${name}"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")  # what `device=` may say (trainer/launch/distributed.py picks it)
DEVICES = "auto, cpu, cuda, cuda:N"


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


def check_combinations(cfg: PlaitConfig, world_size: Optional[int] = None,
                       seq_len: Optional[tuple[str, int]] = None) -> int:
    """The cross-field rules of language-model training on a parallel layout (model, parallel and
    trainer sections; run by the families that train an LM: pretrain, sft, and plait-plan for every
    layout it prints); fills parallel.dp_shard=-1 and parallel.microbatches=-1; returns the world
    size the run needs. `seq_len`: (key, value) of the training sequence length, default data.seq_len."""
    seq_key, seq_value = seq_len or ("data.seq_len", cfg.data.seq_len)
    for section in ("model", "parallel", "trainer"):
        check_fields(getattr(cfg, section), section + ".")
    if cfg.parallel.microbatches == -1:
        cfg.parallel.microbatches = cfg.parallel.pp
    p, m, t = cfg.parallel, cfg.model, cfg.trainer
    world = resolve_parallel(p, world_size)
    if m.dim % m.n_heads:
        raise ConfigError(f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}")
    for key, value in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads),
                       ("model.ffn_dim", m.ffn_dim), ("model.vocab_size", m.vocab_size)):
        if value % p.tp:
            raise ConfigError(f"{key}={value} is not divisible by parallel.tp={p.tp}")
    if seq_value > m.max_seq_len:
        raise ConfigError(f"{seq_key}={seq_value} exceeds model.max_seq_len={m.max_seq_len}")
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
        for key, value in ((seq_key, seq_value), ("model.max_seq_len", m.max_seq_len)):
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
    return world


def check_data(d: DataConfig) -> None:
    """The corpus and tokenizer a text-training task reads exist."""
    src = d.source
    if not src:
        raise ConfigError("data.source is not set; allowed: stdlib, or a local .txt/.jsonl/.json/.parquet "
                          "file or a directory of them (data=local data.source=PATH)")
    if src != "stdlib" and not os.path.exists(os.path.expanduser(src)):
        raise ConfigError(
            f"data.source={src!r}: no such file or directory; allowed: stdlib, or a local "
            ".txt/.jsonl/.json/.parquet file or a directory of them"
        )
    tok = d.tokenizer
    if tok != "train" and not os.path.isfile(os.path.expanduser(tok)):
        raise ConfigError(f"data.tokenizer={tok!r}: no such file; allowed: train, or a path to tokenizer.json")


def check_core(cfg: PlaitConfig) -> None:
    """Rules on what every task reads: device, checkpoint paths, launcher, logger."""
    if not DEVICE.fullmatch(cfg.device):
        raise ConfigError(f"device={cfg.device!r} is not allowed; allowed: {DEVICES}")
    resume = cfg.checkpoint.resume
    if resume not in ("none", "latest", "auto") and not os.path.isdir(resume):
        raise ConfigError(
            f"checkpoint.resume={resume!r}: no such checkpoint directory; allowed: none, latest, auto, "
            "a step directory, or a run's checkpoints directory"
        )
    init = cfg.checkpoint.init_from
    if init and not os.path.isdir(init):
        raise ConfigError(f"checkpoint.init_from={init!r}: no such checkpoint directory")


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
    """Merge a composed config onto the core schema: unknown keys and wrong types become
    ConfigError. `task` stays a plain dict here (its family's options type it: `validate`)."""
    raw = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    unknown = sorted(set(raw.keys()) - SECTIONS)
    if unknown:
        moved = [f"{k} (now {MOVED[k]})" for k in unknown if k in MOVED]
        raise ConfigError(
            f"unknown top-level key(s) {', '.join(moved or unknown)}; allowed: {', '.join(sorted(SECTIONS))}"
        )
    missing = sorted(OmegaConf.missing_keys(raw))
    if missing:
        raise ConfigError(f"{', '.join(missing)}: required but not set (???); set it on the command line, "
                          f"e.g. {missing[0]}=...")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PlaitConfig), raw)
        OmegaConf.resolve(merged)
        task = OmegaConf.to_container(merged.task, resolve=True)
        merged.task = {}
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        msg = str(err).split("\n")[0]
        if isinstance(err, ConfigKeyError) and "." in key:
            allowed = _fields_at(key.rsplit(".", 1)[0])
            if allowed:
                msg = f"unknown key; allowed: {', '.join(allowed)}"
                hint = MOVED.get(key)
                msg += f" ({key} is now {hint})" if hint else ""
        raise ConfigError(f"{key}: {msg}" if key else msg) from None
    if not isinstance(task, dict):
        raise ConfigError(f"task must be a mapping with _target_ and name, got {task!r}")
    for key in ("_target_", "name"):
        if not isinstance(task.get(key), str) or not task[key]:
            raise ConfigError(f"task.{key} is missing; a task config names its runner as "
                              "task._target_ (module.function) and task.name")
    obj.task = task
    return obj


# Keys that moved into a task family's options: the old spelling gets an error naming the new one.
MOVED = {"env": "task.env", "trainer.total_steps": "task.total_steps"}


def validate_run(cfg: DictConfig | dict, world_size: Optional[int] = None) -> tuple[PlaitConfig, int]:
    """Everything the CLI checks before a rank starts: the core schema, the task's typed options,
    every field's choices and range, settings the task does not read, the core rules, and the
    family's own checks. `world_size` is the launcher's if one started this process. Returns the
    typed config and the world size the run needs."""
    from trainer.task import family_of, resolve_target, task_options, unread_settings

    typed = to_schema(cfg)
    if world_size is None:
        from trainer.launch.distributed import launcher_world_size

        world_size = launcher_world_size()
    family = family_of(typed.task["_target_"])
    resolve_target(typed.task["_target_"])
    typed.task = task_options(family, typed.task)
    check_fields(typed)  # every section's choices and ranges, task.* included
    unread = unread_settings(typed, family, PlaitConfig())
    if unread:
        reads = ", ".join(family.reads) or "none of model, data, optim, parallel, trainer"
        shown = ", ".join(unread[:6]) + (f" (and {len(unread) - 6} more)" if len(unread) > 6 else "")
        raise ConfigError(f"{shown}: not used by task={typed.task.name} (it reads {reads}); "
                          "remove the setting, or choose a task that uses it")
    check_core(typed)
    return typed, family.check(typed, world_size)


def validate(cfg: DictConfig | dict, world_size: Optional[int] = None) -> PlaitConfig:
    """`validate_run` without the world size."""
    return validate_run(cfg, world_size)[0]


def register_schema() -> None:
    """Make the schema Hydra's base config (`plait_schema`) and each task family's options
    `task_options/<family>`: the YAML tree then only states what differs from these defaults, and
    Hydra type-checks every override as it composes."""
    from hydra.core.config_store import ConfigStore

    from trainer.task import register_options

    ConfigStore.instance().store(name="plait_schema", node=PlaitConfig)
    register_options()


def as_dict(cfg: PlaitConfig) -> dict:
    """The resolved config as plain containers (saved in the run directory and manifests)."""
    return dataclasses.asdict(cfg)
