"""Protocol types: validation names the field, SGLang payload round trips, bit-exact tensor payloads."""

from __future__ import annotations

import base64
import json

import pytest
import torch

from k2sys.engine.api.client import (BucketEntry, FlattenedBucket, HTTPEngine, deserialize_named_tensors,
                                 serialize_named_tensors, tensors_from_update)
from k2sys.engine.api.protocol import (MEMORY_TAGS, GenerateOutput, GenerateRequest, InferenceEngine, PausedRequest,
                                   ProtocolError, SamplingParams, UpdateWeightsFromTensorPayload, abort_payload,
                                   colocated_update, memory_payload, pause_payload, validate_tags)


# ------------------------------------------------------------------ validation names the field

@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", 0),
    ("top_k", -2), ("max_new_tokens", -1), ("max_new_tokens", 2.5), ("n", 0), ("sampling_seed", "7"), ("seed", "7"),
    ("stop_token_ids", [-1]), ("stop", [""]),
])
def test_sampling_params_rejects_bad_field(field, value):
    with pytest.raises(ProtocolError, match=field):
        SamplingParams(**{field: value})


def test_generate_request_validation():
    with pytest.raises(ProtocolError, match="input_ids/text"):
        GenerateRequest()
    with pytest.raises(ProtocolError, match="input_ids/text"):
        GenerateRequest(input_ids=[1], text="x")
    with pytest.raises(ProtocolError, match=r"input_ids\[1\]"):
        GenerateRequest(input_ids=[1, -3])
    with pytest.raises(ProtocolError, match="input_ids"):
        GenerateRequest(input_ids=[])
    with pytest.raises(ProtocolError, match="sampling"):
        GenerateRequest(input_ids=[1], sampling={"temperature": 0})
    with pytest.raises(ProtocolError, match="rid"):
        GenerateRequest(rid="", input_ids=[1])
    assert GenerateRequest(input_ids=[1]).rid != GenerateRequest(input_ids=[1]).rid


def test_output_validation():
    with pytest.raises(ProtocolError, match="finish_reason"):
        GenerateOutput(rid="a", finish_reason="done")
    with pytest.raises(ProtocolError, match="output_logprobs"):
        GenerateOutput(rid="a", output_ids=[1, 2], output_logprobs=[-0.1])
    with pytest.raises(ProtocolError, match="completion_tokens"):
        GenerateOutput(rid="a", completion_tokens=-1)


def test_tags():
    assert validate_tags(None) == MEMORY_TAGS
    assert validate_tags(["weights", "kv_cache"]) == ("kv_cache", "weights")  # canonical order
    for bad, match in ((["kv"], "unknown"), ("weights", "string"), ([], "empty")):
        with pytest.raises(ProtocolError, match="tags"):
            validate_tags(bad)
    assert memory_payload(["weights"]) == {"tags": ["weights"]}
    with pytest.raises(ProtocolError, match="mode"):
        pause_payload("stop")
    assert pause_payload("retract") == {"mode": "retract"}
    assert abort_payload("r1") == {"rid": "r1", "abort_all": False}
    assert abort_payload(None) == {"rid": "", "abort_all": True}


# ------------------------------------------------------------------ SGLang payloads

def test_sampling_params_sglang_names_round_trip():
    sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=16, stop="</s>",
                        stop_token_ids=[2], n=4, sampling_seed=11)
    d = sp.to_sglang()
    assert d == {"max_new_tokens": 16, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "n": 4, "stop": ["</s>"],
                 "stop_token_ids": [2], "sampling_seed": 11}
    assert SamplingParams.from_sglang(json.loads(json.dumps(d))) == sp
    with pytest.raises(ProtocolError, match="beam_width"):  # SGLang's, not implemented: off only
        SamplingParams.from_sglang({"beam_width": 4})
    with pytest.raises(ProtocolError, match="bogus"):
        SamplingParams.from_sglang({"bogus": 1})
    assert SamplingParams.from_sglang({"top_k": None}) == SamplingParams()  # null means default, as in SGLang


