"""Rewards by name: math-verify, exact, code (sandbox), instruction, a user's module:function in worker
processes with real deadlines, and an HTTP reward service started here; failures score 0 and are counted."""

import json
import logging
import math
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from k2sys.rewards import (BUILTINS, FAILURE_REASONS, RewardItem, RewardResult, SandboxUnavailable, bwrap_available,
                           make_reward)
from k2sys.rewards.registry import final_answer, normalize_answer

_BWRAP_OK, _BWRAP_WHY = bwrap_available()
needs_bwrap = pytest.mark.skipif(not _BWRAP_OK, reason=f"bubblewrap sandbox unavailable: {_BWRAP_WHY}")


def items(*triples, prompt="p"):
    return [RewardItem(prompt=prompt, response=r, label=l) for r, l in triples]


# ----------------------------------------------------------------------------------------------
# math (math-verify)

MATH_CASES = [
    # (response, label, expected)
    ("so the answer is \\boxed{1/2}", "0.5", 1.0),
    ("The answer is $\\frac{1}{2}$", 0.5, 1.0),                 # LaTeX response, number label
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),                      # plain response, LaTeX label
    ("We get \\boxed{2^{1/2}}", "\\sqrt{2}", 1.0),              # undelimited LaTeX label
    ("Therefore \\boxed{1+x^2}.", "x^2+1", 1.0),
    ("The interval is \\boxed{(1, 2)}", "(1, 2)", 1.0),
    ("\\boxed{2\\pi}", "2\\pi", 1.0),
    ("I think \\boxed{4}", "3", 0.0),
    ("\\boxed{\\frac{1}{3}}", "0.5", 0.0),
    ("no number here at all", "7", 0.0),
    ("First 3, then finally \\boxed{12}", 12, 1.0),
]


@pytest.fixture(scope="module")
def math_reward():
    pytest.importorskip("math_verify")
    r = make_reward("math", workers=1, timeout_s=60)
    yield r
    r.close()


def test_math_verify_cases(math_reward):
    res = math_reward(items(*[(r, l) for r, l, _ in MATH_CASES]))
    assert res.rewards == [e for _, _, e in MATH_CASES] and res.errors == []


def test_math_bad_label_scores_zero_and_is_counted(math_reward):
    before = math_reward.stats()["failures"]["error"]
    res = math_reward(items(("\\boxed{1}", "\\frac{"), ("\\boxed{1}", [1, 2]), ("\\boxed{1}", "1")))
    assert res.rewards == [0.0, 0.0, 1.0]
    assert [(e.index, e.reason) for e in res.errors] == [(0, "error"), (1, "error")]
    assert "cannot parse the label" in res.errors[0].message and "string or number label" in res.errors[1].message
    assert math_reward.stats()["failures"]["error"] == before + 2


# ----------------------------------------------------------------------------------------------
# exact


