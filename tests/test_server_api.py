"""`k2sys serve` speaks what real clients send (issue 14).

- The field tables (k2sys.engine.api.api_fields) cover every field of SGLang 0.5.23's GenerateReqInput,
  SamplingParams, CompletionRequest, ChatCompletionRequest and of the `openai` package's create
  params; docs/engine_api.md holds the same tables; every "off only" field is accepted at its off
  value and refused with a 400 naming it otherwise; unknown fields are refused.
- /generate logprob fields (prompt log-probs equal transformers'), batch forms, cache_salt,
  return_prompt_token_ids, stream_interval; /tokenize, /detokenize, /server_info, /model_info, /v1/models.
- The `openai` client: completions echo + logprobs (equal transformers'), logprobs=k alternatives,
  logit_bias, penalties, response_format; chat content parts, role developer, OpenAI `call_...` ids
  in the history, tool_choice named / required, top_logprobs.
- SGLang's own frontend (`sgl.gen`, `sgl.select` through RuntimeEndpoint), select's scores equal
  to transformers'.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from k2sys.engine.api.api_fields import CHAT, COMPLETIONS, GENERATE, OFF_ONLY, SAMPLING, markdown_tables
from k2sys.engine.core.config import EngineConfig
from k2sys.engine.core.engine import NativeEngine
from k2sys.engine.api.server import build_app
from k2sys.models import build_model, k2_tiny, save_hf
from k2sys.tokenizer import default_corpus, train_tokenizer

uvicorn = pytest.importorskip("uvicorn")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "add two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a", "b"],
    "additionalProperties": False}}},
         {"type": "function", "function": {"name": "weather", "description": "weather in a city", "parameters": {
             "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"],
             "additionalProperties": False}}}]


# ---- the field tables ----------------------------------------------------------------------------
def _sglang_file(rel: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec("sglang")
    if spec is None:
        pytest.skip("sglang is not installed (pip install sglang==0.5.23 --no-deps)")
    return (Path(list(spec.submodule_search_locations)[0]) / rel).read_text()


def _class_fields(source: str, cls: str) -> list[str]:
    import ast

    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return [n.target.id for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
                    and not n.target.id.startswith("_")]  # private attributes are not request fields
    raise AssertionError(f"{cls} not found")


def test_tables_cover_every_sglang_and_openai_field():
    generate = _class_fields(_sglang_file("srt/managers/io_struct.py"), "GenerateReqInput")
    assert len(generate) > 60 and set(generate) <= set(GENERATE), sorted(set(generate) - set(GENERATE))
    sampling = _class_fields(_sglang_file("srt/sampling/sampling_params.py"), "SamplingParams")
    internal = {"stop_strs", "stop_regex_strs", "stop_str_max_len", "stop_regex_max_len", "is_normalized",
                "ebnf_full_assistant"}  # "Internal fields (populated by normalize(), not API-facing)"
    api = set(sampling) - internal
    assert "repetition_penalty" in api and api <= set(SAMPLING), sorted(api - set(SAMPLING))
    proto = _sglang_file("srt/entrypoints/openai/protocol.py")
    pd = set(_class_fields(proto, "PDRoutingFields"))
    for cls, table in (("CompletionRequest", COMPLETIONS), ("ChatCompletionRequest", CHAT)):
        fields = set(_class_fields(proto, cls)) | pd
        assert fields <= set(table), (cls, sorted(fields - set(table)))
    from openai.types import completion_create_params as c
    from openai.types.chat import completion_create_params as cc

    assert set(c.CompletionCreateParamsBase.__annotations__) | {"stream"} <= set(COMPLETIONS)
    assert set(cc.CompletionCreateParamsBase.__annotations__) | {"stream"} <= set(CHAT)


def test_docs_hold_the_same_tables():
    doc = (REPO / "docs" / "engine_api.md").read_text()
    assert markdown_tables() in doc, "docs/engine_api.md is out of date: paste k2sys.engine.api.api_fields.markdown_tables()"


# ---- the server ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    tok = train_tokenizer(default_corpus(300), 512, root / "tok")
    cfg = dataclasses.replace(k2_tiny(vocab_size=512), initializer_range=0.05, eos_token_id=None)
    return save_hf(build_model(cfg, seed=14), root / "model", tokenizer=tok)


@pytest.fixture(scope="module")
def hf(ckpt):
    return transformers.DeepseekV3ForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def server(ckpt):
    import socket

    engine = NativeEngine.from_pretrained(ckpt, EngineConfig(max_total_tokens=16384, max_model_len=512))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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


def post(url: str, route: str, body: dict) -> httpx.Response:
    return httpx.post(url + route, json=body, timeout=120)


def ref_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def text(engine, t: int) -> str:
    """OpenAI logprob token text: UTF-8, or one character per byte for a piece of a character."""
    raw = engine.token_bytes(int(t))
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def not_off(spec) -> object:
    """A value that is not one of the field's off values."""
    if False in spec.off:
        return True
    if 0 in spec.off and not any(isinstance(o, bool) for o in spec.off):
        return 3
    if [] in spec.off:
        return ["x"]
    if {} in spec.off:
        return {"a": 1}
    return "x"


