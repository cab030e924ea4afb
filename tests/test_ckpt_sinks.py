"""The one push path into the native engine in this process (NativeEngineSink): one copy from the
trainer's tensors into the engine's own weight storage in the colocated cycle, all-or-nothing
staging while the weights serve, FP8 quantization once per ready group, failures keep the
previous weights and version (or leave them stale, never half-served)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import k2sys.quant
from k2sys.ckpt import Box, LayoutBuilder, TrainerShards, UpdateConfig, update_weights
from k2sys.ckpt.engine_sinks import NativeEngineSink
from k2sys.engine.core.config import EngineConfig, SamplingParams
from k2sys.engine.core.engine import NativeEngine
from k2sys.models import build_model, k2_tiny, param_shapes
from k2sys.quant import quantize_fp8_block_reference

CFG = dataclasses.replace(k2_tiny(vocab_size=256), eos_token_id=None)
GREEDY = SamplingParams(temperature=0, max_new_tokens=8)


def hf_state(seed: int) -> dict[str, torch.Tensor]:
    names = param_shapes(CFG)
    return {n: t for n, t in build_model(CFG, seed=seed).state_dict().items() if n in names}


def trainer_shards(state: dict[str, torch.Tensor]) -> TrainerShards:
    """A Megatron-like trainer rank holding everything: gate|up fused per MLP (fc1), the rest as is,
    so the push reshards (fc1 -> gate_proj + up_proj) on the way."""
    b = LayoutBuilder("trainer", torch.float32)
    tensors = {}
    for n, t in state.items():
        if n.endswith("up_proj.weight"):
            continue
        if n.endswith("gate_proj.weight"):
            up = n.replace("gate_proj", "up_proj")
            fc1 = n.replace("gate_proj.weight", "linear_fc1")
            rows = t.shape[0]
            b.tensor(fc1, (2 * rows, t.shape[1]))
            b.piece(n, t.shape, Box.full(t.shape), fc1, Box((0, 0), tuple(t.shape)))
            b.piece(up, t.shape, Box.full(t.shape), fc1, Box((rows, 0), tuple(t.shape)))
            tensors[fc1] = torch.cat([t, state[up]])
        else:
            b.full(n, t.shape, "trainer." + n, dtype=t.dtype)
            tensors["trainer." + n] = t
    return TrainerShards(b.build(), tensors)


def generate(eng: NativeEngine, prompt=(3, 4, 5)) -> list[int]:
    return eng.generate_sglang([list(prompt)], GREEDY)[0]["output_ids"]


@pytest.fixture
def engine():
    with NativeEngine(hf_state(0), CFG, EngineConfig(max_total_tokens=1024)) as eng:
        yield eng


def test_colocated_push_writes_engine_storage_once(engine):
    new = hf_state(1)
    with NativeEngine(new, CFG, EngineConfig(max_total_tokens=1024)) as ref:
        want = generate(ref)
    sink = NativeEngineSink(engine)
    engine.release_memory(["kv_cache", "weights"])
    engine.resume_memory(["weights"])
    ptrs = {n: t.data_ptr() for n, t in engine.runner.params.items()}
    seen = []
    real_target = engine.weight_target

    def spy(name, dtype, shape):
        t = real_target(name, dtype, shape)
        seen.append((name, t.data_ptr() == ptrs[name]))
        return t
    engine.weight_target = spy
    rep = update_weights(trainer_shards(new), sink, config=UpdateConfig(bucket_bytes=1 << 16))
    del engine.weight_target
    engine.resume_memory(["kv_cache"])
    nbytes = sum(t.numel() * t.element_size() for t in new.values())
    assert all(direct for _, direct in seen) and len(seen) == len(new)  # straight into the live storage
    assert rep.mode == "local" and rep.model_bytes == nbytes and rep.bytes_copied == nbytes  # one copy
    assert rep.version == engine.weight_version == "1" and engine.stats()["stale_tensors"] == 0
    assert all(torch.equal(engine.runner.params[n], t) for n, t in new.items())
    assert generate(engine) == want


def test_live_push_is_staged_and_all_or_nothing(engine):
    before = generate(engine)
    old = {n: t.clone() for n, t in engine.runner.params.items()}

    class FailingSink(NativeEngineSink):
        """A drill: the sink fails after some tensors were written (a sender dying part-way)."""
        calls = 0

        def ready(self, names):
            FailingSink.calls += 1
            if FailingSink.calls == 3:
                raise RuntimeError("drill: sender lost")
            super().ready(names)
    with pytest.raises(RuntimeError, match="drill"):
        update_weights(trainer_shards(hf_state(2)), FailingSink(engine), config=UpdateConfig(bucket_bytes=1 << 14))
    assert engine.weight_version == "0" and all(torch.equal(engine.runner.params[n], t) for n, t in old.items())
    assert generate(engine) == before
    new = hf_state(2)
    rep = update_weights(trainer_shards(new), NativeEngineSink(engine), config=UpdateConfig(bucket_bytes=1 << 14))
    nbytes = sum(t.numel() * t.element_size() for t in new.values())
    assert rep.bytes_copied == 2 * nbytes  # into staging, then staging into the weights at commit
    assert engine.last_update["staged_tensors"] == len(new) and engine.last_update["direct_tensors"] == 0
    assert all(torch.equal(engine.runner.params[n], t) for n, t in new.items())


def test_failed_colocated_push_leaves_weights_stale_not_served(engine):
    engine.release_memory(["kv_cache", "weights"])
    engine.resume_memory(["weights", "kv_cache"])

    class FailingSink(NativeEngineSink):
        calls = 0

        def ready(self, names):
            FailingSink.calls += 1
            if FailingSink.calls == 2:
                raise RuntimeError("drill: sender lost")
            super().ready(names)
    with pytest.raises(RuntimeError, match="drill"):
        update_weights(trainer_shards(hf_state(3)), FailingSink(engine), config=UpdateConfig(bucket_bytes=1 << 14))
    assert engine.weight_version == "0" and engine.stats()["stale_tensors"] == len(engine.runner.params)
    out = engine.generate_sglang([[1, 2]], GREEDY)[0]
    assert out["meta_info"]["finish_reason"]["type"] == "abort" and "stale" in out["meta_info"]["finish_reason"]["message"]
    new = hf_state(3)
    update_weights(trainer_shards(new), NativeEngineSink(engine), config=UpdateConfig(bucket_bytes=1 << 14))
    assert engine.stats()["stale_tensors"] == 0 and len(generate(engine)) == GREEDY.max_new_tokens


def test_unknown_tensor_is_refused_before_any_byte_moves(engine):
    shards = trainer_shards({**hf_state(4), "model.layers.0.self_attn.nope.weight": torch.zeros(2)})
    with pytest.raises(Exception, match="unknown tensor 'model.layers.0.self_attn.nope.weight'"):
        update_weights(shards, NativeEngineSink(engine))
    assert engine.weight_version == "0"
    engine.begin_weight_update()  # no session was left open
    engine.abort_weight_update()


def test_fp8_engine_quantizes_each_ready_group_once(monkeypatch):
    state = hf_state(0)
    calls = []
    real = k2sys.quant.quantize_fp8_blocks

    def counting(ws, *a, **kw):
        calls.append(len(ws))
        return real(ws, *a, **kw)
    with NativeEngine(state, CFG, EngineConfig(max_total_tokens=1024, quantization="fp8")) as eng:
        eng.release_memory(["kv_cache", "weights"])
        eng.resume_memory(["weights", "kv_cache"])
        new = hf_state(5)
        monkeypatch.setattr(k2sys.quant, "quantize_fp8_blocks", counting)
        ready_groups = []
        sink = NativeEngineSink(eng)
        real_ready = sink.ready
        sink.ready = lambda names: (ready_groups.append(list(names)), real_ready(names))[1]
        rep = update_weights(trainer_shards(new), sink, config=UpdateConfig(bucket_bytes=1 << 15))
        monkeypatch.undo()
        linear = [[n for n in g if k2sys.quant.is_fp8_weight_name(n)] for g in ready_groups]
        assert calls == [len(g) for g in linear if g] and len(calls) > 1  # one call per ready group
        p = eng.runner.params
        for n, t in new.items():
            if k2sys.quant.is_fp8_weight_name(n):
                q, s = quantize_fp8_block_reference(t)
                assert torch.equal(p[n].view(torch.uint8), q.view(torch.uint8)), n
                assert torch.equal(p[n + "_scale_inv"], s), n
            else:
                assert torch.equal(p[n], t), n
        assert rep.version == "1" and eng.stats()["stale_tensors"] == 0
