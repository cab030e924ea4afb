"""Rewards by name: built-ins, a user's Python function, or an HTTP reward service.

    reward = make_reward("math")                          # built-in (see BUILTINS)
    reward = make_reward("my_pkg.rewards:score")          # importable module:function
    reward = make_reward("rewards/mine.py:score")         # path/to/file.py:function
    reward = make_reward("http://host:8000/reward", batch_size=64, timeout_s=30)
    result = reward([RewardItem(prompt, response, label, metadata), ...])
    result.rewards        # one float per item, in order
    result.failures       # {"error" | "timeout" | "invalid" | "http": count} of this call
    reward.stats()        # the same counts since the reward was made, for metrics

One calling convention: a reward takes a list of `RewardItem` and returns a `RewardResult`. A user
function takes `(prompt, response, label, metadata)` and returns a number; a function with the
attribute `batched = True` (or `make_reward(spec, batched=True)`) takes the four as parallel lists
and returns a list of numbers. `prompt` is the text, or the chat message list of a message prompt.

A sample whose reward cannot be computed scores 0.0 and is counted by reason, logged, and never
stops the run:
    error    the reward raised (for a user function, or a bad label a built-in cannot read)
    timeout  it passed its deadline (a Python call, an HTTP request after its retries)
    invalid  it returned something that is not a finite real number (or a list of the wrong length)
    http     the reward service answered an error status or could not be reached, after retries
Configuration mistakes (an unknown spec, a module that does not import, a missing sandbox) are
errors at `make_reward` time, before any sample is scored.

Deadlines for Python functions (user functions and the `math` built-in) are real: each call runs in
a worker *process* (`workers` of them, started lazily) and a worker that passes its deadline is
killed with SIGKILL and replaced. Threads cannot give this guarantee: a thread stuck in C code (a
catastrophic regex, a sympy call) holds the GIL and cannot be stopped or abandoned safely. The
worker is a small script that does not import k2sys (so it starts without torch); it imports the
function from its spec with the parent's sys.path and working directory, runs each call in its own
main thread (so libraries that use signal-based timeouts, like math-verify, work), and its stdout is
redirected to stderr so a user's print() cannot corrupt the protocol. Items cross the process
boundary by pickle, so labels and metadata must be picklable (data loaded by k2sys.data always is).
The cost: one interpreter per worker (plus the user's imports) and a pickle round trip per call.
`timeout_s` is per call: one item for a per-item function, one batch for a batched function.

Built-ins that cannot hang run in the calling process: `exact` (string compare), `instruction`
(InstructionVerifier's checks), `code` (programs run in the bubblewrap sandbox, whose own time
limit kills them; `threads` programs at a time).

This module imports only the standard library at the top: the reward worker loads it by path to run
the `math` built-in, without importing the k2sys package.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import numbers
import os
import pickle
import re
import select
import struct
import subprocess
import sys
import threading
import time
import unicodedata
import weakref
from abc import ABC, abstractmethod
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

__all__ = ["RewardItem", "RewardResult", "RewardFailure", "Reward", "PythonReward", "HTTPReward",
           "CallableReward", "make_reward", "BUILTINS", "FAILURE_REASONS", "math_reward", "exact_reward",
           "final_answer", "normalize_answer"]

log = logging.getLogger("k2sys.rewards")

FAILURE_REASONS = ("error", "timeout", "invalid", "http")
BUILTINS = {
    "math": "math-verify: parse the label and the response's final answer, 1.0 when equivalent",
    "exact": "1.0 when the response's final answer equals the label after normalization",
    "code": "label = test cases [{input, output}]: fraction passed, programs run in the bubblewrap sandbox",
    "instruction": "label (or metadata['constraints']) = constraints: InstructionVerifier's checks",
}
_LOG_FIRST = 5          # failures logged at WARNING per reason and reward; later ones at DEBUG


@dataclass(frozen=True)
class RewardItem:
    prompt: str | list[dict]
    response: str
    label: Any = None
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RewardFailure:
    index: int          # position of the item in the call
    reason: str         # one of FAILURE_REASONS
    message: str


@dataclass
class RewardResult:
    rewards: list[float]
    errors: list[RewardFailure] = field(default_factory=list)

    @property
    def failures(self) -> dict[str, int]:
        """Failed samples of this call per reason."""
        return dict(Counter(e.reason for e in self.errors))

    @property
    def n_failed(self) -> int:
        return len(self.errors)


@dataclass(frozen=True)
class _Failed:
    reason: str
    message: str


def _as_reward(value: Any) -> float | _Failed:
    """A finite float, or why the value is not a reward."""
    if isinstance(value, _Failed):
        return value
    if isinstance(value, numbers.Real):       # int, float, bool, numpy reals
        v = float(value)
        if math.isfinite(v):
            return v
        return _Failed("invalid", f"returned {v}, not a finite number")
    return _Failed("invalid", f"returned {type(value).__name__} {str(value)[:60]!r}, not a number")


class Reward(ABC):
    """Scores a batch; failed samples score 0.0 and are counted. Subclasses implement `_score`."""

    def __init__(self, name: str):
        self.name = name
        self._lock = threading.Lock()
        self._items = 0
        self._failures: Counter[str] = Counter()

    @abstractmethod
    def _score(self, items: list[RewardItem]) -> list[Any]:
        """One value per item: a number, or `_Failed`. Must not raise for a sample's failure."""

    def __call__(self, items: Sequence[RewardItem]) -> RewardResult:
        items = list(items)
        for i, it in enumerate(items):
            if not isinstance(it, RewardItem):
                raise TypeError(f"reward {self.name!r}: items[{i}] is a {type(it).__name__}, expected RewardItem")
        if not items:
            return RewardResult([])
        values = self._score(items)
        if len(values) != len(items):
            raise RuntimeError(f"reward {self.name!r} produced {len(values)} values for {len(items)} items")
        rewards: list[float] = []
        errors: list[RewardFailure] = []
        for i, v in enumerate(values):
            v = _as_reward(v)
            if isinstance(v, _Failed):
                errors.append(RewardFailure(i, v.reason, v.message))
                rewards.append(0.0)
            else:
                rewards.append(v)
        self._record(len(items), errors)
        return RewardResult(rewards, errors)

    def _record(self, n: int, errors: list[RewardFailure]) -> None:
        with self._lock:
            self._items += n
            for e in errors:
                self._failures[e.reason] += 1
                k = self._failures[e.reason]
                level = logging.WARNING if k <= _LOG_FIRST else logging.DEBUG
                more = (f" (further {e.reason!r} failures of this reward are logged at DEBUG; counts in "
                        f"reward.stats())") if k == _LOG_FIRST else ""
                log.log(level, "reward %s: sample scored 0 (%s #%d): %s%s", self.name, e.reason, k, e.message, more)

    def stats(self) -> dict:
        """Counts since the reward was made: {"items", "failed", "failures": {reason: n}} (all reasons listed)."""
        with self._lock:
            failures = {r: self._failures.get(r, 0) for r in FAILURE_REASONS}
            return {"items": self._items, "failed": sum(failures.values()), "failures": failures}

    def close(self) -> None:
        """Release workers and connections (idempotent)."""

    def __enter__(self) -> "Reward":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class CallableReward(Reward):
    """An in-process per-item function `fn(item) -> number`; for functions that cannot hang (no deadline).
    `threads` > 1 scores items concurrently (useful when fn waits on a subprocess)."""

    def __init__(self, name: str, fn: Callable[[RewardItem], Any], threads: int = 1):
        super().__init__(name)
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"reward {name!r}: threads must be an int >= 1, got {threads!r}")
        self.fn, self.threads = fn, threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=f"reward-{name}") if threads > 1 else None

    def _one(self, item: RewardItem) -> Any:
        try:
            return self.fn(item)
        except Exception as e:
            return _Failed("error", f"{type(e).__name__}: {e}")

    def _score(self, items: list[RewardItem]) -> list[Any]:
        if self._pool is None:
            return [self._one(it) for it in items]
        return list(self._pool.map(self._one, items))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