def _off_cases(table):
    return [(name, spec) for name, spec in sorted(table.items()) if spec.status == OFF_ONLY]


def test_off_only_fields_accepted_off_and_refused_otherwise(server):
    url, _ = server
    base = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 1}}
    for name, spec in _off_cases(GENERATE):
        for off in spec.off:
            r = post(url, "/generate", {**base, name: off})
            assert r.status_code == 200, (name, off, r.text)
        r = post(url, "/generate", {**base, name: not_off(spec)})
        assert r.status_code == 400 and name in r.json()["message"], (name, r.text)
    for name, spec in _off_cases(SAMPLING):
        for off in spec.off:
            r = post(url, "/generate", {"input_ids": [5], "sampling_params": {"max_new_tokens": 1, name: off}})
            assert r.status_code == 200, (name, off, r.text)
        r = post(url, "/generate", {"input_ids": [5], "sampling_params": {"max_new_tokens": 1, name: not_off(spec)}})
        assert r.status_code == 400 and name in r.json()["message"], (name, r.text)
    for route, table, body in (("/v1/completions", COMPLETIONS, {"prompt": "The", "max_tokens": 1}),
                               ("/v1/chat/completions", CHAT,
                                {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})):
        for name, spec in _off_cases(table):
            for off in spec.off:
                r = post(url, route, {**body, name: off})
                assert r.status_code == 200, (route, name, off, r.text)
            r = post(url, route, {**body, name: not_off(spec)})
            assert r.status_code == 400 and name in r.json()["message"], (route, name, r.text)
    for route, body in (("/generate", {**base, "bogus": 1}), ("/v1/completions", {"prompt": "x", "bogus": 1}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "bogus": 1}),
                        ("/generate", {"input_ids": [1], "sampling_params": {"bogus": 1}})):
        r = post(url, route, body)
        assert r.status_code == 400 and "bogus" in r.json()["message"], (route, r.text)


def test_sglang_frontend_defaults_are_accepted(server):
    """What sgl.gen sends by default (stop_regex=[], penalties 0, regex/json_schema null)."""
    url, _ = server
    sp = {"skip_special_tokens": True, "spaces_between_special_tokens": True, "max_new_tokens": 3, "min_new_tokens": 0,
          "n": 1, "stop": [], "stop_token_ids": [], "stop_regex": [], "temperature": 0, "top_p": 1.0, "top_k": -1,
          "min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "ignore_eos": False, "regex": None,
          "json_schema": None}
    r = post(url, "/generate", {"text": "The weather", "sampling_params": sp, "return_logprob": None,
                                "logprob_start_len": None, "top_logprobs_num": None, "return_text_in_logprobs": None})
    assert r.status_code == 200, r.text