def test_generate_request_round_trip_single_and_batch():
    req = GenerateRequest(rid="r0", input_ids=[5, 6, 7], sampling=SamplingParams(temperature=0, max_new_tokens=3),
                          return_logprob=True)
    body = req.to_sglang(stream=True)
    assert set(body) == {"rid", "input_ids", "sampling_params", "return_logprob", "stream"} and body["stream"]
    assert GenerateRequest.from_sglang(body) == [req]

    batch = {"text": ["a", "b"], "rid": "job", "sampling_params": [{"max_new_tokens": 2}, {"max_new_tokens": 5}]}
    parsed = GenerateRequest.from_sglang(batch)
    assert [r.rid for r in parsed] == ["job-0", "job-1"]
    assert [r.sampling.max_new_tokens for r in parsed] == [2, 5] and [r.text for r in parsed] == ["a", "b"]
    ids_batch = GenerateRequest.from_sglang({"input_ids": [[1, 2], [3]], "sampling_params": {"n": 2}})
    assert [r.input_ids for r in ids_batch] == [(1, 2), (3,)] and all(r.sampling.n == 2 for r in ids_batch)
    with pytest.raises(ProtocolError, match="sampling_params"):
        GenerateRequest.from_sglang({"text": ["a", "b"], "sampling_params": [{}]})
    with pytest.raises(ProtocolError, match="lora_path"):
        GenerateRequest.from_sglang({"text": "a", "lora_path": "x"})


def test_generate_output_from_sglang_shape():
    # the shape SGLang's tokenizer manager returns for a finished request with return_logprob
    item = {"text": " hi", "output_ids": [11, 12],
            "meta_info": {"id": "r9", "finish_reason": {"type": "stop", "matched": 12}, "prompt_tokens": 4,
                          "completion_tokens": 2, "weight_version": "default", "cached_tokens": 0,
                          "output_token_logprobs": [[-0.5, 11, None], [-1.25, 12, None]]}}
    out = GenerateOutput.from_sglang(item)
    assert out == GenerateOutput(rid="r9", output_ids=(11, 12), text=" hi", output_logprobs=(-0.5, -1.25),
                                 finish_reason="stop", prompt_tokens=4, completion_tokens=2,
                                 weight_version="default", matched_stop=12)
    assert GenerateOutput.from_sglang(out.to_sglang()) == out
    length = GenerateOutput(rid="x", output_ids=[1], finish_reason="length", completion_tokens=1)
    assert length.to_sglang()["meta_info"]["finish_reason"] == {"type": "length", "length": 1}
    running = GenerateOutput.from_sglang({"text": "", "output_ids": [], "meta_info": {"id": "s",
                                                                                       "finish_reason": None}})
    assert not running.finished
    with pytest.raises(ProtocolError, match="meta_info"):
        GenerateOutput.from_sglang({"text": "x"})


def test_paused_request_resumes_from_prefix():
    req = GenerateRequest(rid="p", input_ids=[1, 2, 3], sampling=SamplingParams(max_new_tokens=10, sampling_seed=3, n=2),
                          return_logprob=True)
    out = GenerateOutput(rid="p-1", output_ids=[7, 8, 9], output_logprobs=[-1, -2, -3], finish_reason="abort",
                         weight_version="4")
    paused = PausedRequest.from_output(req, out)
    nxt = paused.resume_request()
    assert nxt.input_ids == (1, 2, 3, 7, 8, 9) and nxt.rid == "p-1"
    assert nxt.sampling.max_new_tokens == 7 and nxt.sampling.n == 1 and nxt.sampling.sampling_seed == 3
    assert PausedRequest.from_json(json.loads(json.dumps(paused.to_json()))) == paused
    done = PausedRequest(rid="q", input_ids=[1], output_ids=[2, 3], sampling=SamplingParams(max_new_tokens=2))
    with pytest.raises(ProtocolError, match="output_ids"):
        done.resume_request()
    with pytest.raises(ProtocolError, match="input_ids"):
        PausedRequest.from_output(GenerateRequest(text="hi"), out)