# ----------------------------------------------------------------------------------------------
# Python functions in worker processes

_WORKER_MAIN = r'''
import importlib, importlib.util, inspect, numbers, os, pickle, struct, sys, threading, time, traceback

def main():
    rfile = sys.stdin.buffer
    wfile = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)                       # the user's prints go to stderr, never into the protocol

    def recv():
        head = rfile.read(8)
        if len(head) < 8:
            return None
        return pickle.loads(rfile.read(struct.unpack("<Q", head)[0]))

    def send(obj):
        blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        wfile.write(struct.pack("<Q", len(blob)) + blob)
        wfile.flush()

    parent = os.getppid()
    def orphan_watch():                 # a hung call must not outlive the parent
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=orphan_watch, daemon=True).start()

    init = recv()
    sys.path[:] = init["sys_path"]
    try:
        if init["file"]:
            path = init["target"]
            name = "k2sys_reward_" + "".join(c if c.isalnum() else "_" for c in os.path.basename(path)[:-3])
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(init["target"])
        fn = mod
        for part in init["attr"].split("."):
            fn = getattr(fn, part)
        if not callable(fn):
            raise TypeError(f"{init['attr']} is a {type(fn).__name__}, not a function")
        batched = init["batched"]
        if batched is None:
            batched = getattr(fn, "batched", False) is True
        try:
            inspect.signature(fn).bind(None, None, None, None)
        except TypeError as e:
            raise TypeError(f"{init['attr']} must accept (prompt, response, label, metadata)"
                            f"{' as lists' if batched else ''}: {e}") from None
        except ValueError:
            pass                        # no signature to check (a builtin); the first call will tell
    except BaseException as e:
        send(("fatal", "".join(traceback.format_exception_only(type(e), e)).strip()))
        return
    send(("ready", {"batched": batched}))

    def convert(v):
        if isinstance(v, numbers.Real):
            return float(v)
        return ("invalid", f"returned {type(v).__name__} {str(v)[:60]!r}, not a number")

    while True:
        msg = recv()
        if msg is None:
            return
        try:
            out = fn(*msg)
        except BaseException as e:
            tb = traceback.extract_tb(e.__traceback__)[-1:]
            where = f" ({tb[0].filename}:{tb[0].lineno})" if tb else ""
            send(("raised", f"{type(e).__name__}: {e}{where}"))
            continue
        if batched:
            try:
                values = list(out)
            except TypeError:
                send(("bad", f"batched function returned {type(out).__name__}, not a list of numbers"))
                continue
            if len(values) != len(msg[0]):
                send(("bad", f"batched function returned {len(values)} values for {len(msg[0])} items"))
                continue
            send(("ok", [convert(v) for v in values]))
        else:
            send(("ok", convert(out)))

main()
'''


