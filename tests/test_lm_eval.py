"""lm-evaluation-harness against a running `k2sys serve`: a tiny local multiple-choice task through
`local-completions` (loglikelihood = /v1/completions with echo + logprobs, the prompt's log-probs
computed in the engine's prefill), equal to lm-eval's own transformers backend (`hf`) on the same
fp32 checkpoint, request by request; and a generate_until task through the same server."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from k2sys.models import build_model, k2_tiny, save_hf
from k2sys.tokenizer import default_corpus, train_tokenizer

pytestmark = pytest.mark.slow  # file total > 30 s on a 2-core CPU: scheduled first (conftest)

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

QUESTIONS = [
    ("What is the weather today?", ["sunny", "rain at night", "a meeting"], 0),
    ("When is the meeting?", ["Thursday at three", "the slides", "twenty degrees"], 0),
    ("What does the assistant do first?", ["reads the question", "invents facts", "rain"], 0),
    ("How are numbers written?", ["with digits", "with words only", "never"], 0),
    ("What predicts the next token?", ["a language model", "the weather", "a room"], 0),
]

TASK_YAML = """task: k2sys_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""

GEN_YAML = """task: k2sys_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices[0]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    tok = train_tokenizer(default_corpus(300), 512, root / "tok")
    cfg = dataclasses.replace(k2_tiny(vocab_size=512), initializer_range=0.05, eos_token_id=None)
    ckpt = save_hf(build_model(cfg, seed=12), root / "model", tokenizer=tok)
    tasks = root / "tasks"
    tasks.mkdir()
    data = root / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (tasks / "k2sys_tiny_mc.yaml").write_text(TASK_YAML.format(data=data, cache=root / "hf_cache"))
    (tasks / "k2sys_tiny_gen.yaml").write_text(GEN_YAML.format(data=data, cache=root / "hf_cache"))
    return ckpt, tasks


@pytest.fixture(scope="module")
def server(setup):
    """`k2sys serve` as a separate process, as a user runs it."""
    import socket

    ckpt, _ = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "k2sys.engine.api.server", "--model", str(ckpt), "--port", str(port),
                             "--dtype", "float32", "--max-model-len", "512"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
            assert proc.poll() is None, proc.stdout.read().decode()
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(model: str, model_args: dict, task: str, tasks_dir, batch_size: int = 1) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args, tasks=[task], batch_size=batch_size, device="cpu",
                           log_samples=True, task_manager=TaskManager(include_path=str(tasks_dir)))


def loglikelihoods(res: dict, task: str) -> dict[tuple, tuple[float, bool]]:
    out = {}
    for s in res["samples"][task]:
        for args, resp in zip(s["arguments"], s["resps"]):
            key = (s["doc_id"], args[0] if isinstance(args, (list, tuple)) else args["arg_0"],
                   args[1] if isinstance(args, (list, tuple)) else args["arg_1"])
            ll, greedy = resp[0]
            out[key] = (float(ll), bool(greedy))
    return out


def test_local_completions_loglikelihood_equals_transformers(setup, server):
    ckpt, tasks = setup
    api = run("local-completions", {"model": "k2sys-native", "base_url": server + "/v1/completions",
                                    "tokenizer": str(ckpt), "tokenizer_backend": "huggingface",
                                    "num_concurrent": 1, "max_retries": 1}, "k2sys_tiny_mc", tasks, batch_size=4)
    ref = run("hf", {"pretrained": str(ckpt), "dtype": "float32"}, "k2sys_tiny_mc", tasks)
    got, want = loglikelihoods(api, "k2sys_tiny_mc"), loglikelihoods(ref, "k2sys_tiny_mc")
    assert len(got) == sum(len(c) for _, c, _ in QUESTIONS) and got.keys() == want.keys()
    for key in want:
        assert abs(got[key][0] - want[key][0]) <= 1e-4, (key, got[key], want[key])
        assert got[key][1] == want[key][1], key
    acc = api["results"]["k2sys_tiny_mc"]["acc,none"]
    assert acc == ref["results"]["k2sys_tiny_mc"]["acc,none"]


def test_local_completions_generate_until(setup, server):
    ckpt, tasks = setup
    api = run("local-completions", {"model": "k2sys-native", "base_url": server + "/v1/completions",
                                    "tokenizer": str(ckpt), "tokenizer_backend": "huggingface",
                                    "num_concurrent": 1, "max_retries": 1}, "k2sys_tiny_gen", tasks)
    ref = run("hf", {"pretrained": str(ckpt), "dtype": "float32"}, "k2sys_tiny_gen", tasks)
    got = [s["resps"][0][0] for s in sorted(api["samples"]["k2sys_tiny_gen"], key=lambda s: s["doc_id"])]
    want = [s["resps"][0][0] for s in sorted(ref["samples"]["k2sys_tiny_gen"], key=lambda s: s["doc_id"])]
    assert got == want and len(got) == len(QUESTIONS)
