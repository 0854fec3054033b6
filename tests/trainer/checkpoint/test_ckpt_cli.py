"""plait-ckpt: inspect, verify, export to Hugging Face (logits equal), import from it."""

import json

import pytest
import torch

from trainer.checkpoint.cli import load_model_tensors, main
from trainer.config import ModelConfig
from trainer.launch.rank import run_rank
from trainer.models import build_model


def ckpt(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from plait_testing import compose

    run = tmp_path_factory.mktemp("trained") / "run"
    run_rank(compose(["trainer.max_steps=2", "model.tie_embeddings=true"], run))
    return run


def test_inspect_and_verify(trained, capsys):
    code, out, _ = ckpt(["inspect", str(trained / "checkpoints")], capsys)
    assert code == 0 and "latest: step_000000002" in out and "optimizer" in out and "layout" in out
    code, out, _ = ckpt(["verify", str(trained / "checkpoints" / "step_000000002")], capsys)
    assert code == 0 and "OK" in out


def test_export_to_hf_gives_equal_logits(trained, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    out_dir = tmp_path / "hf"
    code, out, err = ckpt(["export", str(trained / "checkpoints"), "--to", "hf", str(out_dir)], capsys)
    assert code == 0, err
    assert (out_dir / "tokenizer.json").exists()
    hf = LlamaForCausalLM.from_pretrained(str(out_dir)).eval()
    step = trained / "checkpoints" / "step_000000002"
    cfg = ModelConfig(**json.loads((step / "plait.json").read_text())["config"]["model"])
    model = build_model(cfg)
    model.load_state_dict(load_model_tensors(step))
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, model.eval()(tokens), atol=1e-5)


def test_import_hf_round_trips(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    code, out, err = ckpt(["import-hf", str(tmp_path / "hf"), str(tmp_path / "imported")], capsys)
    assert code == 0, err and "checkpoint.init_from=" in out
    step = tmp_path / "imported" / "step_000000000"
    cfg = ModelConfig(**json.loads((step / "plait.json").read_text())["config"]["model"])
    model = build_model(cfg)
    model.load_state_dict(load_model_tensors(step))
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, model.eval()(tokens), atol=1e-5)


def test_damaged_or_missing_input_exits_2(trained, tmp_path, capsys):
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(trained / "checkpoints" / "step_000000002", copy)
    shard = next(copy.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    code, _, err = ckpt(["verify", str(copy)], capsys)
    assert code == 2 and "DAMAGED" in err and shard.name in err
    code, _, err = ckpt(["export", str(tmp_path / "nope"), "--to", "hf", str(tmp_path / "o")], capsys)
    assert code == 2 and "nope" in err
    code, _, err = ckpt(["export", str(trained / "checkpoints"), "--to", "onnx", str(tmp_path / "o")], capsys)
    assert code == 2 and "allowed: hf" in err
    code, _, err = ckpt(["import-hf", str(tmp_path), str(tmp_path / "o")], capsys)
    assert code == 2 and "config.json" in err


def test_inspect_and_verify_a_multi_role_step(tmp_path, capsys):
    from trainer.checkpoint import Checkpointer, CheckpointError
    from trainer.checkpoint.state import Progress, TensorDict

    roles = ("actor", "critic")
    for role, width in (("actor", 3), ("critic", 5)):  # one process each in turn; the last publishes
        Checkpointer(tmp_path, role=role, roles=roles).save(
            1, {"model": TensorDict({"w": torch.ones(width, 2)}), "progress": Progress(1)})
    code, out, _ = ckpt(["inspect", str(tmp_path)], capsys)
    assert code == 0 and "latest: step_000000001" in out
    assert "role        actor: world size 1, components model, progress" in out
    assert "actor/model" in out and "critic/model" in out and "        6 elements" in out
    code, out, _ = ckpt(["verify", str(tmp_path)], capsys)
    assert code == 0 and "OK" in out
    step = tmp_path / "step_000000001"
    with pytest.raises(CheckpointError, match="roles actor, critic hold a model component; pick one with --role"):
        load_model_tensors(step)  # what export reads
    assert torch.equal(load_model_tensors(step, role="critic")["w"], torch.ones(5, 2))
    shard = next((step / "critic").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-4])
    code, _, err = ckpt(["verify", str(tmp_path)], capsys)
    assert code == 2 and "critic/" + shard.name in err