class _WorkerGone(Exception):
    pass


class _Worker:
    """One worker process: a length-prefixed pickle protocol over its stdin/stdout."""

    def __init__(self, init: dict, startup_timeout_s: float):
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER_MAIN], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd=os.getcwd(), start_new_session=True)
        self._fd = self.proc.stdout.fileno()
        try:
            self._send(init)
            kind, info = self._recv(time.monotonic() + startup_timeout_s)
        except TimeoutError:
            self.kill()
            raise _WorkerGone(f"the reward worker did not load the function within {startup_timeout_s:g} s "
                              f"(startup_timeout_s)") from None
        except _WorkerGone:
            self.kill()
            raise
        if kind == "fatal":
            self.kill()
            raise _WorkerGone(info)
        self.batched: bool = info["batched"]

    def _send(self, obj: Any) -> None:
        blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.proc.stdin.write(struct.pack("<Q", len(blob)) + blob)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise _WorkerGone(self._death()) from None

    def _read(self, n: int, deadline: float) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self._fd], [], [], left)
            if not ready:
                raise TimeoutError
            chunk = os.read(self._fd, n - len(buf))
            if not chunk:
                raise _WorkerGone(self._death())
            buf += chunk
        return bytes(buf)

    def _recv(self, deadline: float) -> Any:
        (n,) = struct.unpack("<Q", self._read(8, deadline))
        return pickle.loads(self._read(n, deadline))

    def _death(self) -> str:
        try:
            code = self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            return "the reward worker closed its output"
        return f"the reward worker process died (exit status {code})"

    def call(self, args: tuple, timeout_s: float) -> tuple:
        """(kind, payload) of one call; raises TimeoutError past the deadline, _WorkerGone if the process died."""
        self._send(args)
        return self._recv(time.monotonic() + timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


def _stop_all(workers: list[_Worker], lock: threading.Lock) -> None:
    """Close every worker's stdin (each exits at EOF, running its atexit hooks), then kill stragglers."""
    with lock:
        todo = list(workers)
        workers.clear()
    for w in todo:
        try:
            w.proc.stdin.close()
        except OSError:
            pass
    deadline = time.monotonic() + 5.0
    for w in todo:
        try:
            w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        w.kill()


class PythonReward(Reward):
    """A Python function run in worker processes with a real per-call deadline (see the module doc)."""

    def __init__(self, name: str, target: str, attr: str, *, is_file: bool, timeout_s: float = 10.0,
                 workers: int | None = None, batched: bool | None = None, batch_size: int | None = None,
                 startup_timeout_s: float = 120.0):
        """batch_size: items per call of a batched function (default 64); refused for a per-item one."""
        super().__init__(name)
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"reward {name!r}: timeout_s must be > 0, got {timeout_s!r}")
        if workers is None:
            workers = max(1, min(4, os.cpu_count() or 1))
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"reward {name!r}: workers must be an int >= 1, got {workers!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"reward {name!r}: batch_size must be an int >= 1, got {batch_size!r}")
        if batched not in (None, True, False):
            raise ValueError(f"reward {name!r}: batched must be true, false or unset, got {batched!r}")
        self.timeout_s, self.workers = float(timeout_s), workers
        self.startup_timeout_s = float(startup_timeout_s)
        self._init = {"target": target, "attr": attr, "file": is_file, "batched": batched,
                      "sys_path": list(sys.path)}
        self._idle: list[_Worker] = []
        self._all: list[_Worker] = []
        self._pool_lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop_all, self._all, self._pool_lock)
        try:
            first = _Worker(self._init, self.startup_timeout_s)      # fail now on a bad spec, not per sample
        except _WorkerGone as e:
            raise ValueError(f"reward {name!r}: cannot load the function: {e}") from None
        self.batched = first.batched
        self._add(first)
        if batch_size is not None and not self.batched:
            self.close()
            raise ValueError(f"reward {name!r}: batch_size applies to batched functions (batched=True or the "
                             f"function attribute `batched = True`); this one scores one item per call")
        self.batch_size = batch_size or 64
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"reward-{name}")

    def _add(self, w: _Worker) -> None:
        with self._pool_lock:
            self._all.append(w)
            self._idle.append(w)

    def _acquire(self) -> _Worker:
        with self._pool_lock:
            if self._idle:
                return self._idle.pop()
        w = _Worker(self._init, self.startup_timeout_s)
        with self._pool_lock:
            self._all.append(w)
        return w

    def _release(self, w: _Worker) -> None:
        with self._pool_lock:
            self._idle.append(w)

    def _discard(self, w: _Worker) -> None:
        w.kill()
        with self._pool_lock:
            if w in self._all:
                self._all.remove(w)

    def _run(self, args: tuple, n: int) -> list[Any]:
        """One call on a worker: n values (one for a per-item call)."""
        # At most `workers` calls run at once (the executor's size), so at most that many workers live.
        try:
            w = self._acquire()
        except _WorkerGone as e:
            return [_Failed("error", f"cannot start a reward worker: {e}")] * n
        try:
            kind, payload = w.call(args, self.timeout_s)
        except TimeoutError:
            self._discard(w)
            what = "call" if n == 1 else f"batched call ({n} items)"
            return [_Failed("timeout", f"{what} passed timeout_s={self.timeout_s:g}; worker killed")] * n
        except _WorkerGone as e:
            self._discard(w)
            return [_Failed("error", str(e))] * n
        except Exception as e:          # e.g. an item that cannot be pickled
            self._discard(w)
            return [_Failed("error", f"cannot send the item to the reward worker: {type(e).__name__}: {e}")] * n
        self._release(w)
        if kind == "raised":
            return [_Failed("error", payload)] * n
        if kind == "bad":
            return [_Failed("invalid", payload)] * n
        values = payload if self.batched else [payload]
        return [_Failed(*v) if isinstance(v, tuple) else v for v in values]

    def _score(self, items: list[RewardItem]) -> list[Any]:
        if self._executor is None:
            raise RuntimeError(f"reward {self.name!r} is closed")
        if self.batched:
            chunks = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
            calls = [(([it.prompt for it in c], [it.response for it in c], [it.label for it in c],
                       [it.metadata for it in c]), len(c)) for c in chunks]
        else:
            calls = [((it.prompt, it.response, it.label, it.metadata), 1) for it in items]
        out: list[Any] = []
        for values in self._executor.map(lambda c: self._run(*c), calls):
            out.extend(values)
        return out

    def close(self) -> None:
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=True)
            self._executor = None
        self._finalizer()


