"""Flower at the edge: the `ClientApp` and `ServerApp` of `task=federated` on Flower's Message API
(flwr 1.42), and the transport that carries Plait's requests and replies as Messages.

Each client gets its own Message (its adapters at its own ranks: heterogeneous shapes are fine);
the server loop is Plait's (federated/run.py `serve`), so it owns the round counter and resumes.
A client's partition comes from its node config (`partition-id`), which a first `query` message
maps to Flower's node ids. Everything else a client needs travels in each train message.
"""

from __future__ import annotations

import json
import time
import traceback
from typing import Union

import torch  # noqa: F401 - ArrayRecord converts torch tensors only once torch is imported

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from federated.client import Plan, Reply, Request
from federated.lora import Adapters, LoraPair

QUERY = "query"
TRAIN = "train"


# ---------------------------------------------------------------- encoding


def adapters_record(adapters: Adapters) -> ArrayRecord:
    return ArrayRecord({f"{m}.{f}": getattr(p, f).contiguous() for m, p in sorted(adapters.items()) for f in "AB"})


def adapters_of(record: ArrayRecord, scales: dict[str, float]) -> Adapters:
    sd = record.to_torch_state_dict()
    return {m: LoraPair(sd[f"{m}.A"], sd[f"{m}.B"], scales[m]) for m in sorted(scales)}


def encode_request(req: Request, spec: str) -> RecordDict:
    base = ArrayRecord({f"{m}.dense": t.contiguous() for m, t in (req.base_dense or {}).items()}) \
        if req.base_dense is not None else adapters_record(req.base_factors)
    config = ConfigRecord({
        "client": req.client, "round": req.round, "accepted": req.accepted, "plan": json.dumps(req.plan.to_json()),
        "freeze_A": req.freeze_A, "state_dir": req.state_dir, "spec": spec,
        "scales": json.dumps({m: p.scale for m, p in req.adapters.items()}),
        "base": "dense" if req.base_dense is not None else "factors",
        "base_modules": json.dumps(sorted(req.base_dense or req.base_factors)),
    })
    return RecordDict({"adapters": adapters_record(req.adapters), "base": base, "config": config})


def decode_request(content: RecordDict) -> tuple[Request, str]:
    cfg = content["config"]
    scales = json.loads(cfg["scales"])
    mods = json.loads(cfg["base_modules"])
    base_sd = content["base"].to_torch_state_dict() if mods else {}
    dense = {m: base_sd[f"{m}.dense"] for m in mods} if cfg["base"] == "dense" else None
    factors = {} if dense is not None else {m: LoraPair(base_sd[f"{m}.A"], base_sd[f"{m}.B"], 1.0) for m in mods}
    req = Request(client=int(cfg["client"]), round=int(cfg["round"]), accepted=int(cfg["accepted"]),
                  adapters=adapters_of(content["adapters"], scales), base_factors=factors, base_dense=dense,
                  plan=Plan.from_json(json.loads(cfg["plan"])), freeze_A=bool(cfg["freeze_A"]),
                  state_dir=str(cfg["state_dir"]))
    return req, str(cfg["spec"])


def encode_reply(reply: Reply) -> RecordDict:
    metrics = MetricRecord({k: float(v) for k, v in reply.metrics.items()})
    config = ConfigRecord({"client": reply.client, "round": reply.round, "num_samples": reply.num_samples,
                           "scales": json.dumps({m: p.scale for m, p in reply.adapters.items()})})
    return RecordDict({"adapters": adapters_record(reply.adapters), "metrics": metrics, "config": config})


def decode_reply(content: RecordDict) -> Union[Reply, str]:
    cfg = content["config"]
    if "error" in cfg:
        return str(cfg["error"])
    adapters = adapters_of(content["adapters"], json.loads(cfg["scales"]))
    return Reply(int(cfg["client"]), int(cfg["round"]), adapters, int(cfg["num_samples"]),
                 dict(content["metrics"]))


# ---------------------------------------------------------------- the ClientApp

