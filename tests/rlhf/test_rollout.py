"""rlhf/rollout.py: sampling controls, stops, n per prompt, reproducibility, log-probs vs teacher forcing."""

import math

import pytest
import torch

from rlhf.rollout import filter_logits, left_pad, sample
from trainer.config import ModelConfig
from trainer.models import build_model

PROMPTS = [[5, 9, 3, 17, 40, 2], [11], [7, 8, 60]]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(name="llama_rollout", vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_dim=96, max_seq_len=64, init_std=0.2)
    return build_model(cfg).eval()


def test_left_pad():
    tokens, mask = left_pad([[1, 2, 3], [4]], pad_id=9)
    assert tokens.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]


def test_top_k_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    inf = float("-inf")
    assert filter_logits(logits, top_k=2).tolist() == [[inf, 3.0, 2.0, inf]]
    assert torch.equal(filter_logits(logits, top_k=10), logits)


def test_top_p_by_hand():
    logits = torch.tensor([[0.05, 0.5, 0.3, 0.15]]).log()
    inf = float("-inf")
    # sorted 0.5, 0.3, 0.15, 0.05: the mass before each is 0, 0.5, 0.8, 0.95
    kept = lambda x: [v != inf for v in x[0].tolist()]
    assert kept(filter_logits(logits, top_p=0.5)) == [False, True, False, False]
    assert kept(filter_logits(logits, top_p=0.6)) == [False, True, True, False]
    assert kept(filter_logits(logits, top_p=0.85)) == [False, True, True, True]
    assert kept(filter_logits(logits, top_p=0.01)) == [False, True, False, False]
    assert kept(filter_logits(logits, top_p=1.0)) == [True] * 4
    # top-k first drops 0.05; renormalised, 0.5 + 0.3 of the rest is 0.84 < 0.9: three stay
    assert kept(filter_logits(logits, top_k=3, top_p=0.9)) == [False, True, True, True]


