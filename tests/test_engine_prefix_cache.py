"""Prefix caching in the native engine: block keys, LRU eviction, flush on new weights, and
outputs equal to an engine without the cache (greedy tokens, log-probs within 1e-5)."""

import dataclasses

import pytest
import torch

from k2sys.engine.core.config import EngineConfig, SamplingParams
from k2sys.engine.core.engine import NativeEngine
from k2sys.engine.core.kv_cache import BlockAllocator
from k2sys.models import build_model, k2_tiny

CFG = dataclasses.replace(k2_tiny(vocab_size=256), initializer_range=0.05, eos_token_id=None)
BS = 16


def test_allocator_keys_lru_eviction_and_flush():
    a = BlockAllocator(4)
    k0 = a.block_key(None, [1, 2])
    k1 = a.block_key(k0, [3, 4])
    assert k1 != a.block_key(None, [3, 4]) and k0 == a.block_key(None, (1, 2))  # chained, content-addressed
    b0, b1 = a.allocate(2)
    a.register(b0, k0)
    a.register(b1, k1)
    a.release([b0, b1])
    assert a.num_free == 4 and a.num_cached == 2  # cached blocks are still allocatable
    assert a.lookup(k0) == b0 and a.refcount[b0] == 1 and a.num_free == 3
    a.release([b0])
    assert a.lookup(k1) == b1  # b1 most recently used; b0 least
    a.release([b1])
    got = a.allocate(3)  # two plain free blocks, then evicts the LRU cached one (b0)
    assert b0 in got and a.evictions == 1 and a.lookup(k0) is None and a.num_cached == 1
    a.release(got)
    a.flush_prefix_cache()
    assert a.num_cached == 0 and a.lookup(k1) is None and a.num_free == 4


def _engine(cache: bool, model=None, tokens: int = 4096) -> NativeEngine:
    model = model or build_model(CFG, seed=0)
    return NativeEngine.from_model(model, EngineConfig(max_total_tokens=tokens, block_size=BS,
                                                       enable_prefix_caching=cache))


def _gen(eng, prompts, new=12, n=1):
    outs = eng.generate_sglang(prompts, SamplingParams(temperature=0, max_new_tokens=new, n=n), return_logprob=True)
    return [(o["output_ids"], [r[0] for r in o["meta_info"]["output_token_logprobs"]],
             o["meta_info"]["cached_tokens"]) for o in outs]


def _same(a, b):
    for (ia, la, _), (ib, lb, _) in zip(a, b):
        assert ia == ib
        assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-5


def test_next_turn_reuses_the_conversation_and_matches_uncached():
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 256, (40,), generator=g).tolist()
    with _engine(True) as cached, _engine(False) as plain:
        first = _gen(cached, [prompt], new=20)
        _same(first, _gen(plain, [prompt], new=20))
        assert first[0][2] == 0
        turn2 = prompt + first[0][0] + torch.randint(0, 256, (10,), generator=g).tolist()  # 70 tokens
        hit = _gen(cached, [turn2])
        assert hit[0][2] == 48  # 60 computed tokens -> 3 full blocks of 16
        _same(hit, _gen(plain, [turn2]))
        assert cached.stats()["prefix_cache"]["hit_tokens"] == 48
        assert plain.stats()["prefix_cache"]["cached_blocks"] == 0
        # n samples of a cached prompt: the prefix is shared, the samples equal the uncached ones
        many = _gen(cached, [turn2], n=3)
        assert all(c == 64 for _, _, c in many)  # turn2's own 4 full blocks are cached now
        _same(many, _gen(plain, [turn2], n=3))


def test_weight_update_flushes_the_cache():
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 256, (50,), generator=g).tolist()
    new_model = build_model(CFG, seed=7)
    with _engine(True) as eng, _engine(False, model=new_model) as ref:
        _gen(eng, [prompt])
        assert _gen(eng, [prompt])[0][2] == 48
        eng.begin_weight_update()
        eng.update_weights(list(new_model.state_dict().items()))
        eng.end_weight_update()
        after = _gen(eng, [prompt])
        assert after[0][2] == 0  # stale KV is gone
        _same(after, _gen(ref, [prompt]))


def test_eviction_under_pressure_keeps_outputs_exact():
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (40,), generator=g).tolist() for _ in range(10)]
    with _engine(True, tokens=8 * BS) as small, _engine(False) as plain:
        want = _gen(plain, prompts + prompts[:3])
        got = [r for p in prompts + prompts[:3] for r in _gen(small, [p])]
        _same(got, want)
        assert small.cache.allocator.evictions > 0
        assert small.cache.allocator.num_free == small.cache.num_blocks  # nothing leaked


def test_release_resume_kv_forgets_the_cache():
    prompt = list(range(3, 43))
    with _engine(True) as eng:
        _gen(eng, [prompt])
        eng.release_memory(["kv_cache"])
        eng.resume_memory(["kv_cache"])
        assert _gen(eng, [prompt])[0][2] == 0


@pytest.mark.parametrize("n_prompt", [16, 17, 32])
def test_block_aligned_prompts_still_compute_the_last_token(n_prompt):
    prompt = list(range(5, 5 + n_prompt))
    with _engine(True) as cached, _engine(False) as plain:
        _gen(cached, [prompt])
        again = _gen(cached, [prompt])
        assert again[0][2] == ((n_prompt - 1) // BS) * BS
        _same(again, _gen(plain, [prompt]))


def test_requests_arriving_together_share_their_common_prefix():
    """Prompts that share a 3-block prefix, submitted at once: the first computes the prefix, the
    others wait one step and take it from the cache (cached_tokens = 48) instead of computing it in
    the same step; outputs equal an engine without the prefix cache. Prompts with nothing in common
    are computed in full, as before."""
    g = torch.Generator().manual_seed(4)
    shared = torch.randint(0, 256, (48,), generator=g).tolist()
    prompts = [shared + torch.randint(0, 256, (5 + i,), generator=g).tolist() for i in range(4)]
    with _engine(True) as cached, _engine(False) as plain:
        got = _gen(cached, prompts)
        assert [c for _, _, c in got] == [0, 48, 48, 48]
        _same(got, _gen(plain, prompts))
        assert cached.stats()["prefix_cache"]["hit_tokens"] == 3 * 48
        others = [torch.randint(0, 256, (40,), generator=g).tolist() for _ in range(3)]
        got2 = _gen(cached, others)
        assert [c for _, _, c in got2] == [0, 0, 0]
        _same(got2, _gen(plain, others))
