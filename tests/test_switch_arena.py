"""The host arena (k2sys.host_arena) and the colocated switch that goes through it: memory the
released side hands to the resuming side instead of the OS, views kept, nothing refaulted once the
cycle is warm; the trainer's state and the engine's weights bit-identical across several switches."""

from __future__ import annotations

import dataclasses
import gc
import warnings

import pytest
import torch

warnings.filterwarnings("ignore")

from k2sys.host_arena import HostArena  # noqa: E402


class Side:
    """A user of the arena (stands for the trainer or the engine)."""


def _fill(t: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return t.view(-1).view(torch.uint8).copy_(torch.randint(0, 256, (t.numel() * t.element_size(),), generator=g,
                                                            dtype=torch.uint8))


def test_arena_hands_memory_between_sides_keeping_views():
    arena, trainer, engine = HostArena(), Side(), Side()
    a = [torch.empty(1000), torch.empty(300_000), torch.empty(5000, dtype=torch.int64)]  # trainer storages
    b = [torch.empty(200_000), torch.empty(50), torch.empty(7, 9)]  # engine storages, other sizes
    views = [a[1][10:20], b[0][5:9]]  # views must follow their storage wherever its memory goes
    sa, sb = [t.untyped_storage() for t in a], [t.untyped_storage() for t in b]
    na, nb = [s.nbytes() for s in sa], [s.nbytes() for s in sb]
    saved = [_fill(t, i).clone() for i, t in enumerate(a)]
    arena.release(sb, user=engine)
    assert arena.release(sa, user=trainer) == sum(na) and all(s.nbytes() == 0 for s in sa)
    addrs = None
    for cycle in range(4):
        got = arena.resume(sb, nb, user=engine)
        assert got.fresh_bytes == 0 and got.reused_bytes == sum(nb)  # all from the trainer's memory
        for i, t in enumerate(b):
            _fill(t, 100 + cycle + i)
        assert torch.equal(views[1], b[0][5:9]) and views[1].data_ptr() == b[0].data_ptr() + 20
        arena.release(sb, user=engine)
        got = arena.resume(sa, na, user=trainer)
        assert got.fresh_bytes == 0 and got.reused_bytes == sum(na)
        if addrs is not None:  # each storage gets its own previous range back
            assert [s.data_ptr() for s in sa] == addrs
        addrs = [s.data_ptr() for s in sa]
        for t, s in zip(a, saved):
            t.view(-1).view(torch.uint8).copy_(s)
        assert all(torch.equal(t.view(-1).view(torch.uint8), s) for t, s in zip(a, saved))
        assert torch.equal(views[0], a[1][10:20]) and views[0].data_ptr() == a[1].data_ptr() + 40
        arena.release(sa, user=trainer)
    assert arena.stats()["leases"] == 0


def test_arena_alone_gives_memory_back_and_refuses_what_it_does_not_own():
    arena, only = HostArena(), Side()
    t = torch.ones(100_000)
    s = t.untyped_storage()
    arena.release([s], user=only)
    assert arena.stats()["bytes"] == 0  # nobody else in the process to hand it to: freed
    got = arena.resume([s], [400_000], user=only)
    assert got.fresh_bytes == 400_000 and s.nbytes() == 400_000
    with pytest.raises(ValueError, match="resume only what release"):
        arena.resume([s], [400_000], user=only)
    other = Side()
    arena.release([s], user=other)  # a second user: kept now, and the storage is leased on resume
    arena.resume([s], [400_000], user=only)
    with pytest.raises(RuntimeError, match="not resizable"):
        s.resize_(0)  # a leased storage moves only through the arena
    base = torch.zeros(4096, dtype=torch.uint8).untyped_storage()
    with pytest.raises(ValueError, match="belongs to something else"):
        arena.release([base[0:1024]], user=only)  # a slice: its memory is not the storage's to give


def test_arena_frees_chunks_whose_lessees_died_without_release():
    arena, trainer, engine = HostArena(), Side(), Side()
    a, b = torch.empty(1 << 20), torch.empty(1 << 18)
    arena.release([b.untyped_storage()], user=engine)  # alone so far: its memory goes back to the OS
    arena.release([a.untyped_storage()], user=trainer)  # two users now: kept
    assert arena.stats()["bytes"] == 4 << 20
    arena.resume([b.untyped_storage()], [1 << 20], user=engine)  # taken from the trainer's chunk
    assert arena.stats()["leased_bytes"] == 1 << 20 and arena.trim() == 0  # leased: stays
    del b
    gc.collect()
    assert arena.trim() == 4 << 20 and arena.stats()["bytes"] == 0


# ---------------------------------------------------------------- the colocated switch
@pytest.mark.slow
def test_colocated_switches_are_bit_exact_and_stop_refaulting():
    from k2sys.ckpt import TrainerShards, update_weights
    from k2sys.ckpt.engine_sinks import NativeEngineSink
    from k2sys.engine.core.config import EngineConfig, SamplingParams
    from k2sys.engine.core.engine import NativeEngine
    from k2sys.models import build_model, k2_tiny
    from k2sys.trainer.backend import MegatronBackend

    cfg = dataclasses.replace(k2_tiny(vocab_size=256), eos_token_id=None)
    ref = build_model(cfg, seed=0)
    trainer = MegatronBackend.from_model(ref)
    engine = NativeEngine.from_model(ref, EngineConfig(max_total_tokens=512))
    sink = NativeEngineSink(engine)
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    prompt = [[3, 4, 5]]

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        tok = torch.randint(0, 256, (2, 17), generator=g)
        return {"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": torch.ones(2, 16)}

    def state():
        return [t.detach() for t in trainer._state_tensors()]

    try:
        trainer.train_step(batch(0))
        trainer.offload()  # a rollout: the engine owns the memory
        fresh, before = [], None
        for switch in range(3):
            engine.release_memory(["kv_cache", "weights"])  # rollout -> train
            fresh.append(trainer.onload()["fresh_bytes"])
            if before is not None:  # params, grads, optimizer state: as they were before the last offload
                assert all(torch.equal(x, y) for x, y in zip(before, state())), f"switch {switch}: trainer state"
            trainer.train_step(batch(1 + switch))  # the state changes every iteration
            before = [t.clone() for t in state()]
            want = trainer.hf_state_dict()
            trainer.offload()  # train -> rollout
            engine.resume_memory(["weights"])
            tensors, layout = trainer.export_shards()
            update_weights(TrainerShards(layout=layout, tensors=tensors), sink)
            engine.resume_memory(["kv_cache"])
            got = engine.runner.params
            assert all(torch.equal(got[n], want[n].to(got[n].dtype)) for n in want), f"switch {switch}: weights"
            out = engine.generate_sglang(prompt, greedy)[0]["output_ids"]
        assert fresh[1:] == [0, 0]  # warm: the trainer onloads into the memory the engine released
        # an engine that never went through the arena, loaded with the same weights, agrees
        with NativeEngine({n: t.clone() for n, t in want.items()}, cfg, EngineConfig(max_total_tokens=512)) as check:
            assert check.generate_sglang(prompt, greedy)[0]["output_ids"] == out
    finally:
        engine.shutdown()


def test_kv_cache_resumes_zeroed_from_arena_memory():
    from k2sys.engine.core.kv_cache import PagedLatentCache
    from k2sys.host_arena import host_arena

    engine, trainer = Side(), Side()
    other = torch.empty(1 << 16)
    host_arena().release([other.untyped_storage()], user=trainer)  # a second side: parked memory is kept
    cache = PagedLatentCache(num_layers=3, num_blocks=64, block_size=16, latent_dim=96, rope_dim=32,
                             dtype=torch.float32)
    nbytes = 64 * 16 * 128 * 4
    for t in cache.layers:
        t.fill_(float("nan"))  # what the previous owner of the memory leaves behind
    cache.release(user=engine)
    assert cache.nbytes == 0 and cache.released
    cache.resume(user=engine)
    assert all(t.untyped_storage().nbytes() == nbytes for t in cache.layers)
    # block 0 (block tables' padding) at once; every other block as the allocator hands it out
    assert all(int(t[0].count_nonzero()) == 0 for t in cache.layers)
    got = cache.allocator.allocate(5)
    assert all(int(t[got].count_nonzero()) == 0 for t in cache.layers)
    cache.allocator.allocate(64 - 5)
    assert all(int(t.count_nonzero()) == 0 for t in cache.layers)  # every block handed out: no NaN pattern left
    for t in cache.layers:
        t.fill_(float("nan"))
    cache.release(user=engine)
    host_arena().resume([other.untyped_storage()], [1 << 18], user=trainer)
    cache.resume(user=engine)
    cache.allocator.reset()  # e.g. flush_cache: the blocks not yet handed out stay to be zeroed
    cache.allocator.allocate(64)
    assert all(int(t.count_nonzero()) == 0 for t in cache.layers)
