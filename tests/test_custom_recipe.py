"""`k2sys run custom`: a user's own checkpoint (FP8 release format, kimi_k2 config), prompt JSONL with
its own keys, SFT conversations and a `path/file.py:function` reward, end to end through the
coordinator on CPU, as the README's "Post-train your own model" section runs it (shrunk)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # file total > 30 s on a 2-core CPU: scheduled first (conftest)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("own")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, str(ROOT / "examples/own_model/make_release_checkpoint.py"), str(tmp / "own"),
                    "--sft-rows", "400"], check=True, env=env, capture_output=True)
    own = tmp / "own"
    cmd = [sys.executable, "-m", "k2sys.cli", "run", "custom", "--set", f"output_root={tmp / 'runs'}",
           f"model.path={own / 'Kimi-K2-tiny'}", f"data.rl_prompts={own / 'prompts.jsonl'}", "data.prompt_key=question",
           "data.label_key=target", f"data.sft={own / 'sft.jsonl'}", "sft.steps=80",
           f"reward={own / 'reward.py'}:score", "rl.iterations=6"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return own, tmp / "runs" / "custom"


def test_the_checkpoint_is_in_the_release_format(run):
    own, _ = run
    cfg = json.loads((own / "Kimi-K2-tiny" / "config.json").read_text())
    assert cfg["model_type"] == "kimi_k2" and cfg["quantization_config"]["quant_method"] == "fp8"
    index = json.loads((own / "Kimi-K2-tiny" / "model.safetensors.index.json").read_text())
    assert any(k.endswith("weight_scale_inv") for k in index["weight_map"])


def test_reward_rises(run):
    _, d = run
    rewards = [json.loads(l)["reward/user"] for l in (d / "metrics.jsonl").read_text().splitlines()
               if json.loads(l)["kind"] == "rl"]
    assert len(rewards) == 6
    assert sum(rewards[-2:]) / 2 > rewards[0] + 0.05, rewards
    report = json.loads((d / "report.json").read_text())
    before, after = report["eval"]["sft"]["user"]["accuracy"], report["eval"]["rl"]["user"]["accuracy"]
    assert after >= before + 0.10, (before, after)


def test_bad_rows_and_reward_failures_are_reported_not_fatal(run):
    _, d = run
    rep = json.loads((d / "data" / "rl_prompts_report.json").read_text())
    assert [b["line"] for b in rep["bad_rows"]] == [4, 8]
    assert "target" in rep["bad_rows"][0]["reason"]
    last = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if json.loads(l)["kind"] == "rl"][-1]
    assert last["reward_failed"] > 0 and last["reward_failed/error"] == last["reward_failed"]
    assert "failed and scored 0" in (d / "report.md").read_text()


def test_export_keeps_the_model_type_and_tokenizer(run):
    _, d = run
    cfg = json.loads((d / "final_hf" / "config.json").read_text())
    assert cfg["model_type"] == "kimi_k2" and "quantization_config" not in cfg
    assert (d / "final_hf" / "tokenizer.json").exists()
