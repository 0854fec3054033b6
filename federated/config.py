"""Options of `task=federated` (FedPipe-style federated LoRA on Flower): one typed dataclass holding
every default once (trainer/task.py's contract), stored in Hydra's ConfigStore as
`task_options/federated`; configs/task/federated.yaml states only what differs.

Units: `local_steps` counts optimizer steps per client per round; a client's batch (`batch_size`, or
the planner's choice) counts samples (sequences) per step on that client; times are seconds, memory
MiB, bandwidth Mbit/s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.config import bounded, choice
from trainer.task import TaskOptions


@dataclass
class ClientProfile:
    """What one client (a private edge server) has: the planner's budgets and cost model."""

    memory_mib: float = bounded(1024.0, gt=0)  # for the base at its bits + adapters + optimizer + activations
    speed: float = bounded(1.0, gt=0)  # relative compute speed (1 = this machine's measured rate)
    bandwidth_mbps: float = bounded(100.0, gt=0)  # up and down, Mbit/s
    time_budget_s: float = bounded(0.0, ge=0, note="0 for no round-time budget")  # modelled round time


@dataclass
class FederatedConfig(TaskOptions):
    # how the rounds travel: simulation = flwr.simulation.run_simulation (Ray); deploy = a SuperLink
    # and SuperNodes (`flower-superlink`, `flower-supernode`, `flwr run`); local = the same server loop
    # and clients in this process, no Flower (debugging, unit tests, benchmarks)
    mode: str = choice("simulation", "deploy", "local")
    # the network every client fine-tunes, built from model.* and the seed: a Plait Llama, or the same
    # weights as a Hugging Face LlamaForCausalLM (target modules may be named either way: wq or q_proj)
    base: str = choice("plait", "hf")
    # FedPipe fine-tunes a pretrained model: this many AdamW steps first train the seed-built base
    # centrally on other topics (keywords disjoint from the task's; federated/pretrain.py), cached on
    # disk; 0 = the seed's initialisation (on which importance misranks the modules: docs/federated.md)
    base_pretrain_steps: int = bounded(1000, ge=0)
    num_clients: int = bounded(4, ge=1)
    rounds: int = bounded(5, ge=1)
    strategy: str = "svd"  # federated/aggregation.py STRATEGIES: fedit | ffa | flora | svd | hetlora | fedex
    # data: the keyword-topic task of federated/data.py, partitioned with flwr-datasets
    num_classes: int = bounded(4, ge=2)
    seq_len: int = bounded(16, ge=4)
    train_samples: int = bounded(2048, ge=1)  # over all clients
    test_samples: int = bounded(512, ge=1)  # the server's held-out set (accuracy per round)
    keyword_prob: float = bounded(0.3, gt=0, le=1)  # fraction of a sequence's tokens from its class's keywords
    partitioner: str = choice("dirichlet", "iid", "linear", "size")  # size: task.partition_sizes
    alpha: float = bounded(1.0, gt=0)  # Dirichlet concentration of the label skew
    partition_sizes: list[int] = field(default_factory=list)  # partitioner=size: samples per client
    # local training (every client: AdamW on its adapters only, state kept across rounds)
    local_steps: int = bounded(10, ge=1)
    lr: float = bounded(1e-2, gt=0)
    weight_decay: float = bounded(0.0, ge=0)
    lora_alpha_ratio: float = bounded(2.0, gt=0)  # peft lora_alpha = ratio · r, so s = α/r = ratio
    # the plan: planner=milp chooses modules, per-client ranks, batch and bits (federated/planner.py);
    # uniform gives every client task.rank on task.target_modules at task.batch_size and task.bits
    planner: str = choice("milp", "uniform")
    target_modules: list[str] = field(default_factory=lambda: ["wq", "wv"])  # uniform: name suffixes
    rank: int = bounded(4, ge=1)
    client_ranks: list[int] = field(default_factory=list)  # uniform: client k's rank (HetLoRA-style); [] = task.rank
    batch_size: int = bounded(16, ge=1)
    bits: int = choice(8, 4, 32)  # base weights: 8 = quanto qint8, 4 = qint4, 32 = not quantized
    rank_choices: list[int] = field(default_factory=lambda: [2, 4, 8])
    batch_choices: list[int] = field(default_factory=lambda: [8, 16])
    bits_choices: list[int] = field(default_factory=lambda: [4, 8, 32])
    max_modules: int = bounded(8, ge=1)  # plan_modules=importance: modules the planner may adapt
    # which modules the MILP adapts: up to max_modules chosen by importance (FedPipe's selection), or
    # exactly task.target_modules (it plans ranks, batch and bits per client, importance weighting
    # each module's rank); task.planner=uniform always uses task.target_modules
    plan_modules: str = choice("importance", "target")
    calibration_samples: int = bounded(64, ge=1)  # importance Σ|w·∂L/∂w| from this many samples
    balance_weight: float = bounded(0.1, ge=0)  # λ of −λ·T_max in the objective (round-time balance)
    clients: list[ClientProfile] = field(default_factory=list)  # one per client, or none for defaults
    # faults: a client that raises, disconnects or misses the timeout is dropped from the round
    round_timeout_s: float = bounded(120.0, gt=0)
    min_clients: int = bounded(1, ge=1)  # replies a round needs to proceed; fewer stops the run
    # fault injection (for testing the above): items "<raise|exit|hang>:<client>:<round>"
    faults: list[str] = field(default_factory=list)
    # differential privacy on each update (federated/privacy.py); ε reported with dp-accounting
    dp: bool = False
    dp_clip_norm: float = bounded(1.0, gt=0)
    dp_noise_multiplier: float = bounded(1.0, ge=0)
    dp_delta: float = bounded(1e-5, gt=0, lt=1)
    # deploy: Flower's SuperLink (its HTTP runtime API, host:port); spawn_local starts it and
    # num_clients SuperNodes on this machine (SuperNode k serves its ClientApps on supernode_port + k)
    spawn_local: bool = True
    superlink: str = "127.0.0.1:9093"
    supernode_port: int = bounded(9094, ge=1, le=65000)
    # plumbing
    sim_cpus_per_client: float = bounded(1.0, gt=0)  # Ray resources per simulated client
    plots: bool = True  # accuracy per round and the plan, as PNGs in the run directory
    threads: int = bounded(1, ge=1)  # torch threads per process (tiny models: one is fastest)