# ----------------------------------------------------------------------------------------------
# HTTP reward service


class HTTPReward(Reward):
    """POST {"items": [{"prompt", "response", "label", "metadata"}, ...]} -> {"rewards": [number, ...]}.

    Batches of `batch_size` items, `concurrency` requests in flight. A batch is retried (`retries`
    times, backoff doubling from `backoff_s`) on a timeout, a connection error, 429 or 5xx; another
    4xx is not retried. A batch that still fails scores 0 for each of its items (reason "timeout" or
    "http"); a malformed answer scores 0 ("invalid")."""

    def __init__(self, url: str, *, batch_size: int = 32, timeout_s: float = 30.0, retries: int = 2,
                 backoff_s: float = 0.5, concurrency: int = 1, headers: dict[str, str] | None = None):
        super().__init__(url)
        import httpx

        for key, v, lo in (("batch_size", batch_size, 1), ("retries", retries, 0), ("concurrency", concurrency, 1)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"reward {url!r}: {key} must be an int >= {lo}, got {v!r}")
        for key, v in (("timeout_s", timeout_s), ("backoff_s", backoff_s)):
            if not isinstance(v, (int, float)) or v < 0 or (key == "timeout_s" and v == 0):
                raise ValueError(f"reward {url!r}: {key} must be a number {'> 0' if key == 'timeout_s' else '>= 0'}, "
                                 f"got {v!r}")
        self.url, self.batch_size, self.timeout_s = url, batch_size, float(timeout_s)
        self.retries, self.backoff_s, self.concurrency = retries, float(backoff_s), concurrency
        self._httpx = httpx
        self._client = httpx.Client(timeout=self.timeout_s, headers=dict(headers or {}))
        self._executor = ThreadPoolExecutor(concurrency, thread_name_prefix="reward-http") if concurrency > 1 else None

    def _post(self, batch: list[RewardItem]) -> list[Any]:
        n = len(batch)
        try:
            body = json.dumps({"items": [{"prompt": it.prompt, "response": it.response, "label": it.label,
                                          "metadata": it.metadata} for it in batch]}, allow_nan=False)
        except (TypeError, ValueError) as e:
            return [_Failed("error", f"cannot encode the batch as JSON: {e}")] * n
        httpx = self._httpx
        failure = _Failed("http", "no attempt made")
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                r = self._client.post(self.url, content=body, headers={"content-type": "application/json"})
            except httpx.TimeoutException as e:
                failure = _Failed("timeout", f"no answer within timeout_s={self.timeout_s:g} "
                                  f"({type(e).__name__}) after {attempt + 1} attempt(s)")
                continue
            except httpx.TransportError as e:
                failure = _Failed("http", f"cannot reach {self.url}: {type(e).__name__}: {e} "
                                  f"after {attempt + 1} attempt(s)")
                continue
            if r.status_code >= 400:
                failure = _Failed("http", f"HTTP {r.status_code} from {self.url}: {r.text[:200]!r} "
                                  f"after {attempt + 1} attempt(s)")
                if r.status_code == 429 or r.status_code >= 500:
                    continue
                break
            try:
                rewards = r.json()["rewards"]
            except (ValueError, KeyError, TypeError) as e:
                return [_Failed("invalid", f"answer is not {{\"rewards\": [...]}} JSON ({type(e).__name__}: "
                                f"{str(e)[:80]}); got {r.text[:120]!r}")] * n
            if not isinstance(rewards, list) or len(rewards) != n:
                got = f"{len(rewards)} rewards" if isinstance(rewards, list) else type(rewards).__name__
                return [_Failed("invalid", f"answer has {got} for a batch of {n} items")] * n
            return rewards
        return [failure] * n

    def _score(self, items: list[RewardItem]) -> list[Any]:
        batches = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        results = map(self._post, batches) if self._executor is None else self._executor.map(self._post, batches)
        return [v for values in results for v in values]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._client.close()