def test_generate_logprob_fields(server, hf):
    url, engine = server
    ids = engine.encode("The weather today is sunny with a light wind")
    ref = ref_logprobs(hf, ids)
    r = post(url, "/generate", {"input_ids": ids, "return_logprob": True, "logprob_start_len": 2,
                                "top_logprobs_num": 2, "token_ids_logprob": [5, 9], "return_text_in_logprobs": True,
                                "return_prompt_token_ids": True,
                                "sampling_params": {"temperature": 0, "max_new_tokens": 3}})
    assert r.status_code == 200, r.text
    out = r.json()
    meta = out["meta_info"]
    assert out["prompt_token_ids"] == ids
    rows = meta["input_token_logprobs"]
    assert [t for _, t, _ in rows] == ids[2:] and rows[0][0] is None
    assert all(text == engine.decode_token(t) for _, t, text in rows)
    for p, (lp, t, _) in zip(range(2, len(ids) - 1), rows[1:]):
        assert abs(lp - ref[p, t].item()) <= 1e-4
    assert meta["input_top_logprobs"][0] is None and len(meta["input_top_logprobs"]) == len(rows)
    assert [t for _, t, _ in meta["input_top_logprobs"][1]] == ref[2].topk(2).indices.tolist()
    assert [[t for _, t, _ in row] for row in meta["input_token_ids_logprobs"][1:]] == [[5, 9]] * (len(rows) - 1)
    assert meta["output_token_logprobs_length"] == 3 and len(meta["output_top_logprobs"]) == 3
    assert [t for _, t, _ in meta["output_token_logprobs"]] == out["output_ids"]
    # batched: per-prompt logprob_start_len and token_ids_logprob lists
    r = post(url, "/generate", {"input_ids": [ids, ids[:5]], "return_logprob": [True, True],
                                "logprob_start_len": [0, 3], "token_ids_logprob": [[1], [2, 3]],
                                "sampling_params": {"max_new_tokens": 0}})
    a, b = r.json()
    assert len(a["meta_info"]["input_token_logprobs"]) == len(ids) and len(b["meta_info"]["input_token_logprobs"]) == 2
    assert [t for _, t, _ in b["meta_info"]["input_token_ids_logprobs"][1]] == [2, 3]
    assert a["output_ids"] == [] and a["meta_info"]["finish_reason"]["type"] == "length"
    # no return_logprob: asking for prompt log-probs is an error, not silently nothing
    r = post(url, "/generate", {"input_ids": ids, "logprob_start_len": 0})
    assert r.status_code == 400 and "logprob_start_len" in r.json()["message"]


def test_cache_salt_and_stream_interval(server):
    url, _ = server
    ids = list(range(3, 60))
    body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 2}}
    post(url, "/generate", {**body, "cache_salt": "alice"})
    same = post(url, "/generate", {**body, "cache_salt": "alice"}).json()
    other = post(url, "/generate", {**body, "cache_salt": "bob"}).json()
    keyed = post(url, "/generate", {**body, "extra_key": "alice"}).json()
    assert same["meta_info"]["cached_tokens"] == 48 and other["meta_info"]["cached_tokens"] == 0
    assert keyed["meta_info"]["cached_tokens"] == 0 and same["output_ids"] == other["output_ids"]
    chunks = []
    with httpx.stream("POST", url + "/generate", timeout=60, json={
            "input_ids": [1, 2, 3], "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": 7, "stream_interval": 3}}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    assert [len(c["output_ids"]) for c in chunks] == [3, 6, 7]


