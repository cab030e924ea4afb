"""`k2sys serve` against hostile clients (issue 15): nothing a client sends is a 500, one request's
error fails that request only, work stops when its client leaves, the queue is bounded (429),
huge bodies do not stall the event loop, weight-update sessions time out, an optional API key.

- A barrage of hostile bodies (deep nesting, 5,000-digit numbers, NaN, bad UTF-8, lone surrogates,
  wrong types in every field, out-of-range sampling values, bad bucket metadata on the weight
  routes): each gets the 4xx that names the field; none is a 500; the server then gives the same
  greedy output as before.
- Property-based fuzzing (hypothesis) of the JSON bodies of /generate, /v1/completions and
  /v1/chat/completions: never a 500, never a leaked request.
- A row whose sampling fails aborts its own request only; bad requests sent while a good one runs
  leave its output unchanged.
- A client that disconnects (plain or streamed) has its requests aborted: the engine goes idle.
- Admission: 429 (with Retry-After) when the queue is full, served again once it drains.
- Oversize bodies are a 413; a multi-MB body is parsed while /health keeps answering.
- /generate after release + continue answers at once (503 naming why, or an abort), never hangs.
- A rejected weight update does not abort requests; an abandoned session times out.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import httpx
import pytest
import torch

from k2sys.engine.launch import free_port  # noqa: E402
from k2sys.engine.api.api_fields import CHAT, COMPLETIONS, GENERATE, SAMPLING
from k2sys.engine.core.config import EngineConfig
from k2sys.engine.core.engine import NativeEngine
from k2sys.engine.api.server import ServerOptions, build_app
from k2sys.models import build_model, k2_tiny, save_hf
from k2sys.tokenizer import default_corpus, train_tokenizer

uvicorn = pytest.importorskip("uvicorn")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CTX = 96
GREEDY = {"input_ids": [5, 6, 7], "sampling_params": {"temperature": 0, "max_new_tokens": 6}}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    tok = train_tokenizer(default_corpus(300), 512, root / "tok")
    cfg = dataclasses.replace(k2_tiny(vocab_size=512), initializer_range=0.05, eos_token_id=None)
    return save_hf(build_model(cfg, seed=4), root / "model", tokenizer=tok)


@pytest.fixture(scope="module")
def server(ckpt):
    engine = NativeEngine.from_pretrained(ckpt, EngineConfig(max_total_tokens=4096, max_model_len=CTX,
                                                             max_running_requests=16))
    app = build_app(engine, str(ckpt))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    yield url, engine, app
    srv.should_exit = True
    th.join(10)
    engine.shutdown()


@pytest.fixture
def slow(server):
    """Every forward step takes >= 40 ms, so a request of a few dozen tokens runs for seconds."""
    _, engine, _ = server
    runner = engine.runner
    real = runner.forward_with_prompt_logprobs

    def forward(*a, **kw):
        time.sleep(0.04)
        return real(*a, **kw)
    runner.forward_with_prompt_logprobs = forward
    yield
    del runner.forward_with_prompt_logprobs  # back to the class method


_client = httpx.Client(limits=httpx.Limits(max_connections=32))


def post(url, route, body=None, timeout=60, **kw):
    """POST on a shared keep-alive client (a fresh connection per request costs more than most checks)."""
    if isinstance(body, bytes):
        return _client.post(url + route, content=body, headers={"content-type": "application/json"},
                            timeout=timeout, **kw)
    return _client.post(url + route, json=body, timeout=timeout, **kw)


def idle(engine, admission, timeout=10.0) -> bool:
    """Wait until nothing runs or waits in the engine and the admission holds nothing."""
    end = time.time() + timeout
    while time.time() < end:
        st_ = engine.stats()
        if st_["running"] == 0 and st_["waiting"] == 0 and admission.seqs == 0 and admission.tokens == 0:
            return True
        time.sleep(0.02)
    return False


def _bucket_blob(entries_json: str) -> str:
    """A serialized FlattenedBucket whose entry metadata is `entries_json` (as a hostile client sends)."""
    import base64

    from safetensors.torch import save as st_save

    from k2sys.engine.transport.wire import FlattenedBucket

    blob = st_save({"buffer": torch.zeros(64, dtype=torch.uint8)},
                   metadata={"format": FlattenedBucket.FORMAT, "entries": entries_json})
    return base64.b64encode(blob).decode()


def _nested(depth: int) -> dict:
    v: object = 1
    for _ in range(depth):
        v = {"a": v}
    return v  # type: ignore[return-value]


_FORGED_IPC = {"size": [16], "stride": [1], "offset": 0, "dtype": "uint8", "device": 0, "handle": "AAAA",
               "storage_size_bytes": 16, "storage_offset_bytes": 0, "ref_counter_handle": "AAAA",
               "ref_counter_offset": 0, "event_handle": None, "event_sync_required": False}


def _sp(**kw):
    return {"input_ids": [1, 2, 3], "sampling_params": {"temperature": 0, "max_new_tokens": 2, **kw}}


# (route, body: JSON-able or raw bytes, expected status, text the message must hold)
BARRAGE = [
    ("/generate", b"[" * 100000 + b"]" * 100000, 400, "nested deeper"),
    ("/generate", {**GREEDY, "sampling_params": _nested(80)}, 400, "nested deeper"),
    ("/generate", b'{"input_ids": [' + b"7" * 5000 + b"]}", 400, "5000 characters"),
    ("/generate", b'{"input_ids": [1], "sampling_params": {"temperature": 1e999}}', 400, "float64 range"),
    ("/generate", b'{"input_ids": [1], "sampling_params": {"temperature": NaN}}', 400, "NaN is not JSON"),
    ("/generate", b'{"text": "caf\xe9 \xff"}', 400, "UTF-8"),
    ("/generate", b'{"text": "ab\\ud800cd"}', 400, "text: holds a lone UTF-16 surrogate"),
    ("/generate", b'{"text": "ok", "rid": "\\udfff"}', 400, "rid: holds a lone"),
    ("/generate", b'{"text": "ok", "sampling_params": {"stop": ["x\\ud9ff"]}}', 400, "sampling_params.stop[0]"),
    ("/generate", b'{"text": "ok", "sampling_params": {"\\ud800": 1}}', 400, "sampling_params key: holds a lone"),
    ("/generate", b"", 400, "empty"),
    ("/generate", b"[1, 2]", 400, "JSON object"),
    ("/generate", b'{"input_ids": [1,', 400, "malformed JSON"),
    ("/generate", {**GREEDY, "rid": 5}, 400, "rid"),
    ("/generate", {**GREEDY, "rid": {"a": 1}}, 400, "rid"),
    ("/generate", {**GREEDY, "rid": [1]}, 400, "rid"),
    ("/generate", {"input_ids": [[1, 2], [3, 4]], "rid": ["a", 7]}, 400, "rid"),
    ("/generate", _sp(stop_token_ids="x"), 400, "stop_token_ids"),
    ("/generate", _sp(stop_token_ids=[1.5]), 400, "stop_token_ids"),
    ("/generate", _sp(stop_token_ids=[99999]), 400, "stop_token_ids"),
    ("/generate", _sp(stop_token_ids=[-1]), 400, "stop_token_ids"),
    ("/generate", _sp(stop={"a": 1}), 400, "sampling_params.stop"),
    ("/generate", _sp(stop=[1]), 400, "sampling_params.stop"),
    ("/generate", _sp(top_k=10 ** 20, temperature=1), 400, "top_k"),
    ("/generate", _sp(top_k=1e20, temperature=1), 400, "top_k"),
    ("/generate", _sp(top_k=0), 400, "top_k"),
    ("/generate", _sp(sampling_seed=2 ** 70), 400, "sampling_seed"),
    ("/generate", _sp(seed="7"), 400, "seed"),
    ("/generate", _sp(top_p=0), 400, "top_p"),
    ("/generate", _sp(temperature=-1), 400, "temperature"),
    ("/generate", _sp(temperature="hot"), 400, "temperature"),
    ("/generate", _sp(repetition_penalty=100.0), 400, "repetition_penalty"),
    ("/generate", _sp(logit_bias={"1": 1e30}), 400, "logit_bias"),
    ("/generate", _sp(logit_bias={"x": 1}), 400, "logit_bias"),
    ("/generate", _sp(logit_bias=[1]), 400, "logit_bias"),
    ("/generate", _sp(n=10 ** 9), 400, "n: this call asks for 1000000000 sequences"),
    ("/generate", _sp(n=1.5), 400, "sampling_params.n"),
    ("/generate", _sp(max_new_tokens="8"), 400, "max_new_tokens"),
    ("/generate", _sp(max_new_tokens=-1), 400, "max_new_tokens"),
    ("/generate", _sp(min_new_tokens=5), 400, "min_new_tokens"),
    ("/generate", _sp(ignore_eos="yes"), 400, "ignore_eos"),
    ("/generate", _sp(json_schema={"type": "object"}), 400, "json_schema"),
    ("/generate", _sp(stop_regex="("), 400, "stop_regex"),
    ("/generate", _sp(bogus=1), 400, "bogus"),
    ("/generate", {"input_ids": [[1, 2], [3, "a"]]}, 400, "input_ids[1]"),
    ("/generate", {"input_ids": [[1, 2], 3]}, 400, "input_ids[1]"),
    ("/generate", {"input_ids": [1, True]}, 400, "input_ids"),
    ("/generate", {"input_ids": [1, 99999]}, 400, "vocabulary"),
    ("/generate", {"input_ids": [1] * (CTX + 10)}, 400, "max_model_len"),
    ("/generate", {"input_ids": []}, 400, "input_ids"),
    ("/generate", {"input_ids": "1 2 3"}, 400, "input_ids"),
    ("/generate", {"text": 5}, 400, "text"),
    ("/generate", {"text": ["a", None]}, 400, "text"),
    ("/generate", {"text": "The weather " * 400}, 400, "max_model_len"),
    ("/generate", {**GREEDY, "sampling_params": "abc"}, 400, "sampling_params"),
    ("/generate", {**GREEDY, "sampling_params": [1, 2]}, 400, "sampling_params"),
    ("/generate", {**GREEDY, "stream": "yes"}, 400, "stream"),
    ("/generate", {**GREEDY, "return_logprob": "yes"}, 400, "return_logprob"),
    ("/generate", {**GREEDY, "return_logprob": True, "top_logprobs_num": 10 ** 6}, 400, "top_logprobs_num"),
    ("/generate", {**GREEDY, "return_logprob": True, "logprob_start_len": 10 ** 30}, 400, "logprob_start_len"),
    ("/generate", {**GREEDY, "return_logprob": True, "token_ids_logprob": [10 ** 30]}, 400, "token_ids_logprob"),
    ("/generate", {**GREEDY, "return_logprob": True, "token_ids_logprob": "x"}, 400, "token_ids_logprob"),
    ("/generate", {**GREEDY, "cache_salt": 5}, 400, "cache_salt"),
    ("/generate", {**GREEDY, "return_prompt_token_ids": "yes"}, 400, "return_prompt_token_ids"),
    ("/generate", {**GREEDY, "image_data": "x"}, 400, "image_data"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, "a"]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "vocabulary"),
    ("/v1/completions", b'{"prompt": "\\udc00"}', 400, "prompt: holds a lone"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "a"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 100}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": 5}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "hi", "seed": 2 ** 70}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "rid": 5}, 400, "rid"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"1": 1000}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "n": "2"}, 400, "n: must be int"),
    ("/v1/completions", {"prompt": "hi", "echo": 1}, 400, "echo"),
    ("/v1/chat/completions", {"messages": 5}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [5]}, 400, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": 5, "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image"}]}]}, 400, "content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": 5}, 400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True,
                              "stream_options": "x"}, 400, "stream_options"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 99}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": {"a": 1}}, 400,
     "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": 5}, 400,
     "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": [1]}, 400, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 2000}]}, 400, "max_model_len"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": "x"}, 400, "add_special_tokens"),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "tools": "x"}, 400, "tools"),
    ("/detokenize", {"tokens": [["a"]]}, 400, "tokens[0]"),
    ("/detokenize", {"tokens": [99999]}, 400, "tokens"),
    ("/detokenize", {"tokens": 5}, 400, "tokens"),
    ("/detokenize", {"tokens": [1], "skip_special_tokens": "no"}, 400, "skip_special_tokens"),
    ("/release_memory_occupation", {"tags": 5}, 400, "tags"),
    ("/release_memory_occupation", {"tags": "kv_cache"}, 400, "tags"),
    ("/release_memory_occupation", {"tags": [1]}, 400, "tags"),
    ("/release_memory_occupation", {"tags": {"kv_cache": 1}}, 400, "tags"),
    ("/resume_memory_occupation", {"tags": [None]}, 400, "tags"),
    ("/pause_generation", {"mode": {}}, 400, "mode"),
    ("/abort_request", {"rid": {}}, 400, "rid"),
    ("/abort_request", {"rid": "x", "abort_all": "yes"}, 400, "abort_all"),
    ("/get_weights_by_name", {"name": "model.norm.weight", "truncate_size": "x"}, 400, "truncate_size"),
    ("/get_weights_by_name", {"name": 5}, 400, "name"),
    ("/begin_weight_update", {"selector": "x"}, 400, "selector"),
    ("/continue_generation", b"{", 400, "malformed JSON"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": 5}, 400, "serialized_named_tensors"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": ["!!!"]}, 400, "serialized_named_tensors"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": [5]}, 400, "serialized_named_tensors"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": ["AAAA"], "load_format": "flattened_bucket"}, 400,
     "serialized_named_tensors"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": ["AAAA"], "flush_cache": "yes"}, 400, "flush_cache"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": ["AAAA"], "weight_version": {}}, 400,
     "weight_version"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": ["AAAA"], "load_format": 5}, 400, "load_format"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": [_bucket_blob(json.dumps([
        {"name": "model.norm.weight", "dtype": "float32", "shape": [10 ** 6], "offset": 0}]))],
        "load_format": "flattened_bucket"}, 400, "serialized_named_tensors"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": [_bucket_blob(json.dumps([
        {"name": "w", "dtype": "float99", "shape": [4], "offset": 0}]))], "load_format": "flattened_bucket"}, 400,
     "serialized_named_tensors"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": [_bucket_blob(json.dumps([
        {"name": "w", "dtype": "float32", "shape": [4], "offset": 2}]))], "load_format": "flattened_bucket"},
     400, "serialized_named_tensors"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": [_bucket_blob("not json")],
                                     "load_format": "flattened_bucket"}, 400, "serialized_named_tensors"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": [_bucket_blob(json.dumps([{"name": 5}]))],
                                     "load_format": "flattened_bucket"}, 400, "serialized_named_tensors"),
    ("/update_weights_from_shm", {"entries": 5}, 400, "entries"),
    ("/update_weights_from_shm", {"entries": [5], "shm_size": 64}, 400, "entries[0]"),
    ("/update_weights_from_shm", {"entries": [{"name": 1, "dtype": "float32", "shape": [4], "offset": 0}],
                                  "shm_size": 64}, 400, "entries[0].name"),
    ("/update_weights_from_shm", {"entries": [{"name": "w", "dtype": "float99", "shape": [4], "offset": 0}],
                                  "shm_size": 64}, 400, "entries[0].dtype"),
    ("/update_weights_from_shm", {"entries": [{"name": "w", "dtype": "float32", "shape": [-4], "offset": 0}],
                                  "shm_size": 64}, 400, "entries[0].shape"),
    ("/update_weights_from_shm", {"entries": [{"name": "w", "dtype": "float32", "shape": [1] * 100, "offset": 0}],
                                  "shm_size": 64}, 400, "entries[0].shape"),
    ("/update_weights_from_shm", {"entries": [{"name": "w", "dtype": "float32", "shape": [4], "offset": 2}],
                                  "shm_size": 64}, 400, "entries[0].offset"),
    ("/update_weights_from_shm", {"entries": [{"name": "w", "dtype": "float32", "shape": [4], "offset": 10 ** 12}],
                                  "shm_size": 64}, 400, "outside"),
    ("/update_weights_from_shm", {"entries": [{"name": "w", "dtype": "float32", "shape": [4], "offset": 0,
                                               "evil": 1}], "shm_size": 64}, 400, "entries[0]"),
    ("/update_weights_from_shm", {"entries": [{"name": "w", "dtype": "float32", "shape": [4], "offset": 0}],
                                  "shm_size": "x"}, 400, "shm_size"),
    ("/update_weights_from_shm", {"entries": [{"name": "w", "dtype": "float32", "shape": [4], "offset": 0}],
                                  "shm_size": 64, "transport": 5}, 400, "transport"),
    ("/update_weights_from_shm", {"entries": [{"name": "w", "dtype": "float32", "shape": [4], "offset": 0}],
                                  "shm_size": 64, "shm_name": "../../etc/passwd"}, 400, "shm_name"),
    ("/update_weights_from_shm", {"entries": [{"name": "w", "dtype": "float32", "shape": [4], "offset": 0}],
                                  "shm_size": 64, "release": "x"}, 400, "release"),
    ("/update_weights_from_shm", {"entries": [{"name": "w", "dtype": "float32", "shape": [4], "offset": 0}],
                                  "transport": "cuda_ipc", "cuda_ipc": {"size": "x"}}, 400, "cuda_ipc.size"),
    ("/update_weights_from_shm", {"entries": [{"name": "w", "dtype": "float32", "shape": [4], "offset": 0}],
                                  "transport": "cuda_ipc", "cuda_ipc": _FORGED_IPC}, 400, "cuda_ipc"),
]


def test_hostile_barrage_gets_4xx_naming_the_field_and_the_server_still_serves(server):
    url, engine, app = server
    before = post(url, "/generate", GREEDY).json()["output_ids"]
    bad = []
    for route, body, status, needle in BARRAGE:
        r = post(url, route, body)
        msg = r.json().get("message", "") if r.headers.get("content-type", "").startswith("application/json") else ""
        if r.status_code != status or needle not in msg:
            bad.append((route, str(body)[:60], r.status_code, r.text[:200]))
    assert not bad, "\n".join(map(str, bad))
    # positive controls: the checks do not refuse what is valid
    emoji = post(url, "/generate", b'{"text": "hi \\ud83d\\ude00", "sampling_params": {"max_new_tokens": 2}}')
    assert emoji.status_code == 200, emoji.text
    assert post(url, "/generate", {**GREEDY, "sampling_params": {**GREEDY["sampling_params"], "top_k": 10 ** 6}}
                ).status_code == 200
    assert httpx.get(url + "/health").status_code == 200
    assert post(url, "/generate", GREEDY).json()["output_ids"] == before
    assert idle(engine, app.state.admission)


def test_oversize_bodies_get_413_and_big_bodies_do_not_block_health(server):
    url, engine, app = server
    limits = app.state.json_limits
    app.state.json_limits = dataclasses.replace(limits, max_body_bytes=256 << 10)
    try:
        r = post(url, "/generate", b'{"text": "' + b"a" * (300 << 10) + b'"}')
        assert r.status_code == 413 and "max-body-bytes" in r.json()["message"]
        chunked = (b'{"text": "', *([b"a" * (64 << 10)] * 6), b'"}')  # no Content-Length: counted as it arrives
        r = httpx.post(url + "/generate", content=iter(chunked), timeout=30)
        assert r.status_code == 413
    finally:
        app.state.json_limits = limits
    # a ~12 MB body of token ids is parsed off the event loop: /health keeps answering meanwhile
    big = json.dumps({"input_ids": list(range(2, 500)) * 4000}).encode()
    assert len(big) > 4 * limits.thread_bytes
    result = {}

    def send():
        result["r"] = post(url, "/generate", big)
    th = threading.Thread(target=send)
    with httpx.Client() as probe:
        assert probe.get(url + "/health").status_code == 200
        began = time.perf_counter()
        th.start()
        worst = 0.0
        while th.is_alive():
            t = time.perf_counter()
            assert probe.get(url + "/health", timeout=10).status_code == 200
            worst = max(worst, time.perf_counter() - t)
            time.sleep(0.01)
        th.join()
        took = time.perf_counter() - began
    assert result["r"].status_code == 400 and "max_model_len" in result["r"].json()["message"]
    print(f"big body: {took:.2f} s, slowest /health meanwhile {worst:.3f} s")
    # parsed on the event loop, /health would wait for (nearly) the whole parse
    assert worst < took / 3, f"/health took {worst:.2f} s of the {took:.2f} s the big body took"


def test_kv_budget_is_checked_before_work(server, monkeypatch):
    """A sequence that could outgrow the whole KV cache is refused up front (it would otherwise fail
    mid-run); chat's default max_tokens stays within what the cache holds."""
    url, engine, app = server
    kv = engine.cache.num_blocks * engine.cache.block_size
    monkeypatch.setattr(engine, "max_model_len", 2 * kv)  # a context longer than the cache (the scheduler keeps CTX)
    r = post(url, "/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": kv}})
    assert r.status_code == 400 and "KV cache" in r.json()["message"] and "max_new_tokens" in r.json()["message"]
    r = post(url, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": kv + 5})
    assert r.status_code == 400 and "max_tokens" in r.json()["message"]
    r = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": 0})
    assert r.status_code == 200, r.text
    assert idle(engine, app.state.admission)


def test_failed_sampling_row_aborts_only_its_request(server, monkeypatch):
    url, engine, app = server
    import k2sys.engine.core.scheduler as sched

    good = {"input_ids": [9, 8, 7], "sampling_params": {"temperature": 1.0, "sampling_seed": 11, "max_new_tokens": 12}}
    alone = post(url, "/generate", good).json()["output_ids"]
    real = sched.sample

    def sample(logits, params, seeds, *a, **kw):
        if 666 in seeds:
            raise RuntimeError("poisoned row")
        return real(logits, params, seeds, *a, **kw)
    monkeypatch.setattr(sched, "sample", sample)
    poisoned = {"input_ids": [9, 8, 7], "sampling_params": {"temperature": 1.0, "sampling_seed": 666,
                                                            "max_new_tokens": 12}}
    r = post(url, "/generate", {"input_ids": [[9, 8, 7], [9, 8, 7]],
                                "sampling_params": [good["sampling_params"], poisoned["sampling_params"]]})
    assert r.status_code == 200, r.text
    ok, dead = r.json()
    assert ok["output_ids"] == alone and ok["meta_info"]["finish_reason"]["type"] == "length"
    assert dead["meta_info"]["finish_reason"]["type"] == "abort"
    assert "sampling failed" in dead["meta_info"]["finish_reason"]["message"]
    assert idle(engine, app.state.admission)


def test_failed_forward_aborts_only_the_request_that_breaks_it(server, monkeypatch):
    """A forward pass that raises for one request's tokens fails that request only: the batch is rerun
    one sequence at a time and the others finish with the output they get alone."""
    url, engine, app = server
    good = {"input_ids": [9, 8, 7], "sampling_params": {"temperature": 0, "max_new_tokens": 12}}
    alone = post(url, "/generate", good).json()["output_ids"]
    real = engine.runner.forward_with_prompt_logprobs

    def forward(batch, cache):
        if 66 in batch.input_ids.tolist():
            raise RuntimeError("poisoned forward")
        return real(batch, cache)
    monkeypatch.setattr(engine.runner, "forward_with_prompt_logprobs", forward)
    r = post(url, "/generate", {"input_ids": [[9, 8, 7], [66, 65, 64], [9, 8, 7]],
                                "sampling_params": {"temperature": 0, "max_new_tokens": 12}})
    assert r.status_code == 200, r.text
    first, dead, last = r.json()
    for ok in (first, last):
        assert ok["output_ids"] == alone and ok["meta_info"]["finish_reason"]["type"] == "length"
    assert dead["meta_info"]["finish_reason"]["type"] == "abort"
    assert "forward failed" in dead["meta_info"]["finish_reason"]["message"]
    assert idle(engine, app.state.admission)
    assert post(url, "/generate", good).json()["output_ids"] == alone


def test_max_new_tokens_beyond_the_context_is_refused_unless_defaulted(server):
    """An explicit max_new_tokens that cannot fit the context is a 400 naming it (as SGLang and OpenAI
    refuse it); SGLang's default (128, not given) stops at the context length instead."""
    url, engine, app = server
    prompt = list(range(1, 41))
    r = post(url, "/generate", {"input_ids": prompt, "sampling_params": {"max_new_tokens": CTX - 40 + 1}})
    assert r.status_code == 400 and "max_new_tokens" in r.json()["message"] and str(CTX - 40) in r.json()["message"]
    r = post(url, "/v1/completions", {"prompt": prompt, "max_tokens": CTX})
    assert r.status_code == 400 and "max_tokens" in r.json()["message"]
    r = post(url, "/generate", {"input_ids": prompt, "sampling_params": {"max_new_tokens": CTX - 40,
                                                                          "temperature": 0, "ignore_eos": True}})
    assert r.status_code == 200 and len(r.json()["output_ids"]) == CTX - 40, r.text
    r = post(url, "/generate", {"input_ids": prompt, "sampling_params": {"temperature": 0, "ignore_eos": True}})
    assert r.status_code == 200, r.text
    assert len(r.json()["output_ids"]) == CTX - 40 and r.json()["meta_info"]["finish_reason"]["type"] == "length"
    assert idle(engine, app.state.admission)


def test_bad_requests_during_a_good_one_leave_it_unchanged(server, slow):
    url, engine, app = server
    good = {"input_ids": [4, 3, 2, 1], "sampling_params": {"temperature": 0, "max_new_tokens": 60}}
    box = {}
    th = threading.Thread(target=lambda: box.update(r=post(url, "/generate", good)))
    th.start()
    while engine.stats()["running"] == 0:
        time.sleep(0.01)
    statuses = [post(url, "/generate", _sp(top_k=10 ** 20, temperature=1)).status_code,
                post(url, "/generate", _sp(stop_token_ids=[10 ** 9])).status_code,
                post(url, "/generate", _sp(sampling_seed=2 ** 70)).status_code]
    statuses += [post(url, route, body).status_code for route, body, _, _ in BARRAGE[:25]]
    assert engine.stats()["running"] == 1  # still going after the bad ones were refused
    th.join(60)
    assert all(400 <= s < 500 for s in statuses), statuses
    out = box["r"].json()
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 60}
    direct = engine.generate_sglang([[4, 3, 2, 1]], engine_params(temperature=0, max_new_tokens=60))[0]
    assert out["output_ids"] == direct["output_ids"]