# ----------------------------------------------------------------------------------------------
# Built-ins


def _balanced_after(text: str, start: int) -> str | None:
    """Content of the {...} group opening at text[start] (which is '{'), or None when unbalanced."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
    return None


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"^\s*####\s*(.+?)\s*$", re.MULTILINE)
_ANSWER_IS = re.compile(r"(?i)\banswer\s*(?:is|:)\s*:?\s*(.+?)\s*$", re.MULTILINE)


def final_answer(response: str) -> str:
    """The response's final answer: the last \\boxed{...}, else the last `#### X` line, else what
    follows the last "answer is"/"answer:", else the whole response."""
    for m in reversed(list(_BOXED.finditer(response))):
        inner = _balanced_after(response, m.end() - 1)
        if inner is not None:
            return inner
    hashes = _HASHES.findall(response)
    if hashes:
        return hashes[-1]
    said = _ANSWER_IS.findall(response)
    if said:
        return said[-1]
    return response


def normalize_answer(text: str) -> str:
    """NFKC, surrounding whitespace and $...$ / \\(...\\) removed, inner whitespace collapsed, one
    trailing period dropped, case folded."""
    s = unicodedata.normalize("NFKC", text).strip()
    for a, b in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) >= len(a) + len(b) and s.startswith(a) and s.endswith(b):
            s = s[len(a):len(s) - len(b)].strip()
            break
    s = re.sub(r"\s+", " ", s)
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    return s.casefold()


def _label_text(label: Any, reward: str) -> str:
    if isinstance(label, str):
        return label
    if isinstance(label, numbers.Real) and not isinstance(label, bool):
        return str(label)
    raise ValueError(f"reward {reward!r} needs a string or number label, got {type(label).__name__} {label!r}")


def exact_reward(prompt: Any, response: str, label: Any, metadata: dict) -> float:
    """1.0 when normalize_answer(final_answer(response)) == normalize_answer(label), else 0.0."""
    want = normalize_answer(_label_text(label, "exact"))
    if not want:
        raise ValueError("reward 'exact': the label is empty")
    return float(normalize_answer(final_answer(response)) == want)


def math_reward(prompt: Any, response: str, label: Any, metadata: dict) -> float:
    """math-verify: 1.0 when the response's answer is mathematically equal to the label.

    The label is parsed as LaTeX and must yield a math object; one without math delimiters is
    wrapped in $...$ first (a bare "(1, 2)" or "2\\pi" would otherwise be read as a number inside
    it). The response is parsed by
    math-verify's default extraction (the last \\boxed{} first, then answer phrases and expressions).
    A label math-verify cannot parse raises (the sample counts as an error: the label is bad).
    math-verify's own timeouts are off: they would turn a hang into a silent 0.0 (and need the main
    thread); the reward worker's deadline bounds the call and counts it as a timeout instead."""
    from math_verify import parse, verify

    _quiet_math_verify()

    text = _label_text(label, "math").strip()
    if not text:
        raise ValueError("reward 'math': the label is empty")
    delimited = any(d in text for d in ("$", "\\(", "\\[", "\\boxed"))
    # no_fallback: the label must parse to a math object (a raw-string fallback would make a broken
    # label silently unmatchable).
    gold = parse(text if delimited else f"${text}$", fallback_mode="no_fallback", parsing_timeout=None)
    if not gold and not delimited:
        gold = parse(text, fallback_mode="no_fallback", parsing_timeout=None)
    if not gold:
        raise ValueError(f"reward 'math': math-verify cannot parse the label {text!r}")
    pred = parse(response, parsing_timeout=None)
    if not pred:
        return 0.0
    return float(verify(gold, pred, timeout_seconds=None))