def test_update_payload_round_trip():
    p = UpdateWeightsFromTensorPayload(serialized_named_tensors=["QUJD", "QUJD"], load_format="flattened_bucket",
                                       flush_cache=False, weight_version="3")
    d = p.to_sglang()
    assert set(d) == {"serialized_named_tensors", "load_format", "flush_cache", "abort_all_requests", "weight_version"}
    assert UpdateWeightsFromTensorPayload.from_sglang(d) == p
    with pytest.raises(ProtocolError, match="load_format"):
        UpdateWeightsFromTensorPayload(serialized_named_tensors=["QUJD"], load_format="direct")
    with pytest.raises(ProtocolError, match="serialized_named_tensors"):
        UpdateWeightsFromTensorPayload(serialized_named_tensors=[])


# ------------------------------------------------------------------ tensors, bit for bit

def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _zoo() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    f32 = torch.randn(5, 7, generator=g)
    f32[0, 0] = float("nan")  # bitwise, not numeric, equality
    return [
        ("z.last_alphabetically", torch.randn(3, generator=g)),
        ("model.embed_tokens.weight", f32),
        ("bf16.transposed", torch.randn(4, 6, generator=g).to(torch.bfloat16).t()),  # non-contiguous
        ("fp16", torch.randn(2, 3, 2, generator=g).half()),
        ("fp8", torch.randn(9, generator=g).to(torch.float8_e4m3fn)),
        ("f64.scalar", torch.tensor(3.25, dtype=torch.float64)),
        ("i64", torch.randint(-2**40, 2**40, (3,), generator=g)),
        ("i8", torch.randint(-128, 127, (5,), generator=g, dtype=torch.int8)),
        ("u8", torch.randint(0, 255, (3, 3), generator=g, dtype=torch.uint8)),
        ("bool", torch.tensor([True, False, True])),
        ("empty", torch.zeros(0, 4, dtype=torch.bfloat16)),
    ]


def _assert_same(got, want):
    assert [n for n, _ in got] == [n for n, _ in want]  # order kept
    for (n, a), (_, b) in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, n
        assert _bits(a) == _bits(b), n


def test_named_tensors_round_trip_bitwise():
    zoo = _zoo()
    base = torch.arange(12, dtype=torch.float32)
    zoo += [("tied.a", base[:6].view(2, 3)), ("tied.b", base[6:])]  # views sharing one storage
    payload = serialize_named_tensors(zoo)
    assert isinstance(payload, str)
    _assert_same(deserialize_named_tensors(payload), zoo)
    with pytest.raises(ProtocolError, match="duplicate"):
        serialize_named_tensors([("a", base), ("a", base)])
    with pytest.raises(ProtocolError, match="serialized_named_tensors"):
        deserialize_named_tensors("not base64!")
    with pytest.raises(ProtocolError, match="serialized_named_tensors"):  # an SGLang pickle payload
        deserialize_named_tensors(base64.b64encode(b"\x80\x05junk" + b"\x00" * 8).decode())


def test_flattened_bucket_round_trip_bitwise():
    zoo = _zoo()
    bucket = FlattenedBucket.pack(zoo, alignment=64)
    assert len(bucket) == len(zoo) and bucket.names == [n for n, _ in zoo]
    assert all(e.offset % 64 == 0 for e in bucket.entries)
    ends = [e.offset + e.nbytes for e in bucket.entries]
    assert bucket.nbytes >= max(ends) and bucket.nbytes < max(ends) + 64
    unpacked = bucket.unpack()
    _assert_same(unpacked, zoo)
    lo, hi = bucket.buffer.data_ptr(), bucket.buffer.data_ptr() + bucket.nbytes
    assert all(lo <= t.data_ptr() < hi for _, t in unpacked if t.numel())  # zero-copy views
    again = FlattenedBucket.deserialize(bucket.serialize())
    _assert_same(again.unpack(), zoo)
    _assert_same(deserialize_named_tensors(bucket.serialize()), zoo)


