"""`plait-ckpt`: inspect, verify, export to Hugging Face, import from Hugging Face.

    plait-ckpt inspect DIR             manifest, sizes, layout, components (DIR: a step or a run's checkpoints)
    plait-ckpt verify DIR              file sizes and checksums
    plait-ckpt export DIR --to hf OUT  safetensors + config.json that LlamaForCausalLM.from_pretrained loads
                                       (a multi-role step: the role holding a model, or --role)
    plait-ckpt import-hf HF_DIR OUT    a Plait checkpoint (model component) from a Hugging Face directory

Exit status: 0 fine, 2 bad input (missing, damaged or unsupported checkpoint, bad arguments).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from trainer.checkpoint import (MANIFEST, Checkpointer, CheckpointError, find_step, read_manifest, role_root,
                                roles_of, tensor_shapes, verify)

from trainer.checkpoint.state import TensorDict
from trainer.errors import EXIT_BAD_INPUT


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


def cmd_inspect(args) -> int:
    root = Path(args.dir)
    if not (root / MANIFEST).exists() and root.is_dir():
        ck = Checkpointer(str(root))
        steps = ck.list()
        latest = ck.latest()
        print(f"{root}: {len(steps)} checkpoint(s); latest: {latest.name if latest else '-'}")
        for s in steps:
            m = read_manifest(s)
            total = sum(f["size"] for f in m["files"].values())
            print(f"  {s.name}  step {m['counters']['step']:>8}  {_size(total):>9}  {m['created']}")
        if latest is None:
            return EXIT_BAD_INPUT
        root = latest
    m = read_manifest(root)
    total = sum(f["size"] for f in m["files"].values())
    by_component: dict[str, list[int]] = {}  # name (role/name in a multi-role step) -> [tensors, elements]
    for role in roles_of(m) or [None]:
        prefix = "" if role is None else f"{role}/"
        for key, shape in tensor_shapes(role_root(root, m, role)[0]).items():
            n = 1
            for d in shape:
                n *= d
            entry = by_component.setdefault(prefix + key.split(".", 1)[0], [0, 0])
            entry[0] += 1
            entry[1] += n
    print(f"checkpoint  {root}")
    print(f"format      plait v{m['format_version']}, task {m.get('task', '?')}, created {m['created']}")
    print("counters    " + ", ".join(f"{k} {v}" for k, v in m["counters"].items()))
    if "layout" in m:
        print(f"layout      world size {m.get('world_size')}: " + " x ".join(f"{k}={v}" for k, v in m["layout"].items()))
    for role, info in m.get("roles", {}).items():
        print(f"role        {role}: world size {info['world_size']}, components {', '.join(info['components'])}")
    print(f"size        {_size(total)} in {len(m['files'])} files")
    print("components")
    for name in m["components"]:
        tensors, numel = by_component.get(name, (0, 0))
        print(f"  {name:<14} {tensors:>5} tensors  {numel:>14,} elements")
    print("versions    " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()))
    if args.json:
        print(json.dumps(m, indent=2))
    return 0


def cmd_verify(args) -> int:
    path = find_step(args.dir)
    problems = verify(path)
    if problems:
        print(f"{path}: DAMAGED", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return EXIT_BAD_INPUT
    n = len(read_manifest(path)["files"])
    print(f"{path}: OK ({n} files, sizes and checksums match)")
    return 0


def model_config_of(manifest: dict):
    from trainer.config import ModelConfig

    model = manifest.get("config", {}).get("model")
    if not model:
        raise CheckpointError("the manifest holds no model config; was it written by a task with a model?")
    return ModelConfig(**model)


def model_role(manifest: dict, role: str | None) -> str | None:
    """The role whose `model` to read: `role`, or in a multi-role step the only one holding a model."""
    if role is not None or not roles_of(manifest):
        return role
    with_model = [r for r, info in manifest["roles"].items() if "model" in info["components"]]
    if len(with_model) != 1:
        raise CheckpointError(f"roles {', '.join(with_model) or '(none)'} hold a model component; pick one with "
                              f"--role (roles: {', '.join(roles_of(manifest))})")
    return with_model[0]


def load_model_tensors(path: Path, role: str | None = None) -> dict[str, torch.Tensor]:
    """The model component as full tensors, read in this process whatever layout saved it."""
    role = model_role(read_manifest(path), role)
    shapes = tensor_shapes(role_root(path, read_manifest(path), role)[0])
    keys = [k for k in shapes if k.startswith("model.")]
    if not keys:
        raise CheckpointError(f"{path}: has no model component")
    tensors = {k[len("model."):]: torch.empty(shapes[k]) for k in keys}
    Checkpointer(str(path.parent)).load(path, {"model": TensorDict(tensors)}, role=role)
    return tensors


def cmd_export(args) -> int:
    from safetensors.torch import save_file

    from trainer.models.hf import to_hf_config, to_hf_state_dict

    if args.to != "hf":
        raise CheckpointError(f"--to {args.to}: unknown target; allowed: hf")
    path = find_step(args.dir)
    manifest = read_manifest(path)
    role = model_role(manifest, args.role)
    cfg = model_config_of(manifest if role is None else {**manifest, **manifest["roles"][role]["meta"]})
    tensors = load_model_tensors(path, role)
    hf_sd = to_hf_state_dict(tensors)
    if cfg.tie_embeddings:
        hf_sd.pop("lm_head.weight", None)  # safetensors stores no shared tensors; HF re-ties it
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt", "plait_checkpoint": str(path)})
    to_hf_config(cfg).to_json_file(str(tmp / "config.json"))
    tokenizer = path.parent.parent / "tokenizer.json"  # written by the run next to its checkpoints
    if tokenizer.exists():
        shutil.copy(tokenizer, tmp / "tokenizer.json")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    n = sum(t.numel() for t in hf_sd.values())
    print(f"exported {path.name} ({n:,} parameters) to {out}: model.safetensors, config.json"
          f"{', tokenizer.json' if tokenizer.exists() else ''}")
    print(f"load it with: transformers.LlamaForCausalLM.from_pretrained({str(out)!r})")
    return 0


def cmd_import(args) -> int:
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    from trainer.config import PlaitConfig, as_dict
    from trainer.models.hf import from_hf_config, from_hf_state_dict

    src = Path(args.hf_dir)
    if not (src / "config.json").exists():
        raise CheckpointError(f"{src}: no config.json; expected a Hugging Face model directory")
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{src}: no *.safetensors weights (only safetensors are read)")
    cfg = from_hf_config(LlamaConfig.from_json_file(str(src / "config.json")), name=args.name)
    hf_sd: dict[str, torch.Tensor] = {}
    for f in files:
        hf_sd.update(load_file(str(f)))
    tensors = {k: v.float() for k, v in from_hf_state_dict(hf_sd).items()}
    plait_cfg = PlaitConfig(model=cfg)
    ck = Checkpointer(args.out, meta={"task": "import-hf", "config": as_dict(plait_cfg), "source": str(src)})
    path = ck.save(0, {"model": TensorDict(tensors)})
    overrides = " ".join(f"model.{k}={v}" for k, v in as_dict(plait_cfg)["model"].items())
    print(f"imported {src} ({sum(t.numel() for t in tensors.values()):,} parameters) to {path}")
    print(f"train from it with: plait {overrides} checkpoint.init_from={path}")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="plait-ckpt", description="Inspect, verify and convert Plait checkpoints.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="manifest, sizes, layout, components")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="also print the whole manifest")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("verify", help="check every file's size and checksum")
    p.add_argument("dir")
    p.set_defaults(fn=cmd_verify)
    p = sub.add_parser("export", help="write Hugging Face safetensors + config.json")
    p.add_argument("dir")
    p.add_argument("--to", required=True, help="target format: hf")
    p.add_argument("--role", help="in a multi-role step, the role whose model to export")
    p.add_argument("out")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("import-hf", help="a Plait checkpoint from a Hugging Face Llama directory")
    p.add_argument("hf_dir")
    p.add_argument("out", help="a checkpoints directory; the step_000000000 checkpoint goes in it")
    p.add_argument("--name", default="llama_hf", help="model.name recorded in the config")
    p.set_defaults(fn=cmd_import)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        code = args.fn(args)
    except (CheckpointError, ValueError, OSError) as err:
        print(f"plait-ckpt: error: {err}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    raise SystemExit(code)


if __name__ == "__main__":
    main()
