"""Continual learners and stream-based active learning (issue 13): Plait's learners against their
baselines, side by side in one run, through the task runners `plait task=continual|active` use.
Prints one JSON line.

(1) The DKVB paper's 2-D toy (8 Gaussian classes, 4 tasks × 2): `dkvb_toy_acc` (the bottleneck on
    the raw 2-D input, C = 16 codebooks × 64 keys on random 2-D projections, keys fitted on uniform
    points) and `mlp_toy_acc` (an MLP 2-32-8 fine-tuned with Adam) after the same 1,000 epochs per
    task. Goal: ≥ 0.93 and ≤ 0.30.
(2) Split-Digits (5 × 2 classes): the bottleneck with the defaults of continual/config.py
    (`split_digits_acc`, `split_digits_forgetting`: Chaudhry's), against naive fine-tuning, reservoir
    replay (200 samples) and EWC, all 20 epochs per experience. Goal: ≥ 0.80, fine-tuning ≈ 0.2.
(3) Phishing (river): every query strategy at budget 0.2 with online logistic regression, test-
    then-train; `al_acc` is variable uncertainty's prequential accuracy, `al_random_acc` random
    querying's, `al_labels_fraction` the labels variable uncertainty spent. Goal: ≥ 0.87, above random.
(4) Hawkes streams with recurring regimes (A B C A B C): PromptTPP against the same TPP fine-tuned
    period by period without prompts, same epochs and learning rate. `tpp_ll_gain` = next-period
    log-likelihood per event (trained on t, tested on t+1, mean over t) of PromptTPP minus the base's;
    `tpp_forgetting_gain` = the base's forgetting (Chaudhry's, on the LL matrix) minus PromptTPP's.
    Positive is better for both.
(5) Throughput, per CPU-second, alternating rounds: the bottleneck's training step (values by SGD,
    batch 32, 64 codebooks × 256 keys) against a straightforward reference of the same computation
    (a Python loop over codebooks); prequential active learning (Plait's test-then-train step) against
    the same stream through river's StandardScaler | LogisticRegression with the same strategy.
    `throughput_ratio` = the smaller of the two ratios (goal ≥ 1.0).

    .venv/bin/python bench/continual.py [--only toy,digits,al,tpp,speed] [--out runs/bench-continual]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and this file would shadow the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainer.config import validate  # noqa: E402
from trainer.launch.distributed import DistEnv, seed_everything  # noqa: E402

ONE = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
STRATEGY_NAMES = ("random", "fixed_uncertainty", "variable_uncertainty", "randomized_variable_uncertainty",
                  "selective_sampling", "split")


def run_task(out: Path, name: str, target: str, task: dict, seed: int = 0) -> dict:
    """One `plait task=...` run in process (checkpoints off), returning the runner's summary."""
    cfg = validate({"task": {"_target_": target, "name": name, **task}, "seed": seed,
                    "run_dir": str(out), "checkpoint": {"every": 0, "save_final": False},
                    "logger": {"progress": False}})
    seed_everything(cfg.seed)
    module = __import__(target.rsplit(".", 1)[0], fromlist=["run"])
    return module.run(cfg, ONE)


def continual(out: Path, tag: str, **task) -> dict:
    return run_task(out / tag, "continual", "continual.run.run", task)


def toy(out: Path) -> dict:
    dkvb = continual(out, "toy-dkvb", learner="kv_bottleneck", stream="gaussian_toy", encoder="identity",
                     num_codebooks=16, key_value_pairs_per_codebook=64, dim_keys=2, epochs=1000)
    mlp = continual(out, "toy-mlp", learner="finetune", stream="gaussian_toy", hidden=32, hidden_layers=1,
                    epochs=1000)
    return {"dkvb_toy_acc": dkvb["acc"], "mlp_toy_acc": mlp["acc"], "dkvb_toy_forgetting": dkvb["forgetting"],
            "mlp_toy_forgetting": mlp["forgetting"]}


