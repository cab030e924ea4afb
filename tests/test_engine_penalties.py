"""Penalties and biases against reference semantics on small vocabularies: repetition (transformers'
RepetitionPenaltyLogitsProcessor), frequency/presence (OpenAI's formula, written here), logit_bias,
min_p (transformers' MinPLogitsWarper); sampled distributions (chi-square); per-request and
batch-invariant; end to end through the engine (greedy equal to transformers' generate with
repetition_penalty, and to a hand-written decoding loop with frequency/presence penalties)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from k2sys.engine.core.config import EngineConfig, SamplingParams
from k2sys.engine.core.engine import NativeEngine
from k2sys.engine.core.sampling import RowContext, _filter_mask, process_logits, sample
from k2sys.models import build_model, k2_tiny, save_hf

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor  # noqa: E402


def openai_penalties(logits: torch.Tensor, output: list[int], freq: float, pres: float) -> torch.Tensor:
    """OpenAI's documented formula: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence."""
    out = logits.clone()
    for j in set(output):
        c = output.count(j)
        out[j] -= c * freq + (1.0 if c > 0 else 0.0) * pres
    return out


def test_process_logits_matches_references():
    g = torch.Generator().manual_seed(0)
    V = 12
    logits = torch.randn(5, V, generator=g) * 3
    prompt, output = [1, 3, 3, 7], [3, 5, 5, 5, 9]
    params = [SamplingParams(repetition_penalty=1.7), SamplingParams(frequency_penalty=0.6, presence_penalty=-0.4),
              SamplingParams(logit_bias={"2": 5.0, 11: -3.5}), SamplingParams(),
              SamplingParams(repetition_penalty=0.8, frequency_penalty=1.0, presence_penalty=0.5, logit_bias={4: 1.0})]
    ctx = [RowContext(prompt, output)] * 5
    got = process_logits(logits, params, ctx)
    hf_rep = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + output]), logits[0:1].clone())[0]
    assert torch.allclose(got[0], hf_rep)
    assert torch.allclose(got[1], openai_penalties(logits[1], output, 0.6, -0.4))
    want = logits[2].clone()
    want[2] += 5.0
    want[11] -= 3.5
    assert torch.allclose(got[2], want)
    assert torch.equal(got[3], logits[3])  # no params: untouched
    # the documented order: repetition, then frequency/presence, then the bias
    r = RepetitionPenaltyLogitsProcessor(0.8)(torch.tensor([prompt + output]), logits[4:5].clone())[0]
    r = openai_penalties(r, output, 1.0, 0.5)
    r[4] += 1.0
    assert torch.allclose(got[4], r)
    assert torch.equal(logits, logits.clone())  # input not modified


@pytest.mark.parametrize("min_p", [0.05, 0.3, 1.0])
def test_min_p_support_matches_transformers(min_p):
    g = torch.Generator().manual_seed(1)
    scaled = torch.randn(6, 40, generator=g) * 2
    drop = _filter_mask(scaled, torch.full((6,), -1), torch.ones(6), torch.full((6,), min_p))
    hf = MinPLogitsWarper(min_p, min_tokens_to_keep=1)(None, scaled.clone())
    assert torch.equal(drop, torch.isinf(hf))


def chi2_ok(counts: torch.Tensor, probs: torch.Tensor, z: float = 3.09) -> bool:
    """Pearson chi-square (bins with expectation < 5 pooled) below the p=0.001 quantile (Wilson-Hilferty)."""
    n = counts.sum().item()
    exp = probs.double() * n
    big = exp >= 5
    stat = (((counts[big].double() - exp[big]) ** 2) / exp[big]).sum().item()
    bins = int(big.sum())
    rest = exp[~big].sum()
    if rest > 0:
        stat += ((counts[~big].sum().double() - rest) ** 2 / rest).item()
        bins += 1
    dof = bins - 1
    a = 2.0 / (9 * dof)
    return stat < dof * (1 - a + z * math.sqrt(a)) ** 3


