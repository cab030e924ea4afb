"""Sampling: seeded reproducibility independent of batch composition, the empirical distribution
at temperature T against softmax(logits / T) (chi-square), top-k / top-p support, stop rules."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from k2sys.engine.core.config import EngineConfig, RequestError, SamplingParams
from k2sys.engine.core.engine import NativeEngine
from k2sys.engine.core.sampling import sample, uniform_noise
from k2sys.models import build_model, k2_tiny


@pytest.fixture(scope="module")
def model():
    cfg = dataclasses.replace(k2_tiny(vocab_size=512), initializer_range=0.08, eos_token_id=None)
    return build_model(cfg, seed=5)


@pytest.fixture(scope="module")
def engine(model):
    eng = NativeEngine.from_model(model, EngineConfig(max_total_tokens=16384))
    yield eng
    eng.shutdown()


def chi2_critical(dof: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: p = 0.001)."""
    a = 2.0 / (9 * dof)
    return dof * (1 - a + z * math.sqrt(a)) ** 3


def chi2_stat(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson chi-square with low-expectation bins pooled into one."""
    n = counts.sum().item()
    exp = probs * n
    big = exp >= min_expected
    obs_b, exp_b = counts[big].double(), exp[big].double()
    rest_o, rest_e = counts[~big].sum().double(), exp[~big].sum().double()
    stat = ((obs_b - exp_b) ** 2 / exp_b).sum().item()
    bins = int(big.sum())
    if rest_e > 0:
        stat += ((rest_o - rest_e) ** 2 / rest_e).item()
        bins += 1
    return stat, bins - 1


def test_same_seed_same_tokens_in_any_batch(engine):
    p = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=24, sampling_seed=1234)
    alone = engine.generate_sglang([[5, 6, 7]], p)[0]["output_ids"]
    crowd = engine.generate_sglang([[9] * 30, [5, 6, 7], list(range(40))], p)[1]["output_ids"]
    assert alone == crowd
    other = engine.generate_sglang([[5, 6, 7]], p.replace(sampling_seed=99))[0]["output_ids"]
    assert other != alone


def test_n_samples_differ_and_reproduce(engine):
    p = SamplingParams(temperature=1.0, max_new_tokens=16, n=4, sampling_seed=7)
    a = [o["output_ids"] for o in engine.generate_sglang([[1, 2, 3]], p)]
    b = [o["output_ids"] for o in engine.generate_sglang([[1, 2, 3]], p)]
    assert a == b and len({tuple(x) for x in a}) == 4


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_first_token_distribution_matches_softmax(engine, model, temperature):
    prompt = [11, 42, 7, 300]
    n = 3000
    outs = engine.generate_sglang([prompt], SamplingParams(temperature=temperature, max_new_tokens=1, n=n,
                                                          sampling_seed=temperature.__hash__() % 1000),
                                  return_logprob=True)
    toks = torch.tensor([o["output_ids"][0] for o in outs])
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1].double()
    probs = (logits / temperature).softmax(-1)
    stat, dof = chi2_stat(torch.bincount(toks, minlength=probs.numel()), probs)
    assert dof >= 5
    assert stat < chi2_critical(dof), (stat, dof)
    # the returned logprob is log softmax(logits / T) of the sampled token
    lps = torch.tensor([o["meta_info"]["output_token_logprobs"][0][0] for o in outs], dtype=torch.float64)
    assert torch.allclose(lps, probs.log()[toks], atol=1e-4)


def test_sample_function_distribution_with_top_k_top_p():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -5.0]])
    n = 20000
    rows = logits.expand(n, -1)
    p = SamplingParams(temperature=0.9, top_k=5, top_p=0.9)
    toks, _ = sample(rows, [p] * n, [17] * n, list(range(n)), [0] * n)
    probs = (logits[0] / 0.9).softmax(-1)
    keep = torch.zeros(8, dtype=torch.bool)
    keep[:5] = True  # top-k 5
    cum = probs.cumsum(0) - probs
    keep &= cum < 0.9  # top-p 0.9 (sorted already)
    target = torch.where(keep, probs, 0.0)
    target = target / target.sum()
    counts = torch.bincount(torch.tensor(toks), minlength=8)
    assert (counts[~keep] == 0).all()
    stat, dof = chi2_stat(counts[keep], target[keep].double())
    assert stat < chi2_critical(dof)


def test_noise_is_uniform_and_keyed():
    u = uniform_noise(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), torch.tensor([3, 3, 3]), 50000)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    again = uniform_noise(torch.tensor([1]), torch.tensor([0]), torch.tensor([3]), 50000)
    assert torch.equal(again[0], u[0])


def test_stop_token_ids_max_new_tokens_and_min_new_tokens(engine):
    greedy = engine.generate_sglang([[3, 4, 5]], SamplingParams(temperature=0, max_new_tokens=12))[0]
    ids = greedy["output_ids"]
    assert len(ids) == 12 and greedy["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
    stop_at = ids[4]
    first = ids.index(stop_at)
    out = engine.generate_sglang([[3, 4, 5]], SamplingParams(temperature=0, max_new_tokens=12,
                                                             stop_token_ids=[stop_at]))[0]
    assert out["output_ids"] == ids[:first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_at}
    banned = engine.generate_sglang([[3, 4, 5]], SamplingParams(temperature=0, max_new_tokens=12, min_new_tokens=12,
                                                                stop_token_ids=[stop_at]))[0]
    assert len(banned["output_ids"]) == 12 and stop_at not in banned["output_ids"]
    assert engine.generate_sglang([[3]], SamplingParams(max_new_tokens=0))[0]["output_ids"] == []


def test_bad_sampling_params_name_the_field():
    for bad, field in (({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": 0}, "top_k"),
                       ({"max_new_tokens": -3}, "max_new_tokens"), ({"n": 0}, "n"), ({"bogus": 1}, "bogus"),
                       ({"frequency_penalty": 2.5}, "frequency_penalty"), ({"beam_width": 2}, "beam_width"),
                       ({"repetition_penalty": 0}, "repetition_penalty"), ({"logit_bias": {"x": 1}}, "logit_bias"),
                       ({"stop_regex": ["("]}, "stop_regex"), ({"regex": "a", "ebnf": "root ::= \"a\""}, "regex")):
        with pytest.raises(RequestError, match=field):
            SamplingParams.from_sglang(bad)
    assert SamplingParams.from_sglang({"seed": 5}).sampling_seed == 5
