"""Prompt log-probs from the prefill (logprob_start_len / input_token_logprobs), top-k and listed-token
alternatives, against transformers' log-softmax of the same fp32 checkpoint (<= 1e-4): with chunked
prefill, the prefix cache (cached blocks never hide positions that need log-probs), KV retraction,
n samples and max_new_tokens=0."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from k2sys.engine.core.config import EngineConfig, LogprobOptions, RequestError, SamplingParams
from k2sys.engine.core.engine import NativeEngine
from k2sys.models import build_model, k2_tiny, save_hf

transformers = pytest.importorskip("transformers")

V = 256
TOL = 1e-4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = dataclasses.replace(k2_tiny(vocab_size=V), initializer_range=0.05, eos_token_id=None)
    return save_hf(build_model(cfg, seed=21), tmp_path_factory.mktemp("lp") / "tiny")


@pytest.fixture(scope="module")
def hf(ckpt):
    return transformers.DeepseekV3ForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()


def ref_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: log p(. | ids[:p + 1]) at every position p (transformers, fp32)."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine(ckpt, **kw) -> NativeEngine:
    return NativeEngine.from_pretrained(ckpt, EngineConfig(**{"max_total_tokens": 4096, "block_size": 16, **kw}))


def check_input(meta: dict, ids: list[int], start: int, ref: torch.Tensor, k: int = 0, listed=None) -> None:
    rows = meta["input_token_logprobs"]
    assert [r[1] for r in rows] == ids[start:]
    if not rows:
        return
    assert rows[0][0] is None  # the first reported prompt token has no log-prob (SGLang)
    got = [r[0] for r in rows[1:]]
    want = [ref[p, ids[p + 1]].item() for p in range(start, len(ids) - 1)]
    assert len(got) == len(want) and all(abs(a - b) <= TOL for a, b in zip(got, want))
    if k:
        tops = meta["input_top_logprobs"]
        assert len(tops) == len(rows) and tops[0] is None
        for p, row in zip(range(start, len(ids) - 1), tops[1:]):
            v, i = ref[p].topk(k)
            assert [t for _, t, _ in row] == i.tolist()
            assert max(abs(a - b) for (a, _, _), b in zip(row, v.tolist())) <= TOL
    if listed is not None:
        by_id = meta["input_token_ids_logprobs"]
        assert len(by_id) == len(rows) and by_id[0] is None
        for p, row in zip(range(start, len(ids) - 1), by_id[1:]):
            assert [t for _, t, _ in row] == list(listed)
            assert max(abs(a - ref[p, t].item()) for a, t, _ in row) <= TOL


@pytest.mark.parametrize("start", [0, 1, 17, 38, 39, 40])
@pytest.mark.parametrize("budget", [2048, 12])  # 12: the prompt arrives in chunks
def test_prompt_logprobs_equal_transformers(ckpt, hf, start, budget):
    ids = prompt(1, 40)
    ref = ref_logprobs(hf, ids)
    with engine(ckpt, max_num_batched_tokens=budget) as eng:
        h = eng.submit(ids, SamplingParams(temperature=0, max_new_tokens=2),
                       logprobs=LogprobOptions(return_logprob=True, logprob_start_len=start, top_logprobs_num=3,
                                               token_ids_logprob=[0, 7, 200]))
        (out,) = h.result(timeout=120)
    meta = out["meta_info"]
    check_input(meta, ids, start, ref, k=3, listed=[0, 7, 200])
    assert meta["output_token_logprobs_length"] == 2 and len(meta["output_top_logprobs"]) == 2
    # output alternatives: the distribution of the first generated token is the model's at the last position
    first = meta["output_top_logprobs"][0]
    v, i = ref[-1].topk(3)
    assert [t for _, t, _ in first] == i.tolist() and out["output_ids"][0] == i[0].item()
    assert max(abs(a - b) for (a, _, _), b in zip(first, v.tolist())) <= TOL
    assert [t for _, t, _ in meta["output_token_ids_logprobs"][0]] == [0, 7, 200]


def test_prefix_cache_never_hides_needed_positions(ckpt, hf):
    """A cached prompt asked again for log-probs from 0 is recomputed; from 37 it reuses two blocks;
    and its own blocks go back into the cache."""
    ids = prompt(2, 50)
    ref = ref_logprobs(hf, ids)
    with engine(ckpt) as eng:
        warm = eng.generate_sglang([ids], SamplingParams(temperature=0, max_new_tokens=1))[0]
        assert warm["meta_info"]["cached_tokens"] == 0
        again = eng.generate_sglang([ids], SamplingParams(temperature=0, max_new_tokens=1))[0]
        assert again["meta_info"]["cached_tokens"] == 48  # the cache is live
        for start, cached in ((0, 0), (37, 32), (48, 48)):
            h = eng.submit(ids, SamplingParams(temperature=0, max_new_tokens=1),
                           logprobs=LogprobOptions(return_logprob=True, logprob_start_len=start))
            (out,) = h.result(timeout=120)
            assert out["meta_info"]["cached_tokens"] == cached, start
            check_input(out["meta_info"], ids, start, ref)
            assert out["output_ids"] == warm["output_ids"]


def test_retraction_keeps_prompt_logprobs_exact(ckpt, hf):
    """Under KV pressure sequences are retracted and recomputed; prompt log-probs stay exact."""
    prompts = [prompt(10 + i, 19) for i in range(8)]
    refs = [ref_logprobs(hf, p) for p in prompts]
    with engine(ckpt, max_total_tokens=256) as eng:
        handles = eng.submit_many([{"input_ids": p, "params": SamplingParams(temperature=0, max_new_tokens=64),
                                    "logprobs": LogprobOptions(return_logprob=True, logprob_start_len=0)}
                                   for p in prompts])
        outs = [h.result(timeout=300)[0] for h in handles]
        assert eng.scheduler.retractions > 0
    for p, ref, out in zip(prompts, refs, outs):
        check_input(out["meta_info"], p, 0, ref)


def test_retraction_mid_prefill_keeps_what_was_computed(ckpt, hf):
    """A prompt retracted after two prefill chunks: the 24 prompt log-probs it has are kept, the
    prefix cache gives back only what precedes the first missing position, the rest is computed."""
    ids = prompt(4, 40)
    ref = ref_logprobs(hf, ids)
    with engine(ckpt, max_num_batched_tokens=12) as eng:
        eng.pause("in_place")  # the test drives the scheduler by hand
        h = eng.submit(ids, SamplingParams(temperature=0, max_new_tokens=3),
                       logprobs=LogprobOptions(return_logprob=True, logprob_start_len=0))
        sch = eng.scheduler
        eng._call(lambda: (sch.step(), sch.step()))
        req = h.request
        assert len(req.input_lp) == 24
        eng._call(lambda: sch._retract(req.seqs[0]))
        eng._call(lambda: sch.step())
        assert req.seqs[0].cached_tokens == 16 and len(req.input_lp) == 28  # recomputed 16..23, new 24..27
        eng.continue_generation()
        (out,) = h.result(timeout=60)
    check_input(out["meta_info"], ids, 0, ref)


def test_n_samples_and_max_new_tokens_zero(ckpt, hf):
    ids = prompt(3, 21)
    ref = ref_logprobs(hf, ids)
    with engine(ckpt) as eng:
        h = eng.submit(ids, SamplingParams(temperature=1.0, max_new_tokens=0, n=3),
                       logprobs=LogprobOptions(return_logprob=True, logprob_start_len=0))
        outs = h.result(timeout=60)
        assert len(outs) == 3
        for o in outs:
            assert o["output_ids"] == [] and o["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
            check_input(o["meta_info"], ids, 0, ref)
        # n samples share one prefill: every sample reports the same prompt log-probs
        h = eng.submit(ids, SamplingParams(temperature=1.0, max_new_tokens=4, n=2, sampling_seed=3),
                       logprobs=LogprobOptions(return_logprob=True, logprob_start_len=5))
        a, b = h.result(timeout=60)
        assert a["meta_info"]["input_token_logprobs"] == b["meta_info"]["input_token_logprobs"]
        check_input(a["meta_info"], ids, 5, ref)
        # max_new_tokens=0 without prompt log-probs needs no compute at all
        before = eng.scheduler.steps
        (plain,) = eng.generate_sglang([ids], SamplingParams(max_new_tokens=0))
        assert plain["output_ids"] == [] and eng.scheduler.steps == before


def test_text_in_logprobs_and_bad_options(ckpt):
    with engine(ckpt) as eng:
        with pytest.raises(RequestError, match="logprob_start_len"):
            eng.submit([1, 2, 3], SamplingParams(max_new_tokens=1),
                       logprobs=LogprobOptions(return_logprob=True, logprob_start_len=4))
        with pytest.raises(RequestError, match="needs return_logprob"):
            LogprobOptions(return_logprob=False, top_logprobs_num=2)
        with pytest.raises(RequestError, match="token_ids_logprob"):
            eng.submit([1, 2], SamplingParams(max_new_tokens=1),
                       logprobs=LogprobOptions(return_logprob=True, token_ids_logprob=[V]))