class _DropTimeoutDisabled(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


_quiet_done = False


def _quiet_math_verify() -> None:
    """math-verify warns once that its timeouts are off; here a deadline does that job (see math_reward)."""
    global _quiet_done
    if not _quiet_done:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_DropTimeoutDisabled())
        _quiet_done = True


def _decode_json_text(value: Any, what: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} is a string but not JSON ({e.msg})") from None
    return value


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users else ""


def _code_reward(options: dict) -> Reward:
    from k2sys.rewards.code_reward import CodeVerifier
    from k2sys.rewards.sandbox import SandboxConfig, SandboxUnavailable, bwrap_available
    from k2sys.tasks.base import Task

    threads = options.pop("threads", max(1, min(4, os.cpu_count() or 1)))
    if isinstance(options.get("extra_ro_binds"), list):  # JSON/--set gives a list
        options["extra_ro_binds"] = tuple(options["extra_ro_binds"])
    config = SandboxConfig(**options)
    ok, why = bwrap_available(config.bwrap)
    if not ok:
        raise SandboxUnavailable(f"reward 'code' runs the model's programs in the bubblewrap sandbox, which is "
                                 f"not usable here: {why}")
    verifier = CodeVerifier(config)

    def score(item: RewardItem) -> float:
        cases = _decode_json_text(item.label, "reward 'code': the label")
        if not isinstance(cases, list) or not cases:
            raise ValueError(f"reward 'code' needs a label of test cases [{{'input', 'output'}}, ...], "
                             f"got {type(cases).__name__}")
        tests = []
        for k, c in enumerate(cases):
            if not (isinstance(c, dict) and isinstance(c.get("input"), str) and isinstance(c.get("output"), str)):
                raise ValueError(f"reward 'code': label[{k}] must be {{'input': str, 'output': str}}, got {c!r}"[:200])
            tests.append({"stdin": c["input"], "stdout": c["output"]})
        task = Task(prompt=_prompt_text(item.prompt), answer="", family="code", meta={"tests": tests})
        return verifier(task, item.response)

    return CallableReward("code", score, threads=threads)