def digits(out: Path) -> dict:
    res = {}
    for learner in ("kv_bottleneck", "finetune", "replay", "ewc"):
        r = continual(out, f"digits-{learner}", learner=learner, stream="split_digits")
        key = "split_digits" if learner == "kv_bottleneck" else f"split_digits_{learner}"
        res[f"{key}_acc"], res[f"{key}_forgetting"] = r["acc"], r["forgetting"]
    return res


def active(out: Path) -> dict:
    res, per, curves = {}, {}, {}
    for strategy in STRATEGY_NAMES:
        r = run_task(out / f"al-{strategy}", "active", "continual.run_active.run",
                     {"strategy": strategy, "budget": 0.2, "stream": "phishing"})
        per[strategy] = {"acc": r["accuracy"], "labels_fraction": r["labels_fraction"]}
        curves[strategy] = r["curve"]
    full = run_task(out / "al-all", "active", "continual.run_active.run",
                    {"strategy": "random", "budget": 1.0, "stream": "phishing"})
    curves["all labels"] = full["curve"]
    plot_curves(curves, out / "al_strategies.png")
    res.update(al_acc=per["variable_uncertainty"]["acc"], al_random_acc=per["random"]["acc"],
               al_labels_fraction=per["variable_uncertainty"]["labels_fraction"], al_all_labels_acc=full["accuracy"],
               al_strategies=per)
    return res


def plot_curves(curves: dict, path: Path, every: int = 100) -> None:
    """Prequential accuracy of every strategy on one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, ys in curves.items():
        ax.plot([(k + 1) * every for k in range(len(ys))], ys, label=name, ls="--" if name == "all labels" else "-")
    ax.set_xlabel("samples seen")
    ax.set_ylabel("prequential accuracy")
    ax.set_title("Phishing, budget 0.2: query strategies")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


TPP_SETTINGS = dict(stream="hawkes_regimes", epochs=40)  # the defaults otherwise (M = 10, N = 5, length 5)


def tpp(out: Path) -> dict:
    base = continual(out, "tpp-base", learner="tpp", **TPP_SETTINGS)
    prompt = continual(out, "tpp-prompt", learner="prompt_tpp", **TPP_SETTINGS)
    return {"tpp_ll_gain": prompt["next_ll"] - base["next_ll"],
            "tpp_forgetting_gain": base["forgetting"] - prompt["forgetting"],
            "tpp_next_ll": {"prompt_tpp": prompt["next_ll"], "tpp": base["next_ll"]},
            "tpp_forgetting": {"prompt_tpp": prompt["forgetting"], "tpp": base["forgetting"]},
            "tpp_mean_ll": {"prompt_tpp": prompt["acc"], "tpp": base["acc"]},
            "tpp_next_rmse": {"prompt_tpp": prompt["next_rmse"], "tpp": base["next_rmse"]},
            "tpp_next_type_error": {"prompt_tpp": prompt["next_type_error"], "tpp": base["next_type_error"]}}


# ---------------------------------------------------------------------------------------------
# (5) the straightforward references
# ---------------------------------------------------------------------------------------------


def reference_bottleneck_step(z, y, projection, keys, values, lr):
    """The bottleneck's forward and value update written plainly: one codebook at a time."""
    C = keys.shape[0]
    logits = torch.zeros(z.shape[0], values.shape[-1])
    picked = []
    for c in range(C):
        head = z @ projection[c]
        dist = ((head[:, None, :] - keys[c][None]) ** 2).sum(-1)
        idx = dist.argmin(1)
        picked.append(idx)
        logits = logits + values[c, idx] / C
    g = (torch.softmax(logits, 1) - F.one_hot(y, values.shape[-1])) / (C * z.shape[0])
    for c in range(C):
        values[c].index_add_(0, picked[c], -lr * g)


def cpu_rate(fn, n: int) -> float:
    start = time.process_time()
    fn()
    return n / max(time.process_time() - start, 1e-9)