def test_tokenize_detokenize_and_info_routes(server, ckpt):
    url, engine = server
    text = "The weather is sunny"
    r = post(url, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert r["tokens"] == engine.encode(text) and r["count"] == len(r["tokens"]) and r["max_model_len"] == 512
    many = post(url, "/tokenize", {"prompt": [text, "Thank you"]}).json()
    assert many["count"] == [len(t) for t in many["tokens"]]
    chat = post(url, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == engine.render_chat([{"role": "user", "content": "hi"}], None)
    assert post(url, "/detokenize", {"tokens": r["tokens"]}).json()["text"] == text
    assert post(url, "/detokenize", {"tokens": [r["tokens"], r["tokens"][:1]]}).json()["text"][0] == text
    assert post(url, "/detokenize", {"tokens": [99999]}).status_code == 400
    for route in ("/model_info", "/get_model_info"):
        info = httpx.get(url + route).json()
        assert info["model_path"] == str(ckpt) and info["is_generation"] is True
        assert info["served_model_name"] == "k2sys-native" and info["weight_version"] == engine.weight_version
    for route in ("/server_info", "/get_server_info"):
        info = httpx.get(url + route).json()
        assert info["max_total_num_tokens"] == 16384 and info["context_length"] == 512
    models = httpx.get(url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "k2sys-native"
    assert models["data"][0]["root"] == "k2sys-native" and models["data"][0]["max_model_len"] == 512


# ---- OpenAI clients ------------------------------------------------------------------------------
def test_openai_completions_echo_logprobs_and_options(server, hf):
    openai = pytest.importorskip("openai")
    url, engine = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    prompt = "The meeting has been moved to Thursday"
    ids = engine.encode(prompt)
    ref = ref_logprobs(hf, ids)
    c = client.completions.create(model="m", prompt=prompt, max_tokens=1, temperature=0, logprobs=2, echo=True)
    lp = c.choices[0].logprobs
    assert c.choices[0].text.startswith(prompt)
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for p in range(len(ids) - 1):
        assert abs(lp.token_logprobs[p + 1] - ref[p, ids[p + 1]].item()) <= 1e-4
        top = lp.top_logprobs[p + 1]
        want = {text(engine, t): v for v, t in zip(*ref[p].topk(2))}
        assert all(abs(top[k] - v.item()) <= 1e-4 for k, v in want.items())  # top-2 (+ the prompt token)
        assert len(top) <= 3
    # max_tokens=0 with echo: the prompt's log-probs only
    z = client.completions.create(model="m", prompt=[ids], max_tokens=0, logprobs=0, echo=True)
    assert len(z.choices[0].logprobs.token_logprobs) == len(ids) and z.usage.completion_tokens == 0
    # logprobs=2 without echo: two alternatives per generated token (+ the chosen one)
    g = client.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0, logprobs=2)
    assert all(2 <= len(t) <= 3 for t in g.choices[0].logprobs.top_logprobs)
    # logit_bias (OpenAI's token-id keys), penalties
    forced_tok = ids[0]
    b = client.completions.create(model="m", prompt=prompt, max_tokens=3, temperature=1.0, seed=1,
                                  logit_bias={str(forced_tok): 100})
    assert b.choices[0].text == engine.detokenize([forced_tok] * 3)
    plain = client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0)
    pen = client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0, frequency_penalty=2.0,
                                    presence_penalty=1.0)
    assert pen.choices[0].text != plain.choices[0].text
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model="m", prompt=prompt, max_tokens=1, logit_bias={"5": 200})
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model="m", prompt=prompt, max_tokens=1, suffix="!")
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model="m", prompt=prompt, max_tokens=1, best_of=3)


def test_openai_response_format_json_schema(server):
    openai = pytest.importorskip("openai")
    pytest.importorskip("xgrammar")
    jsonschema = pytest.importorskip("jsonschema")
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    schema = {"type": "object", "properties": {"day": {"type": "string", "enum": ["Mon", "Tue"]},
                                               "hour": {"type": "integer", "minimum": 0, "maximum": 23}},
              "required": ["day", "hour"], "additionalProperties": False}
    chat = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "When?"}], max_tokens=60, temperature=1.0, seed=4, n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "when", "schema": schema}})
    for ch in chat.choices:
        jsonschema.validate(json.loads(ch.message.content), schema)
    obj = client.completions.create(model="m", prompt="Data:", max_tokens=80, temperature=1.0, seed=0, n=4,
                                    extra_body={"response_format": {"type": "json_object"}})
    for ch in obj.choices:  # a random model may write one long key: whatever stopped is a JSON object
        assert ch.text.startswith("{")
        if ch.finish_reason == "stop":
            assert isinstance(json.loads(ch.text), dict)