def _instruction_reward(options: dict) -> Reward:
    from k2sys.rewards.instruction import InstructionVerifier
    from k2sys.tasks.base import Task

    verifier = InstructionVerifier(**options)

    def score(item: RewardItem) -> float:
        constraints = item.label if item.label is not None else item.metadata.get("constraints")
        constraints = _decode_json_text(constraints, "reward 'instruction': the constraints")
        if not isinstance(constraints, list) or not constraints:
            raise ValueError("reward 'instruction' needs the constraints (a non-empty list of {'kind', ...}) "
                             "in the label or in metadata['constraints']")
        task = Task(prompt=_prompt_text(item.prompt), answer="", family="instruction",
                    meta={"constraints": constraints})
        return verifier(task, item.response)

    return CallableReward("instruction", score)


_PYTHON_OPTIONS = ("timeout_s", "workers", "batched", "batch_size", "startup_timeout_s")
_OPTIONS = {
    "math": ("timeout_s", "workers", "startup_timeout_s"),
    "exact": (),
    "code": ("time_limit_s", "memory_limit_mb", "max_output_bytes", "max_processes", "max_file_bytes",
             "max_open_files", "tmpfs_size_mb", "seccomp", "host_uid", "python", "bwrap", "extra_ro_binds",
             "threads"),
    "instruction": ("partial_credit", "hack_penalty"),
    "python": _PYTHON_OPTIONS,
    "http": ("batch_size", "timeout_s", "retries", "backoff_s", "concurrency", "headers"),
}
_ATTR = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")
_FORMS_TEXT = ("a built-in ({}), a Python function 'module:function' or 'path/to/file.py:function', "
               "or a reward service URL 'http(s)://host[:port]/path'")


