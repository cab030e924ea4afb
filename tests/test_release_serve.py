"""`k2sys serve` on a release-format directory with Kimi's tokenizer (tiktoken.model + the chat template in
tokenizer_config.json): FP8 weights load, /v1/chat/completions renders the checkpoint's own template (ids equal
transformers' apply_chat_template on the same tokenizer) and parses tool calls in Kimi's format."""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time

import httpx
import pytest
import torch

from k2sys.engine.core.config import EngineConfig
from k2sys.engine.core.engine import NativeEngine
from k2sys.engine.api.server import build_app
from k2sys.models import build_model, k2_tiny, save_hf
from test_tokenizer_release import KIMI_CHATS, TOOLS, kimi, kimi_hf  # noqa: F401  (fixtures)

uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def served(kimi, tmp_path_factory):  # noqa: F811
    tok_dir, ranks, _ = kimi
    vocab = len(ranks) + 256
    cfg = dataclasses.replace(k2_tiny(vocab_size=vocab), model_type="kimi_k2", hidden_size=160,
                              moe_intermediate_size=136, eos_token_id=len(ranks) + 1)
    root = tmp_path_factory.mktemp("serve")
    src = root / "tok"
    shutil.copytree(tok_dir, src)
    ckpt = save_hf(build_model(cfg, seed=2), root / "Kimi-K2-tiny", tokenizer=src, format="fp8-block128")
    assert (ckpt / "tiktoken.model").exists() and (ckpt / "tokenization_kimi.py").exists()
    engine = NativeEngine.from_pretrained(ckpt, EngineConfig(dtype="float32", max_total_tokens=8192))
    import socket

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


@pytest.mark.parametrize("name", ["plain", "tools", "ends_on_user"])
def test_chat_prompt_is_the_checkpoint_template(served, kimi_hf, name):  # noqa: F811
    _, engine = served
    msgs, tools = KIMI_CHATS[name]
    want = kimi_hf.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else list(want)  # BatchEncoding in transformers 5
    assert engine.render_chat(msgs, tools) == list(want)


def test_chat_completion_over_http(served, kimi_hf):  # noqa: F811
    url, _ = served
    msgs = [{"role": "user", "content": "Hello!"}]
    r = httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": msgs, "max_tokens": 4,
                                                       "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    n = len(kimi_hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"])
    assert r.json()["usage"]["prompt_tokens"] == n


def test_tool_calls_are_parsed_in_kimi_format(served):
    _, engine = served
    text = ("Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
            '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')
    msg, has_calls = engine.parse_chat_output(text)
    assert has_calls and msg["tool_calls"][0]["function"]["name"] == "get_weather"
    assert msg["content"] == "Let me check."


def test_fp8_weights_were_dequantized_not_cast(served):
    _, engine = served
    w = engine.runner.params["model.layers.0.self_attn.o_proj.weight"]
    assert w.dtype == torch.float32 and w.abs().max().item() < 1.0  # raw e4m3 codes would reach 448
