"""Partial-rollout and RL-colocation controls of the native engine: abort, pause (abort / retract /
in_place) + continue, resume from a token prefix, memory release/resume, weight update sessions
(all-or-nothing, versioned), and the paged-cache allocator."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from k2sys.engine.api.client import FlattenedBucket
from k2sys.engine.core.config import EngineConfig, EngineError, RequestError, SamplingParams
from k2sys.engine.core.engine import NativeEngine
from k2sys.engine.core.kv_cache import BlockAllocator, OutOfBlocks, PagedLatentCache
from k2sys.models import build_model, k2_tiny

CFG = dataclasses.replace(k2_tiny(vocab_size=512), initializer_range=0.05, eos_token_id=None)


@pytest.fixture()
def engine():
    eng = NativeEngine.from_model(build_model(CFG, seed=0), EngineConfig(max_total_tokens=8192))
    yield eng
    eng.shutdown()


def greedy_ref(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(ids)[0, -1].argmax())
            out.append(t)
            ids = torch.cat([ids, torch.tensor([[t]])], 1)
    return out


def wait_tokens(handle, k: int, timeout: float = 60) -> None:
    t0 = time.time()
    while not any(len(o["output_ids"]) >= k for o in handle.outputs.values()):
        assert time.time() - t0 < timeout
        time.sleep(0.005)


def test_allocator_refcounts_and_free_list():
    a = BlockAllocator(4)
    x = a.allocate(3)
    assert a.num_free == 1
    a.share(x[:2])
    a.release(x)
    assert a.num_free == 2 and a.refcount[x[0]] == 1
    with pytest.raises(OutOfBlocks, match="max_total_tokens"):
        a.allocate(3)
    a.release(x[:2])
    assert a.num_free == 4
    with pytest.raises(EngineError, match="twice"):
        a.release([x[0]])


def test_cache_release_frees_storage():
    c = PagedLatentCache(2, 8, 4, 6, 2, torch.float32)
    assert c.nbytes == 2 * 8 * 4 * 8 * 4
    c.release()
    assert c.nbytes == 0
    c.resume()
    assert c.nbytes == 2 * 8 * 4 * 8 * 4 and c.allocator.num_free == 8


def test_abort_one_request_keeps_others(engine):
    slow = engine.submit([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=5000, ignore_eos=True), rid="slow")
    fast = engine.submit([4, 5], SamplingParams(temperature=0, max_new_tokens=8))
    wait_tokens(slow, 3)
    engine.abort("slow")
    out = slow.result(timeout=60)[0]
    assert out["meta_info"]["finish_reason"]["type"] == "abort" and len(out["output_ids"]) >= 3
    assert fast.result(timeout=60)[0]["meta_info"]["finish_reason"]["type"] == "length"
    assert engine.cache.allocator.num_free == engine.cache.num_blocks


def test_pause_abort_returns_prefix_and_resume_matches_uninterrupted(engine):
    model = build_model(CFG, seed=0)
    prompt = [7, 8, 9, 10]
    ref = greedy_ref(model, prompt, 40)
    h = engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=40), return_logprob=True, rid="r1")
    wait_tokens(h, 5)
    paused = engine.pause("abort")
    assert engine.paused == "abort"
    (p,) = paused
    assert p.rid == "r1" and list(p.input_ids) == prompt and 5 <= len(p.output_ids) < 40
    assert list(p.output_ids) == ref[:len(p.output_ids)] and len(p.output_logprobs) == len(p.output_ids)
    out = h.result(timeout=30)[0]
    assert out["meta_info"]["finish_reason"]["type"] == "abort" and out["output_ids"] == list(p.output_ids)
    # while paused, new work queues but does not run
    q = engine.submit([1, 2], SamplingParams(temperature=0, max_new_tokens=2))
    time.sleep(0.2)
    assert not q.done.is_set()
    engine.continue_generation()
    assert q.result(timeout=30)[0]["meta_info"]["finish_reason"]["type"] == "length"
    # resume the paused trajectory from its token prefix (the protocol's resume_request)
    r = p.resume_request()
    rest = engine.submit(r.input_ids, SamplingParams(temperature=0, max_new_tokens=r.sampling.max_new_tokens))
    assert list(p.output_ids) + rest.result(timeout=60)[0]["output_ids"] == ref


def test_pause_retract_then_continue_finishes_exactly(engine):
    model = build_model(CFG, seed=0)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    refs = [greedy_ref(model, p, 30) for p in prompts]
    hs = [engine.submit(p, SamplingParams(temperature=0, max_new_tokens=30)) for p in prompts]
    wait_tokens(hs[0], 4)
    detail = engine.pause_detail("retract")
    assert {d["finish_reason"] is None for d in detail} == {True} and len(detail) == 2
    assert not engine.scheduler.running and engine.cache.allocator.num_free == engine.cache.num_blocks
    engine.release_memory(["kv_cache"])  # allowed: retracted requests hold no KV
    engine.resume_memory(["kv_cache"])
    engine.continue_generation()
    assert [h.result(timeout=60)[0]["output_ids"] for h in hs] == refs


def test_pause_in_place_blocks_release(engine):
    h = engine.submit([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=3000, ignore_eos=True))
    wait_tokens(h, 2)
    assert engine.pause("in_place") == []
    with pytest.raises(EngineError, match="retract"):
        engine.release_memory(["kv_cache"])
    engine.continue_generation()
    engine.abort(h.request.rid)
    assert h.result(timeout=30)[0]["meta_info"]["finish_reason"]["type"] == "abort"


def test_weight_update_all_or_nothing_and_versioned(engine):
    new_model = build_model(CFG, seed=1)
    new_state = new_model.state_dict()
    prompt = [5, 4, 3, 2]
    before = engine.generate_sglang([prompt], SamplingParams(temperature=0, max_new_tokens=16))[0]["output_ids"]
    with pytest.raises(EngineError, match="begin_weight_update"):
        engine.update_weights([("lm_head.weight", new_state["lm_head.weight"])])
    # a bad session: good tensors then a wrong shape -> nothing applied
    engine.begin_weight_update()
    engine.update_weights(list(new_state.items())[:10])
    with pytest.raises(RequestError, match="shape"):
        engine.update_weights([("lm_head.weight", torch.zeros(3, 3))])
    with pytest.raises(EngineError, match="discarded"):
        engine.end_weight_update()
    assert engine.weight_version == "0"
    assert engine.generate_sglang([prompt], SamplingParams(temperature=0, max_new_tokens=16))[0]["output_ids"] == before
    for bad, match in ((("model.layers.0.self_attn.nope.weight", torch.zeros(1)), "unknown tensor"),
                       (("model.norm.weight", new_state["model.norm.weight"].double()), "dtype")):
        engine.begin_weight_update()
        with pytest.raises(RequestError, match=match):
            engine.update_weights([bad])
        with pytest.raises(EngineError):
            engine.end_weight_update()
    # a good session, in shuffled order, half as named tensors and half as one flattened bucket
    items = list(new_state.items())[::-1]
    engine.begin_weight_update()
    engine.update_weights(items[: len(items) // 2])
    engine.update_weights([FlattenedBucket.pack(items[len(items) // 2:])])
    assert engine.end_weight_update() == "1"
    got = engine.generate_sglang([prompt], SamplingParams(temperature=0, max_new_tokens=16))[0]
    assert got["output_ids"] == greedy_ref(new_model, prompt, 16) and got["meta_info"]["weight_version"] == "1"
    name = "model.layers.2.mlp.experts.3.down_proj.weight"
    assert torch.allclose(torch.tensor(engine.get_weights_by_name(name, 10)), new_state[name].reshape(-1)[:10])


def test_release_and_resume_memory_cycle(engine):
    full = engine.memory_bytes()
    assert full["weights"] > 0 and full["kv_cache"] > 0
    engine.release_memory(None)  # kv_cache, weights, cuda_graph
    mem = engine.memory_bytes()  # all released; a packed-copy cache is kept only for another side of
    # this process (another arena user alive, k2sys.host_arena), and then it is reported
    from k2sys.host_arena import host_arena
    assert mem.pop("packed_parked", 0) == 0 or host_arena().shared()
    assert mem == {"weights": 0, "kv_cache": 0}
    h = engine.submit([1, 2], SamplingParams(temperature=0, max_new_tokens=4))
    time.sleep(0.1)
    assert not h.done.is_set()  # waits while memory is released
    with pytest.raises(EngineError, match="resume"):
        engine.begin_weight_update()
    engine.resume_memory(["weights"])
    engine.begin_weight_update()
    model = build_model(CFG, seed=2)
    engine.update_weights(list(model.state_dict().items()))
    engine.end_weight_update()
    engine.resume_memory(["kv_cache"])
    assert engine.memory_bytes() == full
    assert h.result(timeout=30)[0]["output_ids"] == greedy_ref(model, [1, 2], 4)


def test_stale_weights_abort_with_a_message(engine):
    engine.release_memory(["weights"])
    engine.resume_memory(["weights"])
    out = engine.generate_sglang([[1, 2]], SamplingParams(max_new_tokens=3))[0]
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert "stale" in out["meta_info"]["finish_reason"]["message"]


def test_concurrent_submitters(engine):
    results = {}

    def worker(i):
        results[i] = engine.generate_sglang([[i + 1, i + 2]], SamplingParams(temperature=0, max_new_tokens=6))
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 8 and all(len(r[0]["output_ids"]) == 6 for r in results.values())


def test_bad_requests(engine):
    with pytest.raises(RequestError, match="max_model_len"):
        engine.submit([1] * CFG.max_position_embeddings, SamplingParams())
    with pytest.raises(RequestError, match="token ids"):
        engine.submit([1, 9999], SamplingParams())
    with pytest.raises(RequestError, match="tokenizer"):
        engine.submit(text="hello")
    with pytest.raises(RequestError, match="mode"):
        engine.pause("sideways")


def test_abort_weight_update_discards_a_partial_session(engine):
    """A sender that fails part-way aborts: staged tensors are dropped, weights and version kept."""
    prompt = [7, 8, 9]
    version = engine.weight_version
    before = engine.generate_sglang([prompt], SamplingParams(temperature=0, max_new_tokens=12))[0]["output_ids"]
    other = build_model(CFG, seed=5).state_dict()
    engine.begin_weight_update()
    engine.update_weights(list(other.items())[:20])  # good tensors, but only part of the model
    engine.abort_weight_update()
    assert engine.weight_version == version
    assert engine.generate_sglang([prompt], SamplingParams(temperature=0, max_new_tokens=12))[0]["output_ids"] == before
    engine.begin_weight_update()  # the session is closed: a new one can start
    engine.abort_weight_update()