def _check_options(spec: str, kind: str, options: dict) -> None:
    bad = sorted(set(options) - set(_OPTIONS[kind]))
    if bad:
        allowed = ", ".join(_OPTIONS[kind]) or "none"
        raise TypeError(f"reward {spec!r} does not take option(s) {', '.join(bad)}; it takes: {allowed}")


def make_reward(spec: str, **options: Any) -> Reward:
    """A reward from its spec (see the module doc); options configure it and unknown ones are refused."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec must be a non-empty string: {_FORMS_TEXT.format(', '.join(BUILTINS))}")
    spec = spec.strip()
    if spec in BUILTINS:
        _check_options(spec, spec, options)
        if spec == "math":
            if importlib.util.find_spec("math_verify") is None:
                raise ImportError("reward 'math' needs the math-verify package: "
                                  "pip install 'math-verify[antlr4_13_2]' (or pip install 'k2sys[rewards]')")
            return PythonReward("math", os.path.abspath(__file__), "math_reward", is_file=True, batched=False,
                                **options)
        if spec == "exact":
            return CallableReward("exact", lambda it: exact_reward(it.prompt, it.response, it.label, it.metadata))
        if spec == "code":
            return _code_reward(dict(options))
        return _instruction_reward(dict(options))
    if re.match(r"(?i)^https?://", spec):
        _check_options(spec, "http", options)
        return HTTPReward(spec, **options)
    if ":" in spec:
        target, attr = spec.rsplit(":", 1)
        is_file = target.endswith(".py") or os.sep in target or "/" in target
        if _ATTR.match(attr) and target:
            _check_options(spec, "python", options)
            if is_file:
                path = os.path.abspath(target)
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"reward {spec!r}: no Python file {path}")
                return PythonReward(spec, path, attr, is_file=True, **options)
            if _ATTR.match(target):
                if importlib.util.find_spec(target.split(".")[0]) is None:
                    raise ImportError(f"reward {spec!r}: no module named {target.split('.')[0]!r} on sys.path; "
                                      f"install it, or give a file path 'path/to/file.py:{attr}'")
                return PythonReward(spec, target, attr, is_file=False, **options)
    raise ValueError(f"unknown reward {spec!r}; expected {_FORMS_TEXT.format(', '.join(BUILTINS))}")