def teacher_forced(model, out, temperature: float) -> torch.Tensor:
    logits = model(out["input_ids"], positions=out["position_ids"], attention_mask=out["attention_mask"]).float()
    p = out["prompts"].size(1)
    scaled = logits[:, p - 1:-1] / (temperature if temperature > 0 else 1.0)
    return scaled.log_softmax(-1).gather(-1, out["responses"][..., None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_log_probs_equal_teacher_forced_recomputation(model, temperature):
    out = sample(model, PROMPTS, 8, temperature=temperature, top_k=20, top_p=0.95, n=2,
                 generator=torch.Generator().manual_seed(0))
    m = out["response_mask"]
    ref = teacher_forced(model, out, temperature)
    torch.testing.assert_close(out["log_probs"][m], ref[m], rtol=0, atol=1e-5)
    assert torch.all(out["log_probs"][~m] == 0)


def test_log_probs_equal_unpadded_full_sequence(model):
    out = sample(model, [PROMPTS[0]], 10, temperature=1.0, generator=torch.Generator().manual_seed(3))
    ids = out["input_ids"]
    logits = model(ids)  # the training forward, no mask or positions
    ref = logits[:, len(PROMPTS[0]) - 1:-1].log_softmax(-1).gather(-1, out["responses"][..., None]).squeeze(-1)
    torch.testing.assert_close(out["log_probs"], ref, rtol=0, atol=1e-5)


def test_greedy_matches_each_prompt_alone(model):
    batched = sample(model, PROMPTS, 6, temperature=0)
    for i, p in enumerate(PROMPTS):
        alone = sample(model, [p], 6, temperature=0)
        assert torch.equal(batched["responses"][i], alone["responses"][0])
        torch.testing.assert_close(batched["log_probs"][i], alone["log_probs"][0], rtol=0, atol=1e-5)


def test_eos_and_stop_tokens_end_and_mask(model):
    greedy = sample(model, PROMPTS, 8, temperature=0)["responses"]
    eos = int(greedy[0, 2])  # the token the first prompt emits third
    out = sample(model, PROMPTS, 8, temperature=0, eos_id=eos, pad_id=63)
    r, m = out["responses"], out["response_mask"]
    for i in range(len(PROMPTS)):
        hits = (greedy[i] == eos).nonzero()
        end = int(hits[0]) + 1 if len(hits) else 8
        assert m[i].tolist() == [True] * end + [False] * (8 - end)
        assert torch.equal(r[i, :end], greedy[i, :end]) and torch.all(r[i, end:] == 63)
    assert m[0].sum() <= 3
    stop = int(greedy[1, 0])
    out = sample(model, PROMPTS, 8, temperature=0, stop_ids=[stop])
    assert out["response_mask"][1].tolist() == [True] + [False] * 7
    assert torch.equal(out["attention_mask"][:, -8:], out["response_mask"])


def test_n_samples_per_prompt(model):
    out = sample(model, PROMPTS, 5, temperature=1.0, n=3, generator=torch.Generator().manual_seed(0))
    assert len(out) == 9 and out["responses"].shape == (9, 5)
    tokens, mask = left_pad(PROMPTS)
    assert torch.equal(out["prompts"], tokens.repeat_interleave(3, dim=0))
    assert torch.equal(out["prompt_mask"], mask.repeat_interleave(3, dim=0))
    # the samples of one prompt differ (the tiny model's distribution is far from one-hot)
    assert len({tuple(r) for r in out["responses"][0:3].tolist()}) > 1
    greedy = sample(model, PROMPTS, 5, temperature=0, n=2)["responses"]
    assert torch.equal(greedy[0::2], greedy[1::2])


def test_seeded_generator_reproducible(model):
    run = lambda seed: sample(model, PROMPTS, 6, temperature=0.9, top_p=0.9, n=2,
                              generator=torch.Generator().manual_seed(seed))
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a["responses"], b["responses"]) and torch.equal(a["log_probs"], b["log_probs"])
    assert not torch.equal(a["responses"], c["responses"])


def test_padded_tensor_input_equals_lists(model):
    tokens, mask = left_pad(PROMPTS)
    a = sample(model, tokens, 4, attention_mask=mask, temperature=0)
    b = sample(model, PROMPTS, 4, temperature=0)
    assert torch.equal(a["responses"], b["responses"])


def test_top_k_one_is_greedy(model):
    a = sample(model, PROMPTS, 5, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a["responses"], sample(model, PROMPTS, 5, temperature=0)["responses"])
    assert math.isfinite(float(a["log_probs"].sum()))


def _tp_rollout():
    from parallel.mesh import ParallelDims, build_mesh
    from parallel.tensor import apply_tp
    torch.manual_seed(0)
    model = build_model(TP_CFG).eval()
    apply_tp(model, build_mesh(ParallelDims(tp=2), "cpu")["tp"], sequence_parallel=False)
    out = sample(model, PROMPTS, 6, temperature=0)
    return out["responses"].tolist(), out["log_probs"].tolist()  # lists: tensors would cross by shared memory


TP_CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32,
                     init_std=0.2)


def test_tensor_parallel_rollout_equals_single_process(run_ranks):
    """Each rank caches its local kv heads; the vocabulary-sharded last logits are gathered per step."""
    results = run_ranks(2, _tp_rollout)
    torch.manual_seed(0)
    single = sample(build_model(TP_CFG).eval(), PROMPTS, 6, temperature=0)
    for responses, log_probs in results:
        assert responses == single["responses"].tolist()
        torch.testing.assert_close(torch.tensor(log_probs), single["log_probs"], rtol=0, atol=1e-5)


def test_kv_cache_greedy_equals_full_recomputation(model):
    """Prefill once + one token a step (KV cache) against recomputing the whole prefix each step
    (`trainer.models.llama.generate`): the same greedy tokens, the same logits to 1e-5."""
    from trainer.models.llama import generate

    for prompt in PROMPTS:
        cached = sample(model, [prompt], 12, temperature=0)
        full = generate(model, torch.tensor([prompt]), 12, temperature=0)
        assert torch.equal(cached["responses"][0], full[0, len(prompt):])
        logits = model(full[:, :-1])[:, len(prompt) - 1:].float()  # every step's logits, recomputed
        ref = logits.log_softmax(-1).gather(-1, cached["responses"][..., None]).squeeze(-1)
        torch.testing.assert_close(cached["log_probs"], ref, rtol=0, atol=1e-5)