def test_flattened_bucket_rejects_bad_layout():
    buf = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(ProtocolError, match="entries"):
        FlattenedBucket(buf, [BucketEntry(name="w", dtype=torch.float32, shape=(2,), offset=2)])  # misaligned
    with pytest.raises(ProtocolError, match="entries"):
        FlattenedBucket(buf, [BucketEntry(name="w", dtype=torch.float32, shape=(5,), offset=0)])  # overflows
    with pytest.raises(ProtocolError, match="buffer"):
        FlattenedBucket(torch.zeros(4), [])
    with pytest.raises(ProtocolError, match="alignment"):
        FlattenedBucket.pack([("a", torch.ones(1))], alignment=24)
    with pytest.raises(ProtocolError, match="flattened bucket"):
        FlattenedBucket.deserialize(serialize_named_tensors([("a", torch.ones(1))]))


def test_tensors_from_update_both_formats():
    zoo = _zoo()[:4]
    named = UpdateWeightsFromTensorPayload(serialized_named_tensors=[serialize_named_tensors(zoo)])
    _assert_same(tensors_from_update(named), zoo)
    bucket = UpdateWeightsFromTensorPayload(serialized_named_tensors=[FlattenedBucket.pack(zoo).serialize()] * 2,
                                            load_format="flattened_bucket")
    _assert_same(tensors_from_update(bucket, tp_rank=1), zoo)


# ------------------------------------------------------------------ the protocol and the colocated order

class RecordingEngine:
    """A fake InferenceEngine for this test only: records the calls it receives."""

    def __init__(self, fail_on_update: bool = False):
        self.calls: list[tuple] = []
        self.fail_on_update = fail_on_update

    def generate(self, requests):
        return []

    async def async_generate(self, requests):
        return []

    def abort(self, rid=None):
        self.calls.append(("abort", rid))

    def pause(self, mode="abort"):
        self.calls.append(("pause", mode))
        return [PausedRequest(rid="p", input_ids=[1])]

    def continue_generation(self):
        self.calls.append(("continue",))

    def release_memory(self, tags=None):
        self.calls.append(("release", validate_tags(tags)))

    def resume_memory(self, tags=None):
        self.calls.append(("resume", validate_tags(tags)))

    def begin_weight_update(self):
        self.calls.append(("begin",))

    def update_weights(self, weights, *, weight_version=None):
        if self.fail_on_update:
            raise RuntimeError("bad shape")
        self.calls.append(("update", [n for n, _ in weights] if isinstance(weights[0], tuple)
                           else [b.names for b in weights]))

    def end_weight_update(self):
        self.calls.append(("end",))
        return "7"

    def flush_cache(self):
        self.calls.append(("flush",))

    def health(self):
        return True

    @property
    def weight_version(self):
        return "7"


def test_colocated_update_order():
    eng = RecordingEngine()
    assert isinstance(eng, InferenceEngine) and isinstance(HTTPEngine("http://127.0.0.1:1"), InferenceEngine)
    bucket = FlattenedBucket.pack([("c", torch.ones(2))])
    paused, version = colocated_update(
        eng, lambda: [("a", torch.ones(1)), [("b", torch.ones(1)), ("b2", torch.ones(1))], bucket],
        train_step=lambda: eng.calls.append(("train",)))
    assert version == "7" and [p.rid for p in paused] == ["p"]
    assert eng.calls == [
        ("pause", "abort"), ("release", MEMORY_TAGS), ("train",), ("resume", ("weights",)), ("begin",),
        ("update", ["a"]), ("update", ["b", "b2"]), ("update", [["c"]]), ("end",),
        ("resume", ("kv_cache", "cuda_graph")), ("flush",), ("continue",)]


def test_colocated_update_closes_session_on_failure():
    eng = RecordingEngine(fail_on_update=True)
    with pytest.raises(RuntimeError, match="bad shape"):
        colocated_update(eng, [("a", torch.ones(1))])
    assert eng.calls[-1] == ("end",)  # the session is not left open