client_app = ClientApp()


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    """Which partition this node holds (its node config's partition-id)."""
    pid = int(context.node_config.get("partition-id", -1))
    return Message(RecordDict({"config": ConfigRecord({"partition-id": pid})}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of federated/client.py's `train_round`; a failure comes back as an error record."""
    from federated.client import train_round

    try:
        req, spec = decode_request(msg.content)
        c, model_cfg, seed = spec_of(spec)
        torch.set_num_threads(c.threads)
        pid = int(context.node_config.get("partition-id", req.client))
        if pid != req.client:
            raise RuntimeError(f"node holds partition {pid} but was sent client {req.client}'s request")
        return Message(encode_reply(train_round(req, c, model_cfg, seed)), reply_to=msg)
    except Exception as err:  # noqa: BLE001 - reported to the server, which drops this client from the round
        last = traceback.format_exc().strip().splitlines()[-3:]
        reason = f"raised {type(err).__name__}: {err} ({' | '.join(s.strip() for s in last)})"
        return Message(RecordDict({"config": ConfigRecord({"error": reason})}), reply_to=msg)


def spec_of(spec: str):
    """(FederatedConfig, ModelConfig, seed) from the JSON every train message carries."""
    from federated.config import ClientProfile, FederatedConfig
    from trainer.config import ModelConfig

    d = json.loads(spec)
    task = dict(d["task"])
    task["clients"] = [ClientProfile(**p) for p in task.get("clients", [])]
    return FederatedConfig(**task), ModelConfig(**d["model"]), int(d["seed"])


# ---------------------------------------------------------------- the transport


class FlowerTransport:
    """Plait's requests as one Message per node through a Flower `Grid`, with Plait's own timeouts."""

    def __init__(self, grid: Grid, num_clients: int, spec: str, wait_s: float, log=print):
        self.grid, self.spec, self.log = grid, spec, log
        self.nodes = self._map_nodes(num_clients, wait_s)

    def _map_nodes(self, num_clients: int, wait_s: float) -> dict[int, int]:
        """{client index (partition-id): node id}, waiting up to `wait_s` for every node to connect."""
        deadline = time.monotonic() + wait_s
        found: dict[int, int] = {}
        while True:
            ids = sorted(self.grid.get_node_ids())
            asked = [i for i in ids if i not in found.values()]
            if asked:
                msgs = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=i, message_type=QUERY)
                        for i in asked]
                for r in self.grid.send_and_receive(msgs, timeout=max(1.0, deadline - time.monotonic())):
                    if not r.has_error():
                        found[int(r.content["config"]["partition-id"])] = r.metadata.src_node_id
            if all(k in found for k in range(num_clients)):
                return {k: found[k] for k in range(num_clients)}
            if time.monotonic() > deadline:
                missing = [k for k in range(num_clients) if k not in found]
                raise TimeoutError(f"after {wait_s:.0f} s, no Flower node holds partition(s) {missing} "
                                   f"({len(ids)} node(s) connected); start SuperNodes with --node-config "
                                   f"'partition-id=N num-partitions={num_clients}'")
            time.sleep(0.2)

    def __call__(self, requests: list[Request], timeout_s: float) -> dict[int, Union[Reply, str]]:
        msgs = []
        for req in requests:
            msgs.append(Message(encode_request(req, self.spec), dst_node_id=self.nodes[req.client],
                                message_type=TRAIN, group_id=str(req.round)))
        by_node = {n: k for k, n in self.nodes.items()}
        out: dict[int, Union[Reply, str]] = {}
        for r in self.grid.send_and_receive(msgs, timeout=timeout_s):
            k = by_node.get(r.metadata.src_node_id)
            if k is None:
                continue
            if r.has_error():
                out[k] = f"Flower error {r.error.code}: {r.error.reason.splitlines()[0][:300]}"
            else:
                out[k] = decode_reply(r.content)
        for req in requests:
            out.setdefault(req.client, f"no reply within task.round_timeout_s={timeout_s:g} s")
        return out


# ---------------------------------------------------------------- the ServerApps


def simulation_server(cfg, result: dict) -> ServerApp:
    """A ServerApp that runs Plait's loop on `cfg` (a PlaitConfig) in this process (run_simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from federated.run import serve

        try:
            result.update(serve(cfg, lambda spec, log: FlowerTransport(grid, cfg.task.num_clients, spec,
                                                                       wait_s=120, log=log)))
        except BaseException as err:  # run_simulation only logs a ServerApp's exception: hand it back
            result["error"] = err
            raise

    return app


server_app = ServerApp()


@server_app.main()
def deployed_main(grid: Grid, context: Context) -> None:
    """`flwr run`: the Plait config comes as a JSON file named by the run config `plait-config`."""
    from federated.run import serve
    from trainer.config import validate

    path = str(context.run_config["plait-config"])
    with open(path) as f:
        cfg = validate(json.load(f))
    summary = serve(cfg, lambda spec, log: FlowerTransport(grid, cfg.task.num_clients, spec, wait_s=120, log=log))
    with open(path.replace(".json", ".summary.json"), "w") as f:  # read by federated/deploy.py
        json.dump(summary, f)
