"""Where the evaluated model's answers come from: a `Generator` turns chat requests into assistant messages.

    OpenAIChatGenerator   POST {base}/v1/chat/completions (k2sys serve, SGLang, vLLM, any OpenAI-compatible
                          server); one request per sample with its own seed, `concurrency` in flight
    EngineChatGenerator   an InferenceEngine (in process, or its HTTP client) + tokenizer: the checkpoint's
                          chat format renders the messages to tokens and parses the generated text back (tool
                          calls included); plays episodes through the token-level agent loop (play_episodes)
    served_checkpoint     a checkpoint directory served with `k2sys serve` on a free port for the duration

Messages are canonical k2sys chat messages (tool-call arguments as dicts); the OpenAI generator converts
them to the wire form (arguments as JSON strings) and back.
"""

from __future__ import annotations

import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

__all__ = ["ChatRequest", "Completion", "Generator", "OpenAIChatGenerator", "EngineChatGenerator",
           "served_checkpoint"]


@dataclass(frozen=True, kw_only=True)
class ChatRequest:
    messages: list[dict]
    tools: list[dict] | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.messages:
            raise ValueError("ChatRequest.messages: empty; give at least one user message")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_tokens < 1:
            raise ValueError(f"ChatRequest: temperature {self.temperature} must be >= 0, top_p {self.top_p} in (0, 1] "
                             f"and max_tokens {self.max_tokens} >= 1")


@dataclass(kw_only=True)
class Completion:
    message: dict
    """{"role": "assistant", "content": str, "tool_calls"?: [...] (arguments as dicts), "malformed"?: why}"""
    finish_reason: str = "stop"
    """stop | length (cut at max_tokens) | error (the server refused this request)."""
    usage: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.message.get("content") or ""


class Generator(Protocol):
    def chat(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        """One completion per request, in order."""


# ---------------------------------------------------------------- OpenAI-compatible endpoint

def _wire_messages(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if k != "malformed"}
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": c["function"]["arguments"]
                                                  if isinstance(c["function"]["arguments"], str)
                                                  else json.dumps(c["function"]["arguments"], ensure_ascii=False)}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


def _canonical_message(msg: dict) -> dict:
    out: dict[str, Any] = {"role": "assistant", "content": msg.get("content") or ""}
    calls, bad = [], []
    for c in msg.get("tool_calls") or []:
        fn = c.get("function") or {}
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args or "{}")
            except json.JSONDecodeError as e:
                bad.append(f"tool call {fn.get('name')!r}: arguments are not JSON ({e.msg})")
                continue
        calls.append({"id": c.get("id") or f"call_{len(calls)}", "type": "function",
                      "function": {"name": fn.get("name", ""), "arguments": args}})
    if calls:
        out["tool_calls"] = calls
    if bad:
        out["malformed"] = "; ".join(bad)
    return out


