"""The engine's oneDNN-packed weight copies after a weight update: deferred off the update's
critical path (ModelRunner.load_weights(pack="defer")), rebuilt on first multi-row use or by the
engine thread when idle, dropped by a release; never a stale copy serving new weights."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
import torch.nn.functional as F

from k2sys import ext

from k2sys.engine.core.config import EngineConfig, SamplingParams
from k2sys.engine.core.engine import NativeEngine
from k2sys.engine.core.model_runner import ModelRunner
from k2sys.models import build_model, k2_tiny, param_shapes

CFG = dataclasses.replace(k2_tiny(vocab_size=512), initializer_range=0.05, eos_token_id=None)


def state_of(seed: int) -> dict[str, torch.Tensor]:
    return {k: v for k, v in build_model(CFG, seed=seed).state_dict().items() if k in param_shapes(CFG)}


def greedy_ref(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(ids)[0, -1].argmax())
            out.append(t)
            ids = torch.cat([ids, torch.tensor([[t]])], 1)
    return out


def kept_packed(r: ModelRunner) -> list:
    return [lin for lin in r.linears if r._keeps_packed(lin)]


def test_deferred_pack_serves_the_new_weights_and_packs_on_first_multi_row_use():
    old, new = state_of(0), state_of(1)
    r = ModelRunner(CFG, old, torch.float32, "cpu", max_positions=64, moe_kernels="torch")
    if not r.packed:
        pytest.skip("no oneDNN packed linears in this torch build")
    eager = ModelRunner(CFG, new, torch.float32, "cpu", max_positions=64, moe_kernels="torch")
    r.load_weights(new, pack="defer")
    lins, ref_lins = kept_packed(r), kept_packed(eager)
    # stale copies: freed, or kept only to be rewritten in place (a shape whose layout k2sys can write)
    assert r.packs_pending and lins and all(lin.pending and (lin.packed is None or lin.layout) for lin in lins)
    g = torch.Generator().manual_seed(0)
    lin, ref = lins[0], ref_lins[0]
    one = torch.randn(1, lin.w.shape[1], generator=g)
    new_w = lin.w
    # one row: the unpacked GEMV (k2sys's C++ GEMV where built, else torch's) over the new weight
    plain = ext.gemv(new_w, one) if lin.gemv else F.linear(one, new_w)
    torch.testing.assert_close(lin(one), plain, rtol=0, atol=0)
    torch.testing.assert_close(lin(one), F.linear(one, new_w), rtol=1e-5, atol=1e-5)
    assert lin.pending
    stale = lin.packed
    x = torch.randn(5, lin.w.shape[1], generator=g)
    got = lin(x)  # first multi-row call packs the new weight, then runs packed
    assert not lin.pending and lin.packed is not None
    assert stale is None or lin.packed is stale  # rewritten in place where it was kept
    assert torch.equal(got, ref(x))  # same packed kernel on the same (new) weight as an eager runner
    torch.testing.assert_close(got, F.linear(x, new_w), rtol=1e-5, atol=1e-5)
    r.pack_pending(2)
    assert sum(lin.pending for lin in lins) == max(0, len(lins) - 3)
    r.pack_pending()
    assert not r.packs_pending and all(lin.packed is not None for lin in lins)
    assert r.weight_bytes == eager.weight_bytes
    with pytest.raises(ValueError, match="pack"):
        r.load_weights(new, pack="later")


def test_release_drops_deferred_packs():
    r = ModelRunner(CFG, state_of(0), torch.float32, "cpu", max_positions=64, moe_kernels="torch")
    if not r.packed:
        pytest.skip("no oneDNN packed linears in this torch build")
    r.load_weights(state_of(1), pack="defer")
    r.release_weights()
    assert not r.packs_pending and all(lin.packed is None and not lin.pending for lin in r.linears)
    assert r.weight_bytes == 0
    r.pack_pending()  # nothing left to build from released storage
    assert all(lin.packed is None for lin in r.linears)


def test_engine_update_defers_packing_and_packs_when_idle():
    eng = NativeEngine.from_model(build_model(CFG, seed=0), EngineConfig(max_total_tokens=4096))
    try:
        if not eng.runner.packed:
            pytest.skip("no oneDNN packed linears in this torch build")
        full = eng.memory_bytes()
        new = build_model(CFG, seed=2)
        for _ in range(2):  # the colocated cycle twice: release, resume, update in place
            eng.release_memory(["kv_cache", "weights"])
            eng.resume_memory(["weights"])
            eng.begin_weight_update()
            eng.update_weights(list(new.state_dict().items()))
            eng.end_weight_update()
            eng.resume_memory(["kv_cache"])
            prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]  # multi-row prefills: packed copies in use
            got = eng.generate_sglang(prompts, SamplingParams(temperature=0, max_new_tokens=6))
            assert [o["output_ids"] for o in got] == [greedy_ref(new, p, 6) for p in prompts]
        # an update while weights are resident (staged, then committed): the idle engine thread packs
        eng.begin_weight_update()
        eng.update_weights(list(new.state_dict().items()))
        eng.end_weight_update()
        t0 = time.monotonic()
        while eng.runner.packs_pending:
            assert time.monotonic() - t0 < 30, "the idle engine never built its deferred packed copies"
            time.sleep(0.01)
        assert all(lin.packed is not None for lin in kept_packed(eng.runner))
        assert eng.memory_bytes() == full
        # released right after an update: the pending copies are dropped, not built from freed memory
        eng.begin_weight_update()
        eng.update_weights(list(new.state_dict().items()))
        eng.end_weight_update()
        eng.release_memory(["weights"])
        assert not eng.runner.packs_pending and eng.memory_bytes()["weights"] == 0
    finally:
        eng.shutdown()
