"""k2sys.engine.core.packed_layout: oneDNN's packed linear weights rewritten in place by the C++
packer, checked bit for bit against oneDNN's own packing; and the engine keeping its packed copies
through a colocated weight release (rewritten, never served stale)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from k2sys.engine.core import packed_layout as pl
from k2sys.engine.core.model_runner import PACK_ROWS, ModelRunner, _onednn_linear, _onednn_pack
from k2sys.ext import _C
from k2sys.models import build_model, k2_tiny, param_shapes

pytestmark = pytest.mark.skipif(_onednn_pack is None or pl._pack is None or _C is None,
                                reason="needs torch's oneDNN packed linear ops and the C++ core")

SHAPES = [(1, 1), (7, 5), (64, 64), (65, 17), (100, 30), (352, 512), (768, 192), (129, 1000), (3, 4096),
          (1000, 3), (640, 520)]


def raw(p: torch.Tensor) -> torch.Tensor:
    return pl._read_packed(p).view(torch.int32)


@pytest.mark.parametrize("n,k", SHAPES)
def test_layout_is_found_and_the_cpp_packing_is_bit_identical_to_onednn(n, k):
    lay = pl.layout_for(n, k, PACK_ROWS)
    assert lay is not None, f"no candidate reproduces oneDNN's packing of [{n}, {k}]"
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=g)
    w[0, 0] = float("nan") if n * k > 1 else w[0, 0]  # bits moved, not values: a NaN stays the same NaN
    ref = _onednn_pack(w, PACK_ROWS)
    mine = _onednn_pack(torch.randn(n, k, generator=g), PACK_ROWS)  # a stale copy of another weight
    pl.repack_(mine, w, lay)
    assert torch.equal(raw(mine), raw(ref))
    if n * k > 1:
        w[0, 0] = 0.5
        pl.repack_(mine, w, lay, threads=1)
        ref = _onednn_pack(w, PACK_ROWS)
        assert torch.equal(raw(mine), raw(ref))
        x = torch.randn(5, k, generator=g)
        assert torch.equal(_onednn_linear(x, mine, None, "none", [], ""), _onednn_linear(x, ref, None, "none", [], ""))


def test_row_strided_source():
    base = torch.randn(200, 300)
    w = base[:, 13:13 + 256]  # row stride 300, unit column stride
    lay = pl.layout_for(200, 256, PACK_ROWS)
    mine = _onednn_pack(torch.zeros(200, 256), PACK_ROWS)
    pl.repack_(mine, w, lay)
    assert torch.equal(raw(mine), raw(_onednn_pack(w.contiguous(), PACK_ROWS)))


def test_probe_accepts_only_an_exact_reproduction(monkeypatch):
    # without 64-row blocks among the candidates no layout reproduces oneDNN's buffer: None, not a guess
    lay = pl.layout_for(96, 40, PACK_ROWS)
    assert lay is not None
    monkeypatch.setattr(pl, "_BLOCKS", tuple(b for b in pl._BLOCKS if b != lay.bn))
    monkeypatch.setattr(pl, "_cache", {})
    assert pl.layout_for(96, 40, PACK_ROWS) is None


def test_positions_formula_matches_the_cpp_packer():
    for lay in (pl.BlockedLayout(8, 4, True, True), pl.BlockedLayout(8, 4, False, True),
                pl.BlockedLayout(16, 8, True, False), pl.BlockedLayout(4, 16, False, False)):
        n, k = 21, 13
        w = (torch.arange(n * k, dtype=torch.float32) + 1).view(n, k)
        out = torch.empty(lay.numel(n, k))
        _C.pack_blocked_f32_ptr(out.data_ptr(), w.data_ptr(), n, k, k, lay.bn, lay.bk, lay.n_fastest,
                                lay.outer_n_major, 2)
        assert torch.equal(out.to(torch.int64) - 1, lay.positions(n, k, torch.arange(out.numel())))


def test_bad_arguments_are_errors():
    p = _onednn_pack(torch.randn(64, 32), PACK_ROWS)
    lay = pl.layout_for(64, 32, PACK_ROWS)
    with pytest.raises(ValueError, match="packed tensor"):
        pl.repack_(p, torch.randn(64, 16), lay)
    with pytest.raises(ValueError, match="float32"):
        pl.repack_(p, torch.randn(64, 32, dtype=torch.float64), lay)
    with pytest.raises(ValueError, match="block sizes"):
        _C.pack_blocked_f32_ptr(1, 1, 4, 4, 4, 0, 4, True, True, 1)
    with pytest.raises(ValueError, match="row stride"):
        _C.pack_blocked_f32_ptr(1, 1, 4, 4, 3, 4, 4, True, True, 1)


CFG = dataclasses.replace(k2_tiny(vocab_size=512), initializer_range=0.05)


def state_of(seed: int) -> dict[str, torch.Tensor]:
    return {k: v for k, v in build_model(CFG, seed=seed).state_dict().items() if k in param_shapes(CFG)}


def test_runner_keeps_packed_copies_through_a_release_and_rewrites_them_in_place():
    r = ModelRunner(CFG, state_of(0), torch.float32, "cpu", max_positions=64, moe_kernels="torch")
    if not r.packed:
        pytest.skip("no oneDNN packed linears in this torch build")
    packed = {id(lin): lin.packed for lin in r.linears if lin.packed is not None}
    assert packed and all(lin.layout for lin in r.linears if lin.packed is not None)
    r.release_weights(keep_packed=True)
    assert r.weight_bytes == 0 and r.parked_bytes == sum(p.numel() * 4 for p in packed.values())
    for b in r.bases:  # what the engine's resume does (contents undefined until the update)
        b.untyped_storage().resize_(b.numel() * b.element_size())
    new = state_of(1)
    r.load_weights(new, pack="defer")
    assert r.packs_pending and all(lin.pending for lin in r.linears if id(lin) in packed)
    r.pack_pending()
    assert r.parked_bytes == 0 and not r.packs_pending
    eager = ModelRunner(CFG, new, torch.float32, "cpu", max_positions=64, moe_kernels="torch")
    for lin, ref in zip(r.linears, eager.linears):
        if id(lin) in packed:
            assert lin.packed is packed[id(lin)]  # the same buffer, rewritten
            assert torch.equal(raw(lin.packed), raw(ref.packed))
    assert r.weight_bytes == eager.weight_bytes


def test_colocated_engine_parks_packed_copies_and_serves_the_update():
    from k2sys.engine.core.config import EngineConfig, SamplingParams
    from k2sys.engine.core.engine import NativeEngine
    from k2sys.host_arena import host_arena

    class OtherSide:  # a second arena user in this process (what a colocated trainer's offloader is)
        pass

    other = OtherSide()
    host_arena().release([], user=other)
    eng = NativeEngine.from_model(build_model(CFG, seed=0), EngineConfig(max_total_tokens=2048))
    try:
        if not eng.runner.packed:
            pytest.skip("no oneDNN packed linears in this torch build")
        eng.release_memory(["kv_cache", "weights"])
        assert host_arena().shared()  # the engine and the other side
        mem = eng.memory_bytes()
        assert mem["weights"] == 0 and mem["kv_cache"] == 0 and mem["packed_parked"] > 0
        new = build_model(CFG, seed=3)
        eng.resume_memory(["weights"])
        eng.begin_weight_update()
        eng.update_weights(list(new.state_dict().items()))
        eng.end_weight_update()
        eng.resume_memory(["kv_cache"])
        prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [4, 4]]  # multi-row prefills and batched decode: packed GEMMs
        got = eng.generate_sglang(prompts, SamplingParams(temperature=0, max_new_tokens=5))
        ref = NativeEngine.from_model(new, EngineConfig(max_total_tokens=2048))
        try:
            want = ref.generate_sglang(prompts, SamplingParams(temperature=0, max_new_tokens=5))
        finally:
            ref.shutdown()
        assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
        assert "packed_parked" not in eng.memory_bytes()
    finally:
        eng.shutdown()
        del other


def test_a_shape_without_a_known_layout_keeps_onednns_reorder(monkeypatch):
    from k2sys.engine.core.model_runner import _Linear

    monkeypatch.setattr(pl, "MAX_PROBE_NUMEL", 100)  # too big to probe: no in-place refresh for it
    assert pl.layout_for(64, 32, PACK_ROWS) is None
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 32, generator=g)
    lin = _Linear(w)
    lin.pack()
    first = lin.packed
    assert lin.layout is False and first is not None
    w.copy_(torch.randn(64, 32, generator=g))
    lin.invalidate()
    assert lin.packed is None and lin.pending  # the stale copy is dropped at once
    lin.park()  # a release: nothing to keep for this shape
    assert lin.packed is None and not lin.pending
    lin.invalidate()  # the next update (ModelRunner.load_weights)
    x = torch.randn(3, 32, generator=g)
    torch.testing.assert_close(lin(x), x @ w.T, rtol=1e-5, atol=1e-5)  # repacked from the new weight
    assert lin.packed is not None and lin.packed is not first
