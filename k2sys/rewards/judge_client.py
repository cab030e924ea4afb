"""LLM judges, attackers and proposers behind an OpenAI-compatible chat route, and the failure
accounting of every reward that calls out (judge, sandbox).

    ChatFn = (messages) -> assistant text        any callable; `OpenAIChat` talks to a server
    make_chat(spec)                              None | callable | {"base_url", "model", ...} -> ChatFn
    FailureCounter(name).guard(fn, *args)        fn(*args), or None after counting + logging the failure

A judged reward never stops the run: an unreachable judge, a timeout, an unparseable verdict or a
sandbox that cannot start scores that sample 0, is counted per reason (`reward_failures/<name>` and
`reward_failures/<name>/<reason>` in the RL metrics) and logged (rate-limited to the first few of
each reason, then every 100th).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any, Callable, Sequence

__all__ = ["ChatFn", "OpenAIChat", "RewardCallFailed", "make_chat", "FailureCounter", "classify_failure"]

log = logging.getLogger("k2sys.rewards")

ChatFn = Callable[[Sequence[dict]], str]


class RewardCallFailed(RuntimeError):
    """A reward's outside call (judge, sandbox) gave no usable answer; `reason` names why."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


class OpenAIChat:
    """`/v1/chat/completions` of an OpenAI-compatible server (our engine, SGLang, vLLM, a hosted API).

    Uses the `openai` package when installed, else a plain httpx POST. Any transport or status error
    becomes RewardCallFailed(reason) with reason timeout | unreachable | http_<status> | empty."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout_s: float = 30.0,
                 max_tokens: int = 256, temperature: float = 0.0, max_retries: int = 1):
        if not base_url:
            raise ValueError("OpenAIChat needs a base_url (e.g. http://127.0.0.1:8000/v1)")
        if not timeout_s > 0:
            raise ValueError(f"OpenAIChat timeout_s must be > 0, got {timeout_s!r}")
        self.base_url, self.model = base_url.rstrip("/"), model
        self.max_tokens, self.temperature, self.timeout_s = max_tokens, temperature, timeout_s
        self.api_key = api_key or "EMPTY"
        self.max_retries = max_retries
        self._client: Any = None

    def _openai(self) -> Any:
        if self._client is None:
            import openai

            self._client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout_s,
                                         max_retries=self.max_retries)
        return self._client

    def __call__(self, messages: Sequence[dict]) -> str:
        try:
            import openai
        except ImportError:
            return self._httpx(messages)
        try:
            resp = self._openai().chat.completions.create(model=self.model, messages=list(messages),
                                                          max_tokens=self.max_tokens, temperature=self.temperature)
        except openai.APITimeoutError as e:
            raise RewardCallFailed("timeout", str(e)) from None
        except openai.APIConnectionError as e:
            raise RewardCallFailed("unreachable", str(e)) from None
        except openai.APIStatusError as e:
            raise RewardCallFailed(f"http_{e.status_code}", str(e)[:200]) from None
        text = resp.choices[0].message.content if resp.choices else None
        if not text:
            raise RewardCallFailed("empty", "the judge returned no text")
        return text

    def _httpx(self, messages: Sequence[dict]) -> str:
        import httpx

        body = {"model": self.model, "messages": list(messages), "max_tokens": self.max_tokens,
                "temperature": self.temperature}
        try:
            r = httpx.post(f"{self.base_url}/chat/completions", json=body, timeout=self.timeout_s,
                           headers={"Authorization": f"Bearer {self.api_key}"})
        except httpx.TimeoutException as e:
            raise RewardCallFailed("timeout", str(e)) from None
        except httpx.HTTPError as e:
            raise RewardCallFailed("unreachable", str(e)) from None
        if r.status_code != 200:
            raise RewardCallFailed(f"http_{r.status_code}", r.text[:200])
        try:
            text = r.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise RewardCallFailed("bad_reply", r.text[:200]) from None
        if not text:
            raise RewardCallFailed("empty", "the judge returned no text")
        return text


_CHAT_KEYS = {"base_url", "model", "api_key_env", "timeout_s", "max_tokens", "temperature", "max_retries"}


def make_chat(spec: Any) -> ChatFn | None:
    """None -> None; a callable is used as is; a dict {"base_url", "model", "api_key_env"?, "timeout_s"?,
    "max_tokens"?, "temperature"?, "max_retries"?} -> OpenAIChat (the key is read from the environment
    variable api_key_env, never stored in the run config)."""
    if spec is None or callable(spec):
        return spec
    if not isinstance(spec, dict):
        raise ValueError(f"a judge must be a JSON object {{'base_url', 'model', ...}}, got {spec!r}")
    unknown = set(spec) - _CHAT_KEYS
    if unknown:
        raise ValueError(f"judge: unknown keys {sorted(unknown)}; known: {sorted(_CHAT_KEYS)}")
    if "base_url" not in spec or "model" not in spec:
        raise ValueError(f"judge: needs 'base_url' and 'model', got {sorted(spec)}")
    kw = {k: v for k, v in spec.items() if k not in ("base_url", "model", "api_key_env")}
    env = spec.get("api_key_env")
    return OpenAIChat(spec["base_url"], spec["model"], api_key=os.environ.get(env) if env else None, **kw)


def classify_failure(exc: BaseException) -> str:
    if isinstance(exc, RewardCallFailed):
        return exc.reason
    from k2sys.rewards.sandbox import SandboxUnavailable

    if isinstance(exc, SandboxUnavailable):
        return "sandbox_unavailable"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, (ConnectionError, OSError)):
        return "unreachable"
    return f"error_{type(exc).__name__}"


class FailureCounter:
    """Counts (and logs) the samples of one reward that scored 0 because the reward itself failed."""

    def __init__(self, name: str):
        self.name = name
        self.counts: Counter = Counter()

    def record(self, exc: BaseException, what: str = "") -> None:
        reason = classify_failure(exc)
        self.counts[reason] += 1
        n = self.counts[reason]
        if n <= 3 or n % 100 == 0:
            log.warning("reward %s: %s scored 0 (%s, %d so far): %s", self.name, what or "sample", reason, n, exc)

    def guard(self, fn: Callable[..., Any], *args: Any, what: str = "") -> Any:
        """fn(*args), or None when it raised (counted and logged). KeyboardInterrupt etc. still propagate."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - any reward failure scores 0 and is counted; it never stops a run
            self.record(e, what)
            return None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def stats(self) -> dict[str, int]:
        out = {f"reward_failures/{self.name}": self.total}
        out.update({f"reward_failures/{self.name}/{k}": v for k, v in sorted(self.counts.items())})
        return out