class OpenAIChatGenerator:
    """Chat completions from an OpenAI-compatible server (see the module doc). A request the server refuses
    as bad (400, 413, 422: e.g. a prompt longer than the context) becomes an empty completion with
    finish_reason "error" (it scores 0 and is counted); any other error status stops the run."""

    REQUEST_ERRORS = (400, 413, 422)

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None,
                 concurrency: int = 32, timeout_s: float = 600.0, retries: int = 3, backoff_s: float = 1.0):
        import httpx

        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {base_url!r}: needs a scheme, e.g. http://127.0.0.1:30000")
        if concurrency < 1 or retries < 0:
            raise ValueError(f"concurrency ({concurrency}) must be >= 1 and retries ({retries}) >= 0")
        root = base_url.rstrip("/")
        self.base_url = root[:-3] if root.endswith("/v1") else root
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers,
                                   timeout=httpx.Timeout(timeout_s, connect=10.0),
                                   limits=httpx.Limits(max_connections=concurrency))
        self.concurrency, self.retries, self.backoff_s = concurrency, retries, backoff_s
        self._http_error = httpx.HTTPError
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        try:
            r = self.client.get("/v1/models")
            r.raise_for_status()
        except self._http_error as e:
            raise ConnectionError(f"{self.base_url}/v1/models: {e}; is the server up? (or pass model=... / "
                                  "--served-model)") from None
        data = r.json().get("data") or []
        if not data:
            raise RuntimeError(f"{self.base_url}/v1/models lists no model; pass model=... (--served-model)")
        return data[0]["id"]

    def _one(self, req: ChatRequest) -> Completion:
        body: dict[str, Any] = {"model": self.model, "messages": _wire_messages(req.messages),
                                "temperature": req.temperature, "top_p": req.top_p, "max_tokens": req.max_tokens}
        if req.seed is not None:
            body["seed"] = req.seed
        if req.tools:
            body["tools"] = req.tools
        for attempt in range(self.retries + 1):
            try:
                r = self.client.post("/v1/chat/completions", json=body)
                if r.status_code < 500 or attempt == self.retries:
                    break
            except self._http_error:
                if attempt == self.retries:
                    raise
            time.sleep(self.backoff_s * 2 ** attempt)
        if r.status_code in self.REQUEST_ERRORS:  # this request is unservable (e.g. prompt too long): a failed sample
            return Completion(message={"role": "assistant", "content": ""}, finish_reason="error",
                              usage={"error": f"status {r.status_code}: {r.text[:300]}"})
        if r.status_code >= 400:
            raise RuntimeError(f"{self.base_url}/v1/chat/completions: status {r.status_code}: {r.text[:500]}")
        payload = r.json()
        choice = payload["choices"][0]
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        return Completion(message=_canonical_message(choice.get("message") or {}), finish_reason=finish,
                          usage=payload.get("usage") or {})

    def chat(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        if len(requests) <= 1:
            return [self._one(r) for r in requests]
        with ThreadPoolExecutor(min(self.concurrency, len(requests))) as pool:
            return list(pool.map(self._one, requests))

    def close(self) -> None:
        self.client.close()


# ---------------------------------------------------------------- in-process engine

class EngineChatGenerator:
    """Chat over an InferenceEngine (token level) and a tokenizer whose chat format renders and parses.

    raw_text: the completion's content is the decoded response as generated (special tokens kept, only the
    stop token dropped), unparsed: what the recipe's RL verifiers score. Episodes are played by
    `play_episodes` through the token-level agent loop RL uses (k2sys.envs.agent_loop), with `agent`'s
    per-episode token cap (an AgentConfig; None = its defaults), not message by message."""

    def __init__(self, engine: Any, tokenizer: Any, *, raw_text: bool = False, agent: Any = None):
        from k2sys.envs.agent_loop import AgentConfig
        from k2sys.tokenizer import chat_format_for

        self.engine, self.tokenizer = engine, tokenizer
        self.fmt = chat_format_for(tokenizer)
        self.raw_text, self.agent = raw_text, agent if agent is not None else AgentConfig()

    def chat(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        from k2sys.engine.api.protocol import GenerateRequest, SamplingParams

        stops = tuple(self.fmt.stop_token_ids)
        reqs = [GenerateRequest(input_ids=tuple(self.fmt.prompt_ids(r.messages, r.tools)),
                                sampling=SamplingParams(temperature=r.temperature, top_p=r.top_p,
                                                        max_new_tokens=r.max_tokens, stop_token_ids=stops,
                                                        sampling_seed=r.seed))
                for r in requests]
        out = []
        for o in self.engine.generate(reqs):
            ids = list(o.output_ids)
            if ids and ids[-1] in stops:
                ids = ids[:-1]
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            if self.raw_text:
                msg: dict = {"role": "assistant", "content": text}
            else:
                parsed = self.fmt.parse_assistant(text)
                msg = parsed.to_message()
                if parsed.errors:
                    msg["malformed"] = "; ".join(parsed.errors)
            out.append(Completion(message=msg, finish_reason="stop" if o.finish_reason == "stop" else "length",
                                  usage={"prompt_tokens": o.prompt_tokens, "completion_tokens": len(o.output_ids)}))
        return out

    def play_episodes(self, specs: Sequence[dict], seeds: Sequence[int], *, temperature: float, top_p: float = 1.0,
                      max_tokens: int = 1024) -> list[dict]:
        """One episode per (spec, seed), all at once (the engine batches their turns), through the agent
        loop: env reset with the seed, sampling seed `seed * 1009 + turn` (as run_chat_episode), at most
        max_tokens per turn and the agent config's tokens per episode. Same records as run_chat_episode;
        "messages" holds the model's turns."""
        import asyncio
        from dataclasses import replace

        from k2sys.engine.api.protocol import SamplingParams
        from k2sys.envs.agent_loop import advance_episode, new_episode_group

        if len(specs) != len(seeds):
            raise ValueError(f"play_episodes: {len(specs)} specs but {len(seeds)} seeds")
        cfg = replace(self.agent, max_turn_tokens=max_tokens)
        trajs = [new_episode_group(spec, i, 1, self.tokenizer, seed=seed)[0]
                 for i, (spec, seed) in enumerate(zip(specs, seeds))]
        stops = list(self.fmt.stop_token_ids)

        async def play() -> None:
            await asyncio.gather(*(
                advance_episode(self.engine, self.tokenizer, t, version=0, cfg=cfg, stop_ids=stops,
                                stopping=lambda: False,
                                sampling=SamplingParams(temperature=temperature, top_p=top_p, sampling_seed=seed))
                for t, seed in zip(trajs, seeds)))

        asyncio.run(play())
        out = []
        for t in trajs:
            m = t.meta
            out.append({"reward": float(m["reward"]), "truncated": bool(m["truncated"]), "turns": len(m["actions"]),
                        "messages": m["actions"], "finish_reason": "length" if m["truncated"] else "stop",
                        "info": m["env_info"]})
        return out


@contextlib.contextmanager
def served_checkpoint(path: str | Path, *, log_path: str | Path, extra_args: Sequence[str] = (),
                      timeout_s: float = 900.0) -> Iterator[str]:
    """`k2sys serve --model PATH` on a free port; yields its base URL and stops it on exit."""
    from k2sys.engine.launch import NativeLaunchConfig, free_port, launch_server

    if not Path(path).is_dir():
        raise FileNotFoundError(f"model {str(path)!r}: neither an http(s):// endpoint nor a checkpoint directory")
    cfg = NativeLaunchConfig(model_path=str(path), port=free_port(), extra_args=tuple(extra_args))
    server = launch_server(cfg, log_path=log_path, timeout=timeout_s)
    try:
        yield cfg.base_url
    finally:
        server.stop()