def engine_params(**kw):
    from k2sys.engine.core.config import SamplingParams

    return SamplingParams(**kw)


def test_disconnected_clients_have_their_work_aborted(server, slow):
    url, engine, app = server
    body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 80, "ignore_eos": True, "n": 3}}
    start = engine.stats()["generated_tokens"]
    with pytest.raises(httpx.TimeoutException):
        post(url, "/generate", body, timeout=0.6)
    assert idle(engine, app.state.admission, timeout=3), engine.stats()
    assert engine.stats()["generated_tokens"] - start < 3 * 80  # stopped well before the end
    # streamed: read one event, then hang up
    start = engine.stats()["generated_tokens"]
    with httpx.stream("POST", url + "/generate", json={**body, "stream": True}, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break
    assert idle(engine, app.state.admission, timeout=3), engine.stats()
    assert engine.stats()["generated_tokens"] - start < 3 * 80
    # OpenAI streaming chat, hung up before its first token
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "n": 2, "stream": True}) as r:
        next(r.iter_lines())
    assert idle(engine, app.state.admission, timeout=3), engine.stats()


def test_admission_429_when_full_then_served_again(server, slow):
    url, engine, app = server
    adm = app.state.admission
    old = adm.max_seqs
    adm.max_seqs = 3
    try:
        long = {"input_ids": [1, 2], "rid": "long", "sampling_params": {"max_new_tokens": 60, "ignore_eos": True,
                                                                        "n": 2}}
        th = threading.Thread(target=lambda: post(url, "/generate", long))
        th.start()
        while adm.seqs < 2:
            time.sleep(0.01)
        r = post(url, "/generate", {"input_ids": [3, 4], "sampling_params": {"max_new_tokens": 2, "n": 2}})
        assert r.status_code == 429 and r.headers.get("retry-after") == "1" and "busy" in r.json()["message"]
        r = post(url, "/v1/completions", {"prompt": [3, 4], "max_tokens": 2, "n": 4})
        assert r.status_code == 400 and "n:" in r.json()["message"]  # could never fit: not a retry case
        assert post(url, "/generate", {"input_ids": [3, 4], "sampling_params": {"max_new_tokens": 2}}).status_code == 200
        assert post(url, "/abort_request", {"rid": "long"}).status_code == 200
        th.join(30)
        assert idle(engine, adm)
        r = post(url, "/generate", {"input_ids": [3, 4], "sampling_params": {"max_new_tokens": 2, "n": 2}})
        assert r.status_code == 200
    finally:
        adm.max_seqs = old


