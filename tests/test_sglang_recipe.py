"""The recipe with engine.kind=sglang: the SGLang sink is chosen and the whole colocated cycle goes
through SGLang's routes. On CPU the engine is tests/fake_sglang_server.py (sglang's own argument
parser, request classes and payload decoding in front of the native engine); on a GPU with sglang
installed, the real `sglang.launch_server` (gpu marker)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ARGS = ["--set", "sft.steps=4", "--set", "rl.iterations=2", "--set", "tasks.n_train=60", "--set", "eval.n_tasks=4",
        "--set", "rl.filter_prompts=0", "--set", "rollout.prompts_per_iter=2", "--set", "rollout.samples_per_prompt=2",
        "--set", "rl.mismatch_probe=2", "--set", "rl.inner_steps=1", "--set", "engine.kind=sglang",
        "--set", "engine.update_bucket_mb=1"]


def _run(tmp_path: Path, name: str, extra: list[str], env: dict) -> Path:
    cmd = [sys.executable, "-m", "k2sys.cli", "run", "tiny-k2", "--set", f"name={name}",
           "--set", f"output_root={tmp_path}", *ARGS, *extra]
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=1500)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return tmp_path / name


def _records(run: Path, kind: str) -> list[dict]:
    return [r for line in (run / "metrics.jsonl").read_text().splitlines() if (r := json.loads(line))["kind"] == kind]


def _check_cycle(log: list[dict], iterations: int, tp: int, update_route: str) -> None:
    """One colocated switch per iteration, in SGLang's order, the version checked after each update."""
    inits = [i for i, r in enumerate(log) if r["route"] == "/init_weights_update_group"]
    if update_route == "/update_weights_from_distributed":  # the NCCL group is made once, before the first push
        first_begin = next(i for i, r in enumerate(log) if r["route"] == "/begin_weight_update")
        assert len(inits) == 1 and inits[0] < first_begin
    log = [r for i, r in enumerate(log) if i not in inits]
    routes = [r["route"] for r in log]
    ends = [i for i, r in enumerate(routes) if r == "/end_weight_update"]
    assert len(ends) == iterations, routes
    for k, end in enumerate(ends):
        begin = max(i for i in range(end) if routes[i] == "/begin_weight_update")
        before, updates = routes[:begin], routes[begin + 1:end]
        assert updates and set(updates) == {update_route}
        rel = max(i for i, r in enumerate(before) if r == "/release_memory_occupation")
        assert routes[rel - 1] == "/pause_generation" and log[rel - 1]["mode"] == "abort"
        assert log[rel]["tags"] == ["kv_cache", "weights", "cuda_graph"]
        assert routes[begin - 1] == "/resume_memory_occupation" and log[begin - 1]["tags"] == ["weights"]
        bodies = log[begin + 1:end]
        assert all(b["version"] == str(k + 1) for b in bodies)  # the policy version each push sets
        if update_route == "/update_weights_from_tensor":
            assert all(b["entries"] == tp and b["load_format"] == "flattened_bucket" and b["flush_cache"] is False
                       for b in bodies)
        after = routes[end + 1:end + 4]
        assert after == ["/resume_memory_occupation", "/flush_cache", "/continue_generation"], after
        assert log[end + 1]["tags"] == ["kv_cache", "cuda_graph"]


@pytest.mark.slow
@pytest.mark.parametrize("sync,tp", [("tensor", 2), ("distributed", 1)])
def test_recipe_with_sglang_engine_cpu(tmp_path, sync, tp):
    pytest.importorskip("sglang")
    ref = pytest.importorskip("sglang_ref")
    try:
        ref.prepare()
    except ImportError as e:
        pytest.skip(str(e))
    log_path = tmp_path / f"{sync}.routes.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "K2SYS_FAKE_SGLANG_LOG": str(log_path),
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    run = _run(tmp_path, f"sgl-{sync}", ["--set", "engine.sglang_module=fake_sglang_server", "--set", f"engine.tp={tp}",
                                          "--set", f"engine.weight_sync={sync}"], env)
    engine_log = (run / "logs" / "engine.log").read_text()
    assert "fake_sglang_server" not in engine_log or "Traceback" not in engine_log, engine_log[-3000:]
    sink = {"tensor": "SGLangTensorSink", "distributed": "SGLangDistributedSink"}[sync]
    assert f"(weights in through {sink})" in (tmp_path / f"sgl-{sync}.log").read_text()
    log = [json.loads(line) for line in log_path.read_text().splitlines()]
    route = {"tensor": "/update_weights_from_tensor", "distributed": "/update_weights_from_distributed"}[sync]
    _check_cycle(log, 2, tp, route)
    pushes = [r for r in _records(run, "switch") if "update_weights_s" in r]
    assert [r["step"] for r in pushes] == [1, 2]
    for rec in pushes:
        assert rec["update_weights_copy_ratio"] == pytest.approx(1.0)  # trainer host copy -> out-buckets, once
        assert rec["update_weights_bytes"] > 0 and rec["update_weights_buckets"] == 0  # one process: no broadcast
    rl = _records(run, "rl")
    assert [r["step"] for r in rl] == [1, 2]
    # the engine and the trainer held the same weights: the probe's log-prob gap is float noise
    probes = [r["probe_mismatch/mean_abs"] for r in rl if "probe_mismatch/mean_abs" in r]
    assert probes and all(p < 1e-3 for p in probes), probes


def _sglang_launchable() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("sglang") is not None and \
        importlib.util.find_spec("sgl_kernel") is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _sglang_launchable(), reason="needs a GPU and a full sglang==0.5.23 install")
def test_recipe_with_real_sglang_gpu(tmp_path):  # pragma: no cover - GPU only
    """The tiny recipe on one GPU, colocated with the real SGLang; records switch times, the device
    memory of every switch and the mismatch probe (scripts/gpu_check.sh runs it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "8"}
    run = _run(tmp_path, "sgl-gpu", ["--set", "engine.mem_fraction_static=0.35"], env)
    switch, rl = _records(run, "switch"), _records(run, "rl")
    by = {(r["step"], k.rsplit("_s", 1)[0]): r for r in switch for k in r if k.endswith("_s")}
    assert [r["step"] for r in rl] == [1, 2]
    for it in (1, 2):
        assert by[(it, "update_weights")]["update_weights_copy_ratio"] == pytest.approx(1.0)
        # after offload the trainer's cached blocks went back to the driver: the device has more free
        assert by[(it, "offload_trainer")]["offload_trainer_device_free"] > \
            by[(it, "onload_trainer")]["onload_trainer_device_free"]
    assert all("probe_mismatch/mean_abs" in r for r in rl)
    out = os.environ.get("OUT")
    if out:
        Path(out, "sglang_recipe_switch.json").write_text(json.dumps({"switch": switch, "rl": rl}, indent=1))
