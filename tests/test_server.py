"""`k2sys serve` over HTTP: SGLang routes and payloads, OpenAI /v1 with the `openai` client,
4xx on bad requests while others keep being served, concurrency, and a clean SIGTERM shutdown."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from k2sys.engine.launch import free_port  # noqa: E402
from k2sys.engine.api.client import HTTPEngine
from k2sys.engine.core.config import EngineConfig
from k2sys.engine.core.engine import NativeEngine
from k2sys.engine.api.protocol import GenerateRequest, SamplingParams
from k2sys.engine.api.server import build_app
from k2sys.models import build_model, k2_tiny, save_hf
from k2sys.tokenizer import default_corpus, render_chat, train_tokenizer

uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("srv")
    tok = train_tokenizer(default_corpus(300), 512, root / "tok")
    cfg = dataclasses.replace(k2_tiny(vocab_size=512), initializer_range=0.05, eos_token_id=None)
    return save_hf(build_model(cfg, seed=4), root / "model", tokenizer=tok)


@pytest.fixture(scope="module")
def server(ckpt):
    engine = NativeEngine.from_pretrained(ckpt, EngineConfig(max_total_tokens=16384, max_model_len=512))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(build_app(engine, str(ckpt)), host="127.0.0.1", port=port, log_level="error"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    yield url, engine
    srv.should_exit = True
    th.join(10)
    engine.shutdown()


def post(url, route, body=None, **kw):
    return httpx.post(url + route, json=body, timeout=60, **kw)


def test_generate_ids_text_batch_and_logprobs(server):
    url, engine = server
    r = post(url, "/generate", {"input_ids": [5, 6, 7], "return_logprob": True, "rid": "a1",
                                "sampling_params": {"temperature": 0, "max_new_tokens": 8}})
    assert r.status_code == 200, r.text
    out = r.json()
    direct = engine.generate_sglang([[5, 6, 7]], engine_params(temperature=0, max_new_tokens=8))[0]
    assert out["output_ids"] == direct["output_ids"] and out["meta_info"]["id"] == "a1"
    assert [row[1] for row in out["meta_info"]["output_token_logprobs"]] == out["output_ids"]
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
    assert out["meta_info"]["prompt_tokens"] == 3 and out["meta_info"]["completion_tokens"] == 8
    r = post(url, "/generate", {"text": ["The weather", "Thank you"], "sampling_params": {"max_new_tokens": 5, "n": 2}})
    outs = r.json()
    assert len(outs) == 4 and all(isinstance(o["text"], str) and len(o["output_ids"]) == 5 for o in outs)


def engine_params(**kw):
    from k2sys.engine.core.config import SamplingParams as Internal

    return Internal(**kw)


def test_stop_string_trims_text(server):
    url, engine = server
    full = post(url, "/generate", {"text": "hello", "sampling_params": {"temperature": 0, "max_new_tokens": 24}}).json()
    text = full["text"]
    stop = text[5:8] if len(text) >= 8 and text[5:8].strip() else None
    if stop is None:
        pytest.skip("greedy text too short for a stop string")
    out = post(url, "/generate", {"text": "hello", "sampling_params": {"temperature": 0, "max_new_tokens": 24,
                                                                       "stop": [stop]}}).json()
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == text[:text.find(stop)]


def test_streaming_generate_is_cumulative(server):
    url, _ = server
    chunks = []
    with httpx.stream("POST", url + "/generate", json={"input_ids": [1, 2, 3], "stream": True, "return_logprob": True,
                                                       "sampling_params": {"temperature": 0, "max_new_tokens": 6}},
                      timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    outs = [json.loads(c) for c in chunks[:-1]]
    assert [len(o["output_ids"]) for o in outs] == [1, 2, 3, 4, 5, 6]
    assert outs[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(o["meta_info"]["finish_reason"] is None for o in outs[:-1])


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "malformed JSON"),
    ({"input_ids": [1], "bogus_field": 1}, 400, "bogus_field"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": -1}}, 400, "max_new_tokens"),
    ({"input_ids": [1] * 600}, 400, "max_model_len"),
    ({"input_ids": [1, 99999]}, 400, "input_ids"),
    ({"text": "hi", "input_ids": [1]}, 400, "exactly one"),
])
def test_bad_generate_requests_get_400(server, body, status, needle):
    url, _ = server
    if isinstance(body, bytes):
        r = httpx.post(url + "/generate", content=body, headers={"content-type": "application/json"})
    else:
        r = post(url, "/generate", body)
    assert r.status_code == status and needle in r.json()["message"], r.text
    assert httpx.get(url + "/health").status_code == 200


def test_weight_update_outside_session_and_bad_payload(server):
    url, _ = server
    from k2sys.engine.api.client import serialize_named_tensors

    payload = {"serialized_named_tensors": [serialize_named_tensors([("model.norm.weight", torch.ones(128))])]}
    r = post(url, "/update_weights_from_tensor", payload)
    assert r.status_code == 400 and "begin_weight_update" in r.json()["message"]
    r = post(url, "/update_weights_from_tensor", {"serialized_named_tensors": ["!!!"]})
    assert r.status_code == 400
    assert post(url, "/end_weight_update", {}).status_code == 400
    assert post(url, "/pause_generation", {"mode": "nope"}).status_code == 400
    assert post(url, "/release_memory_occupation", {"tags": ["gpu"]}).status_code == 400


def test_http_engine_client_colocated_cycle(server, ckpt):
    """The protocol's HTTP client against this server: generate, pause, release, update, resume."""
    url, engine = server
    client = HTTPEngine(url)
    req = GenerateRequest(input_ids=(9, 8, 7), sampling=SamplingParams(temperature=0, max_new_tokens=5),
                          return_logprob=True)
    (before,) = client.generate([req])
    assert before.finish_reason == "length" and len(before.output_logprobs) == 5
    assert client.pause("retract") == []
    client.release_memory(None)
    mem = engine.memory_bytes()  # all released; a packed-copy cache is kept only for another side of
    # this process (another arena user alive, k2sys.host_arena), and then it is reported
    from k2sys.host_arena import host_arena
    assert mem.pop("packed_parked", 0) == 0 or host_arena().shared()
    assert mem == {"weights": 0, "kv_cache": 0}
    client.resume_memory(["weights"])
    new = build_model(engine.model_config, seed=11)
    client.begin_weight_update()
    client.update_weights(list(new.state_dict().items()))
    version = client.end_weight_update()
    client.resume_memory(["kv_cache"])
    client.flush_cache()
    client.continue_generation()
    (after,) = client.generate([req])
    ids = torch.tensor([[9, 8, 7]])
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, new(ids)[:, -1:].argmax(-1)], 1)
    assert list(after.output_ids) == ids[0, 3:].tolist()
    assert after.weight_version == version == engine.weight_version
    got = post(url, "/get_weights_by_name", {"name": "model.norm.weight", "truncate_size": 4}).json()
    assert got == pytest.approx(new.state_dict()["model.norm.weight"][:4].tolist())
    client.close()