def test_sampled_distribution_with_penalties_and_bias():
    """Samples follow softmax(processed / T); the returned logprob is log of that distribution."""
    V, n = 10, 20000
    logits = torch.linspace(2.0, -1.0, V)[None].expand(n, -1)
    p = SamplingParams(temperature=0.8, frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=1.2,
                       logit_bias={7: 2.0})
    ctx = RowContext(prompt=[9], output=[0, 0, 1])
    toks, lps = sample(logits, [p] * n, [5] * n, list(range(n)), [3] * n, contexts=[ctx] * n)
    r = RepetitionPenaltyLogitsProcessor(1.2)(torch.tensor([[9, 0, 0, 1]]), logits[:1].clone())[0]
    r = openai_penalties(r, [0, 0, 1], 0.5, 0.3)
    r[7] += 2.0
    probs = (r / 0.8).softmax(-1)
    assert chi2_ok(torch.bincount(torch.tensor(toks), minlength=V), probs)
    assert torch.allclose(torch.tensor(lps), probs.log()[torch.tensor(toks)], atol=1e-5)


def test_penalties_are_per_request_and_batch_invariant():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 30, generator=g)
    a = SamplingParams(temperature=1.0, frequency_penalty=1.5, sampling_seed=1)
    b = SamplingParams(temperature=1.0)
    ctx_a = RowContext(output=[3, 3, 4])
    alone = sample(logits[:1], [a], [11], [0], [3], contexts=[ctx_a])
    crowd = sample(logits[[1, 0, 2]], [b, a, b], [5, 11, 6], [0, 0, 0], [3, 3, 3], contexts=[None, ctx_a, None])
    assert alone[0][0] == crowd[0][1] and alone[1][0] == crowd[1][1]
    # the unpenalized rows are exactly what they are without a penalized neighbour
    plain = sample(logits[[1, 2]], [b, b], [5, 6], [0, 0], [3, 3])
    assert plain[0] == [crowd[0][0], crowd[0][2]]


# ---- through the engine --------------------------------------------------------------------------
V_MODEL = 128


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = dataclasses.replace(k2_tiny(vocab_size=V_MODEL), initializer_range=0.08, eos_token_id=None)
    return save_hf(build_model(cfg, seed=6), tmp_path_factory.mktemp("pen") / "tiny")


@pytest.fixture(scope="module")
def eng(ckpt):
    e = NativeEngine.from_pretrained(ckpt, EngineConfig(max_total_tokens=4096))
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def hf(ckpt):
    m = transformers.DeepseekV3ForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


def test_greedy_repetition_penalty_equals_transformers_generate(eng, hf):
    prompt = [5, 9, 9, 17, 3, 42, 5]
    with torch.inference_mode():
        seq = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=24, do_sample=False, repetition_penalty=1.5)
    want = seq[0, len(prompt):].tolist()
    plain = eng.generate_sglang([prompt], SamplingParams(temperature=0, max_new_tokens=24))[0]["output_ids"]
    got = eng.generate_sglang([prompt], SamplingParams(temperature=0, max_new_tokens=24,
                                                       repetition_penalty=1.5))[0]["output_ids"]
    assert got == want and got != plain


def test_greedy_frequency_presence_equal_a_decoding_loop(eng, hf):
    prompt = [8, 1, 2, 3]
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(20):
            logits = hf(torch.tensor([ids])).logits[0, -1].float()
            tok = int(openai_penalties(logits, out, 0.9, 0.4).argmax())
            ids.append(tok)
            out.append(tok)
    got = eng.generate_sglang([prompt], SamplingParams(temperature=0, max_new_tokens=20, frequency_penalty=0.9,
                                                       presence_penalty=0.4))[0]["output_ids"]
    assert got == out


def test_logit_bias_and_seeded_batch_invariance(eng):
    forced = eng.generate_sglang([[4, 4, 4]], SamplingParams(temperature=1.0, max_new_tokens=6, sampling_seed=2,
                                                              logit_bias={"77": 100.0}))[0]
    assert forced["output_ids"] == [77] * 6
    p = SamplingParams(temperature=1.0, max_new_tokens=16, sampling_seed=99, frequency_penalty=1.2,
                       repetition_penalty=1.3, presence_penalty=0.2, logit_bias={3: 1.5}, min_p=0.02)
    alone = eng.generate_sglang([[1, 2, 3]], p)[0]["output_ids"]
    # one scheduler command: the three requests share their steps, each with its own params
    mixed = eng.submit_many([
        {"input_ids": [7] * 20, "params": SamplingParams(temperature=1.0, max_new_tokens=16)},
        {"input_ids": [1, 2, 3], "params": p},
        {"input_ids": list(range(30)), "params": SamplingParams(temperature=0.5, max_new_tokens=16,
                                                                repetition_penalty=2.0)}])
    assert mixed[1].result(timeout=60)[0]["output_ids"] == alone
    assert eng.generate_sglang([[1, 2, 3]], p.replace(frequency_penalty=0.0))[0]["output_ids"] != alone