def test_generate_after_release_and_continue_answers(server):
    url, engine, app = server
    assert post(url, "/release_memory_occupation", {"tags": ["kv_cache"]}).status_code == 200
    try:
        assert post(url, "/continue_generation", {}).status_code == 200
        r = post(url, "/generate", GREEDY, timeout=10)
        assert r.status_code == 503 and "released" in r.json()["message"]
        # queued while paused, then continued without resuming: answered with an abort naming why
        assert post(url, "/pause_generation", {"mode": "abort"}).status_code == 200
        box = {}
        th = threading.Thread(target=lambda: box.update(r=post(url, "/generate", GREEDY, timeout=10)))
        th.start()
        while engine.stats()["waiting"] == 0:
            time.sleep(0.01)
        assert post(url, "/continue_generation", {}).status_code == 200
        th.join(10)
        reason = box["r"].json()["meta_info"]["finish_reason"]
        assert reason["type"] == "abort" and "released" in reason["message"]
    finally:
        assert post(url, "/resume_memory_occupation", {"tags": ["kv_cache"]}).status_code == 200
        post(url, "/continue_generation", {})
    assert post(url, "/generate", GREEDY).status_code == 200


def test_rejected_weight_update_aborts_nothing(server, slow):
    from k2sys.engine.transport.wire import serialize_named_tensors

    url, engine, app = server
    box = {}
    body = {"input_ids": [1, 2, 3], "sampling_params": {"temperature": 0, "max_new_tokens": 25}}
    th = threading.Thread(target=lambda: box.update(r=post(url, "/generate", body)))
    th.start()
    while engine.stats()["running"] == 0:
        time.sleep(0.01)
    wrong = serialize_named_tensors([("model.norm.weight", torch.ones(3))])  # wrong shape
    r = post(url, "/update_weights_from_tensor", {"serialized_named_tensors": [wrong], "abort_all_requests": True})
    assert r.status_code == 400 and "begin_weight_update" in r.json()["message"]  # no session
    assert post(url, "/begin_weight_update", {}).status_code == 200
    try:
        r = post(url, "/update_weights_from_tensor", {"serialized_named_tensors": [wrong], "abort_all_requests": True})
        assert r.status_code == 400 and "shape" in r.json()["message"]
    finally:
        assert post(url, "/abort_weight_update", {}).status_code == 200
    th.join(60)
    assert box["r"].json()["meta_info"]["finish_reason"] == {"type": "length", "length": 25}