def test_chat_content_parts_developer_and_call_ids(server):
    url, engine = server
    chat = "/v1/chat/completions"

    def prompt_ids(messages, **kw):
        r = post(url, chat, {"messages": messages, "max_tokens": 1, "return_prompt_token_ids": True, **kw})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["prompt_token_ids"]

    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}]}]
    assert prompt_ids(parts) == prompt_ids(plain) == engine.render_chat(plain, None)
    r = post(url, chat, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert r.status_code == 400 and "messages[0].content[0]" in r.json()["message"]
    own = [{"role": "user", "content": "add"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "functions.add:0", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
           {"role": "tool", "tool_call_id": "functions.add:0", "content": "3"}]
    openai_ids = json.loads(json.dumps(own).replace("functions.add:0", "call_9f8e7d6c5b4a"))
    assert prompt_ids(openai_ids, tools=TOOLS) == prompt_ids(own, tools=TOOLS)


def test_tool_choice_named_and_required(server):
    pytest.importorskip("xgrammar")
    jsonschema = pytest.importorskip("jsonschema")
    url, _ = server
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    r = post(url, "/v1/chat/completions", {"messages": msgs, "tools": TOOLS, "max_tokens": 60, "temperature": 1.0,
                                           "seed": 2, "n": 2,
                                           "tool_choice": {"type": "function", "function": {"name": "add"}}})
    assert r.status_code == 200, r.text
    for ch in r.json()["choices"]:
        assert ch["finish_reason"] == "tool_calls", ch
        (call,) = ch["message"]["tool_calls"]
        assert call["function"]["name"] == "add" and call["id"] == "functions.add:0"
        jsonschema.validate(json.loads(call["function"]["arguments"]), TOOLS[0]["function"]["parameters"])
    r = post(url, "/v1/chat/completions", {"messages": msgs, "tools": TOOLS, "max_tokens": 120, "temperature": 1.0,
                                           "seed": 5, "tool_choice": "required", "parallel_tool_calls": False})
    ch = r.json()["choices"][0]
    assert ch["finish_reason"] == "tool_calls", ch
    (call,) = ch["message"]["tool_calls"]
    fn = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    jsonschema.validate(json.loads(call["function"]["arguments"]), fn[call["function"]["name"]])
    # a history with OpenAI-style ids: the reply's ids come back in that style
    history = msgs + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_abc123", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_abc123", "content": "5"}, {"role": "user", "content": "And 4 + 4?"}]
    r = post(url, "/v1/chat/completions", {"messages": history, "tools": TOOLS, "max_tokens": 60,
                                           "tool_choice": {"type": "function", "function": {"name": "add"}}})
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert call["id"].startswith("call_")
    r = post(url, "/v1/chat/completions", {"messages": msgs, "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "nope"}}})
    assert r.status_code == 400 and "nope" in r.json()["message"]


def test_chat_top_logprobs(server):
    openai = pytest.importorskip("openai")
    url, engine = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    c = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    for tok in content:
        assert len(tok.top_logprobs) == 3 and tok.logprob == pytest.approx(tok.top_logprobs[0].logprob)
        raw = bytes(tok.bytes)
        try:
            assert raw.decode() == tok.token
        except UnicodeDecodeError:
            assert raw.decode("latin-1") == tok.token
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], top_logprobs=2)


# ---- SGLang's frontend ---------------------------------------------------------------------------
def test_sglang_frontend_gen_and_select(server, hf):
    try:
        import sglang as sgl
        from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint
    except Exception as e:  # noqa: BLE001 - sglang's frontend does not import here
        pytest.skip(f"sglang frontend does not import: {e}")
    url, engine = server
    sgl.set_default_backend(RuntimeEndpoint(url))
    choices = ["sunny", "rain at night", "a meeting"]

    @sgl.function
    def qa(s, question):
        s += "Question: " + question + "\n"
        s += "Answer: " + sgl.gen("answer", max_tokens=6, temperature=0)
        s += "\nPick: " + sgl.select("pick", choices=choices)

    state = qa.run(question="What is the weather?")
    direct = post(url, "/generate", {"text": "Question: What is the weather?\nAnswer: ",
                                     "sampling_params": {"temperature": 0, "max_new_tokens": 6}}).json()
    assert state["answer"] == direct["text"]
    # select: the choice with the best mean prompt log-prob (SGLang's token-length normalized rule)
    prefix = state.text()[:state.text().rindex("Pick: ") + len("Pick: ")]
    means = []
    for c in choices:
        ids = engine.encode(prefix + c)
        start = max(len(engine.encode(prefix)) - 2, 0)
        ref = ref_logprobs(hf, ids)
        vals = [ref[p - 1, ids[p]].item() for p in range(start + 1, len(ids))]
        means.append(sum(vals) / len(vals))
    meta = state.get_meta_info("pick")
    assert meta["normalized_prompt_logprobs"] == pytest.approx(means, abs=1e-4)
    assert state["pick"] == choices[max(range(3), key=lambda i: means[i])]