def speed(rounds: int = 5) -> dict:
    from continual.active import STRATEGIES
    from continual.kv_bottleneck import KeyValueBottleneck
    from continual.metrics import PrequentialAccuracy
    from continual.online import ONLINE_LEARNERS, Predictions, prequential_step, running_standardise
    from continual.streams import build_stream, tensors
    from river import linear_model, optim, preprocessing

    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(32 * 40, 256, generator=g), torch.randint(10, (32 * 40,), generator=g)
    kvb = KeyValueBottleneck(256, 64, 256, 10, dim_keys=8, splitting="random_projection", seed=0)
    kvb.freeze_keys()
    opt = torch.optim.SGD([kvb.values], lr=0.3)
    ref_values = kvb.values.detach().clone()

    def plait_kvb():
        for b in range(40):
            loss = F.cross_entropy(kvb(z[b * 32:(b + 1) * 32]), y[b * 32:(b + 1) * 32])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def ref_kvb():
        for b in range(40):
            reference_bottleneck_step(z[b * 32:(b + 1) * 32], y[b * 32:(b + 1) * 32], kvb.projection, kvb.keys,
                                      ref_values, 0.3)

    stream = build_stream("phishing", 0)
    x, labels = tensors(stream.data)
    yl = labels.tolist()
    rows = [dict(enumerate(r)) for r in x.tolist()]

    def plait_al():  # what the task=active runner does per sample, the standardisation included
        z = running_standardise(x.double().numpy())
        learner = ONLINE_LEARNERS.get("logistic")(9, 2, 0.05, 0.0, 0)
        strategy, acc = STRATEGIES.get("variable_uncertainty")(budget=0.2, seed=0), PrequentialAccuracy()
        predictions = Predictions(learner, z)
        for i in range(len(yl)):
            prequential_step(learner, predictions, strategy, acc, i, yl[i])

    def ref_al():
        model = preprocessing.StandardScaler() | linear_model.LogisticRegression(optimizer=optim.SGD(0.05))
        strategy = STRATEGIES.get("variable_uncertainty")(budget=0.2, seed=0)
        correct = 0
        for r, label in zip(rows, yl):
            model["StandardScaler"].learn_one(r)  # inputs are free, as on Plait's side
            p = model.predict_proba_one(r)
            p1 = p.get(True, p.get(1, 0.0))
            correct += (p1 > 0.5) == bool(label)
            if strategy.query([1 - p1, p1]):
                model["LogisticRegression"].learn_one(model["StandardScaler"].transform_one(r), bool(label))

    rates = {"kvb": [[], []], "al": [[], []]}
    for _ in range(rounds):
        rates["kvb"][0].append(cpu_rate(plait_kvb, len(y)))
        rates["kvb"][1].append(cpu_rate(ref_kvb, len(y)))
        rates["al"][0].append(cpu_rate(plait_al, len(yl)))
        rates["al"][1].append(cpu_rate(ref_al, len(yl)))
    med = {k: [sorted(v)[len(v) // 2] for v in pair] for k, pair in rates.items()}
    ratios = {k: m[0] / m[1] for k, m in med.items()}
    return {"throughput_ratio": min(ratios.values()), "throughput": {
        "kvb_samples_per_s": med["kvb"][0], "kvb_reference_samples_per_s": med["kvb"][1], "kvb_ratio": ratios["kvb"],
        "al_samples_per_s": med["al"][0], "al_reference_samples_per_s": med["al"][1], "al_ratio": ratios["al"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="toy,digits,al,tpp,speed")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    parts = {"toy": toy, "digits": digits, "al": active, "tpp": tpp, "speed": speed}
    chosen = args.only.split(",")
    start = time.time()
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        for name in chosen:
            t = time.time()
            result.update(parts[name]() if name == "speed" else parts[name](out))
            result[f"seconds_{name}"] = round(time.time() - t, 1)
    result["seconds"] = round(time.time() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