def test_abandoned_weight_update_session_times_out(server):
    url, engine, app = server
    old = engine.weight_update_timeout_s
    engine.weight_update_timeout_s = 0.5
    try:
        assert post(url, "/begin_weight_update", {}).status_code == 200
        r = post(url, "/begin_weight_update", {})
        assert r.status_code == 400 and "already open" in r.json()["message"]  # within the timeout: blocked
        time.sleep(0.7)
        r = post(url, "/end_weight_update", {})  # the sender is back too late
        assert r.status_code == 400 and "discarded after 0.5 s" in r.json()["message"]
        assert post(url, "/begin_weight_update", {}).status_code == 200  # no longer blocked
        assert post(url, "/end_weight_update", {}).status_code == 200
    finally:
        engine.weight_update_timeout_s = old
        post(url, "/abort_weight_update", {})
    assert post(url, "/generate", GREEDY).status_code == 200


def test_api_key(server, ckpt):
    from fastapi.testclient import TestClient

    _, engine, _ = server
    old = engine.weight_update_timeout_s
    try:
        with TestClient(build_app(engine, str(ckpt), ServerOptions(api_key="s3cret"))) as c:
            assert c.get("/health").status_code == 200  # liveness stays open
            r = c.post("/generate", json=GREEDY)
            assert r.status_code == 401 and "Bearer" in r.json()["message"]
            assert c.post("/generate", json=GREEDY, headers={"Authorization": "Bearer nope"}).status_code == 401
            assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
            r = c.post("/generate", json=GREEDY, headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200 and len(r.json()["output_ids"]) == 6
    finally:
        engine.weight_update_timeout_s = old


# ---- property-based fuzzing -------------------------------------------------------------------------
_junk = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.sampled_from([2 ** 63, -2 ** 63 - 1, 10 ** 30])
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
    | st.sampled_from(["\ud800", "a\udfffb", "\u0000", "😀"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)
_small_int = st.integers(-2, 4) | st.sampled_from([10 ** 9, 2 ** 64]) | _junk
_BUDGET = ("max_new_tokens", "max_tokens", "max_completion_tokens", "n", "min_new_tokens", "min_tokens",
           "best_of", "top_logprobs_num", "logprobs", "top_logprobs")


def _field(names):
    return st.sampled_from(sorted(names)).flatmap(
        lambda k: st.tuples(st.just(k), _small_int if k in _BUDGET else _junk))


def _mutated(base: dict, names) -> st.SearchStrategy:
    return st.lists(_field(names), max_size=4).map(lambda kvs: {**base, **dict(kvs)})


def _generate_bodies():
    """A valid body with up to 4 top-level and 4 sampling_params fields set to junk (a junk
    sampling_params replaces the mutated one)."""
    sp = _mutated({"max_new_tokens": 3, "temperature": 0}, SAMPLING)
    return st.tuples(_mutated({"input_ids": [1, 2, 3]}, GENERATE), sp).map(
        lambda t: {**t[0], "sampling_params": t[0].get("sampling_params", t[1])})


def _check_fuzzed(url, engine, app, route, body):
    r = post(url, route, json.dumps(body).encode(), timeout=60)
    assert r.status_code < 500, (route, body, r.text[:300])
    if r.status_code >= 400:
        assert r.json()["message"], r.text
    assert idle(engine, app.state.admission, timeout=20), (route, body, engine.stats())


_FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@_FUZZ
@given(body=st.deferred(_generate_bodies))
def test_fuzz_generate(server, body):
    _check_fuzzed(*server, "/generate", body)


@_FUZZ
@given(body=st.deferred(lambda: _mutated({"prompt": "The weather", "max_tokens": 3, "temperature": 0}, COMPLETIONS)))
def test_fuzz_completions(server, body):
    _check_fuzzed(*server, "/v1/completions", body)


_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "developer"]) | _junk,
                                  "content": st.text(max_size=12) | _junk})


@_FUZZ
@given(body=st.deferred(lambda: st.tuples(
    _mutated({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}, CHAT),
    st.lists(_message, min_size=0, max_size=3), st.booleans()).map(
        lambda t: {**t[0], "messages": t[1]} if t[2] else t[0])))
def test_fuzz_chat(server, body):
    _check_fuzzed(*server, "/v1/chat/completions", body)