def test_final_answer_and_normalization():
    assert final_answer("x \\boxed{a} then \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert final_answer("work\n#### 42\n") == "42"
    assert final_answer("The final answer is: Paris.") == "Paris."
    assert final_answer("  Paris ") == "  Paris "
    assert normalize_answer("  $ New   York. $ ") == "new york"
    assert normalize_answer("\\(x\\)") == "x"
    assert normalize_answer("ＡＢＣ") == "abc"                  # NFKC full-width letters


def test_exact_reward():
    r = make_reward("exact")
    res = r(items(("The answer is Paris.", "paris"), ("\\boxed{ 42 }", 42), ("#### 41", "42"),
                  ("London", "Paris"), ("x", None), ("x", "  ")))
    assert res.rewards == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert res.failures == {"error": 2} and r.stats()["items"] == 6


# ----------------------------------------------------------------------------------------------
# instruction and code built-ins


def test_instruction_reward_label_or_metadata():
    r = make_reward("instruction")
    cons = [{"kind": "bullets", "count": 2}, {"kind": "include", "keywords": ["budget"]}]
    good, bad = "- budget first\n- then scope", "- one budget point"
    res = r([RewardItem("list two", good, cons), RewardItem("list two", bad, cons),
             RewardItem("list two", good, None, {"constraints": json.dumps(cons)}),
             RewardItem("list two", good, None, {})])
    assert res.rewards == [1.0, 0.0, 1.0, 0.0]
    assert [(e.index, e.reason) for e in res.errors] == [(3, "error")]
    partial = make_reward("instruction", partial_credit=True)
    assert partial([RewardItem("p", bad, cons)]).rewards == [0.5]


def test_code_reward_refuses_without_sandbox():
    with pytest.raises(SandboxUnavailable, match="bubblewrap.*not found"):
        make_reward("code", bwrap="/nonexistent/bwrap")


@needs_bwrap
def test_code_reward_runs_tests_in_sandbox():
    r = make_reward("code", time_limit_s=2.0, threads=2)
    tests = [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4\n", "output": "6"}]
    right = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    half = "a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)"
    res = r([RewardItem("add", right, tests), RewardItem("add", half, json.dumps(tests)),
             RewardItem("add", right, [{"stdin": "1", "stdout": "1"}])])
    assert res.rewards == [1.0, 0.5, 0.0]
    assert [(e.index, e.reason) for e in res.errors] == [(2, "error")] and "'input'" in res.errors[0].message
    r.close()


# ----------------------------------------------------------------------------------------------
# the user's Python function

USER_FILE = '''
import math, os, re, time

print("imported: this line must not corrupt the worker protocol")

def score(prompt, response, label, metadata):
    print("scoring", response)
    if response == "raise":
        raise RuntimeError("user bug")
    if response == "sleep":
        time.sleep(60)
    if response == "regex":            # catastrophic backtracking: C code holding the GIL
        re.match(r"(a+)+$", "a" * 64 + "b")
    if response == "nan":
        return math.nan
    if response == "inf":
        return -math.inf
    if response == "text":
        return "1.0"
    if response == "exit":
        os._exit(3)
    return float(response == label) + metadata.get("bonus", 0.0)

def per_batch(prompts, responses, labels, metadata):
    # reward = size of the batch the item arrived in, so the test sees the chunking
    if "raise" in responses:
        raise ValueError("batch failed")
    if "short" in responses:
        return [1.0]
    return [float(len(responses))] * len(responses)
per_batch.batched = True

def two_args(prompt, response):
    return 1.0

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def user_file(tmp_path):
    p = tmp_path / "my_reward.py"
    p.write_text(textwrap.dedent(USER_FILE))
    return p


def test_user_function_from_file(user_file, caplog):
    r = make_reward(f"{user_file}:score", workers=2, timeout_s=2.0)
    try:
        assert r.batched is False
        with caplog.at_level(logging.WARNING, logger="k2sys.rewards"):
            res = r([RewardItem("p", "yes", "yes"), RewardItem("p", "no", "yes"),
                     RewardItem("p", "yes", "yes", {"bonus": 0.5}), RewardItem("p", "raise", "x"),
                     RewardItem("p", "nan", "x"), RewardItem("p", "inf", "x"), RewardItem("p", "text", "x")])
        assert res.rewards == [1.0, 0.0, 1.5, 0.0, 0.0, 0.0, 0.0]
        assert [(e.index, e.reason) for e in res.errors] == [(3, "error"), (4, "invalid"), (5, "invalid"),
                                                             (6, "invalid")]
        assert "RuntimeError: user bug" in res.errors[0].message and "my_reward.py" in res.errors[0].message
        assert res.failures == {"error": 1, "invalid": 3}
        assert "user bug" in caplog.text and "scored 0" in caplog.text
        assert r.stats() == {"items": 7, "failed": 4, "failures": {"error": 1, "timeout": 0, "invalid": 3, "http": 0}}
    finally:
        r.close()


def test_hung_function_is_killed_at_its_deadline(user_file):
    r = make_reward(f"{user_file}:score", workers=2, timeout_s=1.0)
    try:
        t0 = time.monotonic()
        res = r([RewardItem("p", "sleep", "x"), RewardItem("p", "regex", "x"), RewardItem("p", "ok", "ok")])
        elapsed = time.monotonic() - t0
        assert res.rewards == [0.0, 0.0, 1.0]
        assert [(e.index, e.reason) for e in res.errors] == [(0, "timeout"), (1, "timeout")]
        assert elapsed < 10, f"hung calls held the batch for {elapsed:.1f} s with timeout_s=1"
        # A worker that dies is replaced too; the reward keeps working.
        res = r([RewardItem("p", "exit", "x"), RewardItem("p", "a", "a"), RewardItem("p", "b", "b")])
        assert res.rewards == [0.0, 1.0, 1.0] and res.errors[0].reason == "error"
        assert "died" in res.errors[0].message
        assert r.stats()["failures"] == {"error": 1, "timeout": 2, "invalid": 0, "http": 0}
    finally:
        r.close()
    assert all(w.proc.poll() is not None for w in r._all) and r._all == []


def test_batched_function_and_importable_module(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))       # the worker gets the parent's sys.path
    r = make_reward("my_reward:per_batch", batch_size=4, workers=1)
    try:
        assert r.batched is True
        res = r(items(*[(f"r{i}", None) for i in range(10)]))
        assert res.rewards == [4.0] * 8 + [2.0] * 2 and res.errors == []
        res = r(items(("a", None), ("raise", None), ("b", None), ("c", None), ("d", None), ("short", None)))
        # the first batch of 4 raised; the second returned 1 value for 2 items
        assert res.rewards == [0.0] * 6
        assert [e.reason for e in res.errors] == ["error"] * 4 + ["invalid"] * 2
        assert "1 values for 2 items" in res.errors[-1].message
    finally:
        r.close()
    # batched=True given as an option works for a function without the attribute
    r = make_reward(f"{user_file}:per_batch", batched=True, batch_size=3, workers=1)
    try:
        assert r(items(*[("x", None)] * 5)).rewards == [3.0, 3.0, 3.0, 2.0, 2.0]
    finally:
        r.close()


def test_bad_specs_fail_at_make_time(user_file):
    with pytest.raises(ValueError) as ei:
        make_reward("nonsense")
    msg = str(ei.value)
    assert all(name in msg for name in BUILTINS) and "module:function" in msg and "http" in msg
    with pytest.raises(ValueError, match="unknown reward"):
        make_reward("ftp://example.com/reward")
    with pytest.raises(ValueError, match="cannot load the function.*no attribute 'missing'"):
        make_reward(f"{user_file}:missing")
    with pytest.raises(ValueError, match="not a function"):
        make_reward(f"{user_file}:NOT_A_FUNCTION")
    with pytest.raises(ValueError, match=r"must accept \(prompt, response, label, metadata\)"):
        make_reward(f"{user_file}:two_args")
    with pytest.raises(FileNotFoundError, match="no Python file"):
        make_reward(f"{user_file.parent}/absent.py:score")
    with pytest.raises(ImportError, match="no module named 'no_such_module_k2'"):
        make_reward("no_such_module_k2:score")
    with pytest.raises(TypeError, match="does not take option.*retries.*takes: timeout_s"):
        make_reward(f"{user_file}:score", retries=3)
    with pytest.raises(TypeError, match="'exact' does not take option"):
        make_reward("exact", timeout_s=1)
    with pytest.raises(ValueError, match="batch_size applies to batched functions"):
        make_reward(f"{user_file}:score", batch_size=8)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        make_reward(f"{user_file}:score", timeout_s=0)
    with pytest.raises(TypeError, match="expected RewardItem"):
        make_reward("exact")([{"prompt": "p", "response": "r", "label": "l"}])
    assert set(FAILURE_REASONS) == {"error", "timeout", "invalid", "http"}


# ----------------------------------------------------------------------------------------------
# HTTP reward service


class _Service:
    """A reward service on localhost: records every batch it receives; the path picks a behaviour."""

    def __init__(self):
        self.batches: list[list[dict]] = []
        self.hits: dict[str, int] = {}
        svc = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                svc.hits[self.path] = svc.hits.get(self.path, 0) + 1
                its = body["items"]
                if self.path == "/score":
                    svc.batches.append(its)
                    out = {"rewards": [float(i["response"] == i["label"]) + i["metadata"].get("bonus", 0)
                                       for i in its]}
                elif self.path == "/flaky" and svc.hits[self.path] <= 2:
                    return self._send(503, {"error": "warming up"})
                elif self.path == "/flaky":
                    out = {"rewards": [1.0] * len(its)}
                elif self.path == "/500":
                    return self._send(500, {"error": "boom"})
                elif self.path == "/400":
                    return self._send(400, {"error": "bad request"})
                elif self.path == "/slow":
                    time.sleep(1.5)
                    out = {"rewards": [1.0] * len(its)}
                elif self.path == "/short":
                    out = {"rewards": [1.0]}
                elif self.path == "/mixed":
                    out = {"rewards": [1.0, None, "x", 0.25][:len(its)]}
                else:
                    out = {"wrong": True}
                self._send(200, out)

            def _send(self, code, obj):
                blob = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(blob)))
                self.end_headers()
                try:
                    self.wfile.write(blob)
                except (BrokenPipeError, ConnectionResetError):
                    pass                # the client gave up (the timeout test)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def service():
    s = _Service()
    yield s
    s.close()


def test_http_batches_items_as_sent(service):
    r = make_reward(f"{service.url}/score", batch_size=4)
    msgs = [{"role": "user", "content": "q"}]
    its = [RewardItem(msgs if i == 0 else f"prompt {i}", str(i % 2), "1", {"bonus": 0.5} if i == 9 else {})
           for i in range(10)]
    res = r(its)
    assert [len(b) for b in service.batches] == [4, 4, 2]
    sent = [x for b in service.batches for x in b]
    assert sent[0] == {"prompt": msgs, "response": "0", "label": "1", "metadata": {}}
    assert [x["prompt"] for x in sent[1:]] == [f"prompt {i}" for i in range(1, 10)]
    assert sent[9]["metadata"] == {"bonus": 0.5}
    assert res.rewards == [float(i % 2) for i in range(9)] + [1.5] and res.errors == []
    r.close()
    # concurrent requests: results stay in item order
    service.batches.clear()
    with make_reward(f"{service.url}/score", batch_size=2, concurrency=3) as r:
        res = r(items(*[(str(i % 3), "0") for i in range(11)]))
    assert res.rewards == [float(i % 3 == 0) for i in range(11)]
    assert sorted(len(b) for b in service.batches) == [1, 2, 2, 2, 2, 2]


def test_http_retries_then_succeeds(service):
    r = make_reward(f"{service.url}/flaky", retries=2, backoff_s=0.01)
    res = r(items(("a", "b")))
    assert res.rewards == [1.0] and res.errors == [] and service.hits["/flaky"] == 3
    r.close()


def test_http_failures_score_zero_and_are_counted(service):
    r500 = make_reward(f"{service.url}/500", retries=1, backoff_s=0.01, batch_size=2)
    res = r500(items(("a", "a"), ("b", "b"), ("c", "c")))
    assert res.rewards == [0.0, 0.0, 0.0] and res.failures == {"http": 3}
    assert "HTTP 500" in res.errors[0].message and service.hits["/500"] == 4      # 2 batches x (1 + 1 retry)
    assert r500.stats()["failures"]["http"] == 3

    r400 = make_reward(f"{service.url}/400", retries=3, backoff_s=0.01)
    assert r400(items(("a", "a"))).failures == {"http": 1} and service.hits["/400"] == 1   # 4xx: no retry

    slow = make_reward(f"{service.url}/slow", timeout_s=0.3, retries=1, backoff_s=0.01)
    t0 = time.monotonic()
    res = slow(items(("a", "a"), ("b", "b")))
    assert res.rewards == [0.0, 0.0] and res.failures == {"timeout": 2}
    assert time.monotonic() - t0 < 1.5

    short = make_reward(f"{service.url}/short")
    res = short(items(("a", "a"), ("b", "b")))
    assert res.failures == {"invalid": 2} and "1 rewards for a batch of 2" in res.errors[0].message
    wrong = make_reward(f"{service.url}/wrong")
    assert wrong(items(("a", "a"))).failures == {"invalid": 1}
    mixed = make_reward(f"{service.url}/mixed")
    res = mixed(items(("a", "a"), ("b", "b"), ("c", "c"), ("d", "d")))
    assert res.rewards == [1.0, 0.0, 0.0, 0.25] and [e.index for e in res.errors] == [1, 2]

    # Nothing listening: a connection error, counted as http after the retries.
    dead = make_reward("http://127.0.0.1:9/reward", retries=1, backoff_s=0.01, timeout_s=2)
    res = dead(items(("a", "a")))
    assert res.failures == {"http": 1} and "cannot reach" in res.errors[0].message
    for r in (r500, r400, slow, short, wrong, mixed, dead):
        r.close()


def test_result_counts():
    res = RewardResult([0.0, 1.0, 0.0], [])
    assert res.failures == {} and res.n_failed == 0
    assert math.isfinite(sum(res.rewards))