def test_openai_client_completions_and_chat(server):
    openai = pytest.importorskip("openai")
    url, engine = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    model = client.models.list().data[0].id
    c = client.completions.create(model=model, prompt="The assistant", max_tokens=6, temperature=0, logprobs=1)
    assert len(c.choices) == 1 and c.usage.completion_tokens == 6 and c.choices[0].finish_reason == "length"
    assert len(c.choices[0].logprobs.token_logprobs) == 6
    parts = list(client.completions.create(model=model, prompt="The assistant", max_tokens=6, temperature=0,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts) == c.choices[0].text
    tools = [{"type": "function", "function": {"name": "add", "description": "add numbers",
                                                "parameters": {"type": "object", "properties": {}}}}]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 2 + 2?"}]
    chat = client.chat.completions.create(model=model, messages=msgs, tools=tools, max_tokens=8, temperature=0, n=2)
    assert len(chat.choices) == 2 and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(engine.encode(render_chat(msgs, tools, add_generation_prompt=True)))
    stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    single = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0)
    assert text == (single.choices[0].message.content or "")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="x", max_tokens=-2)


def test_chat_output_parses_tool_calls(server):
    _, engine = server
    call = {"role": "assistant", "content": "Let me add.",
            "tool_calls": [{"id": "functions.add:0", "type": "function",
                            "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]}
    rendered = render_chat([call])
    generated = rendered.split("<|im_middle|>", 1)[1]
    msg, has_calls = engine.parse_chat_output(generated)
    assert has_calls and msg["content"] == "Let me add."
    assert msg["tool_calls"][0]["function"]["name"] == "add"
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"a": 2, "b": 2}


def test_concurrent_clients(server):
    url, _ = server
    results = [None] * 8

    def one(i):
        results[i] = post(url, "/generate", {"input_ids": [i + 1, 2], "sampling_params": {"max_new_tokens": 10}})
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None and r.status_code == 200 and len(r.json()["output_ids"]) == 10 for r in results)


def test_sigterm_aborts_inflight_and_exits_cleanly(ckpt, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "k2sys.engine.api.server", "--model", str(ckpt), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
            assert proc.poll() is None, proc.stdout.read().decode()
        last = {}
        room = httpx.get(url + "/get_server_info", timeout=10).json()["max_model_len"] - 2  # the longest it may ask

        def stream():
            with httpx.stream("POST", url + "/generate", timeout=60,
                              json={"input_ids": [1, 2], "stream": True,
                                    "sampling_params": {"max_new_tokens": room, "ignore_eos": True}}) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        last["out"] = json.loads(line[6:])
        th = threading.Thread(target=stream)
        th.start()
        while "out" not in last:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        th.join(10)
        assert last["out"]["meta_info"]["finish_reason"]["type"] == "abort"
    finally:
        if proc.poll() is None:
            proc.kill()
