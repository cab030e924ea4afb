"""The recipe end to end through the real coordinator, engine server and trainer, with fault drills:
the engine server is SIGKILLed mid-RL (the coordinator restarts it and goes on), then the
coordinator itself is SIGKILLed and the same command resumes with no lost iteration."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ITERS = 4
ARGS = ["--set", "sft.steps=10", "--set", f"rl.iterations={ITERS}", "--set", "tasks.n_train=100",
        "--set", "eval.n_tasks=10", "--set", "rl.filter_prompts=16", "--set", "rollout.prompts_per_iter=4",
        "--set", "rollout.samples_per_prompt=4", "--set", "rl.mismatch_probe=2", "--set", "sft.checkpoint_every=5"]


def _rl_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec["kind"] == "rl":
            steps.append(rec["step"])
    return steps


def _start(root: Path, name: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "k2sys.cli", "run", "tiny-k2", "--set", f"name={name}",
           "--set", f"output_root={root}", *ARGS]
    return subprocess.Popen(cmd, stdout=open(root / f"{name}.log", "ab"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _wait(cond, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"run exited with {proc.returncode} before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_engine_crash_and_coordinator_kill9_resume(tmp_path):
    run = tmp_path / "drill"
    p = _start(tmp_path, "drill")
    try:
        _wait(lambda: len(_rl_steps(run)) >= 1, p, 600, "the first RL iteration")
        engine_pid = int((run / "engine.pid").read_text())
        os.kill(engine_pid, signal.SIGKILL)  # the engine dies; the trainer must not restart
        _wait(lambda: len(_rl_steps(run)) >= 3, p, 600, "RL iterations after the engine crash")
        engine_pid = int((run / "engine.pid").read_text())
        os.killpg(p.pid, signal.SIGKILL)  # kill -9 the coordinator (and its process group)
        p.wait()
        _wait(lambda: not _alive(engine_pid), subprocess.Popen(["sleep", "30"]), 20, "the orphaned engine to exit")
        p = _start(tmp_path, "drill")  # the same command again
        assert p.wait(timeout=900) == 0, (tmp_path / "drill.log").read_text()[-3000:]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    state = json.loads((run / "state.json").read_text())
    assert state["rl_iter"] == ITERS
    steps = _rl_steps(run)
    assert set(steps) == set(range(1, ITERS + 1)), steps  # no iteration lost
    faults = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"fault"' in x]
    assert faults and faults[0]["engine_restarted"] == 1
    report = json.loads((run / "report.json").read_text())
    assert set(report["eval"]) == {"sft", "rl"} and set(report["eval"]["rl"]) == {"list_ops", "arithmetic"}
    for f in ("report.md", "plot.png", "config.json"):
        assert (run / f).exists(), f
    assert any((run / "tensorboard").iterdir())


def _rl_records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"kind": "rl"' in x]


def test_two_trainer_ranks_tp2_under_torchrun(tmp_path):
    """The coordinator is rank 0 of a 2-rank torchrun job (TP=2); rank 1 mirrors its trainer calls.
    Every iteration's engine-vs-trainer log-prob probe shows the engine got exactly the TP=2
    trainer's weights through the distributed checkpoint-engine update.

    Fault drill (issue 15): the first start kill -9s trainer rank 1 (not the coordinator) in the middle
    of its second checkpoint write; torchrun stops rank 0, nothing of the job outlives it, and the same
    command resumes to the uninterrupted run's final state (no iteration repeated or lost)."""
    from k2sys.coordinator import state as sm

    mark = uuid.uuid4().hex
    env = {**{k: v for k, v in os.environ.items() if k != sm.FAULT_ENV}, "OMP_NUM_THREADS": "1",
           "K2SYS_TEST_MARK": mark}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "k2sys.cli",
           "run", "tiny-k2", "--set", "name=tp2", "--set", f"output_root={tmp_path}", "--set", "trainer.tp=2",
           *[a.replace(f"rl.iterations={ITERS}", "rl.iterations=2") for a in ARGS]]
    res = subprocess.run(cmd, env={**env, sm.FAULT_ENV: "ckpt_write:2@1"}, capture_output=True, text=True, timeout=900)
    (tmp_path / "first.log").write_text(res.stdout + res.stderr)  # both ranks' whole logs, for a failure's post-mortem
    assert res.returncode != 0 and "SIGKILL at fault point 'ckpt_write'" in res.stderr, res.stderr[-3000:]
    deadline = time.time() + 30
    while _marked(mark) and time.time() < deadline:
        time.sleep(0.5)
    assert _marked(mark) == [], "processes of the killed job outlived it"
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    (tmp_path / "resume.log").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, f"{tmp_path / 'resume.log'}:\n" + res.stdout[-2000:] + res.stderr[-3000:]
    assert _marked(mark) == []
    run = tmp_path / "tp2"
    recs = _rl_records(run)
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert r["probe_mismatch/tokens"] > 0
        assert r["probe_mismatch/max_abs"] < 1e-4, r  # fp32: same weights, same logits
    report = json.loads((run / "report.json").read_text())
    assert report["rl_iterations"] == 2 and report["segments"] == 2
    pointer = json.loads((run / "rl_ckpt" / "latest.json").read_text())
    state = json.loads((run / "state.json").read_text())
    assert pointer["step"] == state["rl_iter"] == 2
    assert pointer["trainer_step"] == state["rl_trainer_step"] == [r["trainer_step"] for r in recs][-1]
    assert [r["trainer_step"] for r in recs] == [recs[0]["trainer_step"] * k for k in (1, 2)]


def _marked(mark: str) -> list[int]:
    """Live processes (not zombies) whose environment carries K2SYS_TEST_MARK=mark."""
    needle, out = f"K2SYS_TEST_MARK={mark}".encode(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            alive = (d / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
            if alive and needle in (d / "environ").read_bytes().split(b"\0"):
                out.append(int(d.name))
        except OSError:
            continue
    return out


def test_agentic_recipe_end_to_end(tmp_path):
    """tiny-k2-agent, shrunk: synthetic tool-use trajectories and reference programs in the SFT mix,
    multi-turn tool-use and coding episodes (programs run in the sandbox) next to single-turn
    tasks in every RL iteration (env turns masked out of the loss), greedy episodes of both in
    both evals, the report with their rows."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "k2sys.cli", "run", "tiny-k2-agent", "--set", "name=agent",
           "--set", f"output_root={tmp_path}", "--set", "sft.steps=6", "--set", "rl.iterations=2",
           "--set", "tasks.n_train=100", "--set", "tasks.tool_use=40", "--set", "tasks.tool_use_heldout=4",
           "--set", "tasks.code=40", "--set", "tasks.code_heldout=4",
           "--set", "eval.n_tasks=10", "--set", "rl.filter_prompts=16", "--set", "rollout.prompts_per_iter=2",
           "--set", "rl.episode_groups_per_iter=2", "--set", "rl.mismatch_probe=2"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    run = tmp_path / "agent"
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    data = [r for r in recs if r["kind"] == "data"]
    data = {k: v for r in data for k, v in r.items()}
    assert 0 < data["tool_use_rows_fit"] <= data["tool_use_rows"] == 40
    assert data["code_rows_fit"] == data["code_rows"] == 40
    rl = [r for r in recs if r["kind"] == "rl"]
    assert [r["step"] for r in rl] == [1, 2]
    for r in rl:
        assert 0.0 <= r["reward/tool_use"] <= 1.0 and 0.0 <= r["reward/code"] <= 1.0 and "reward/list_ops" in r
        assert r["response_tokens"] > 0 and r["groups_trained"] >= 1
    state = json.loads((run / "state.json").read_text())
    for tag in ("sft", "rl"):
        for kind in ("tool_use", "code"):
            ev = state["eval"][tag][kind]
            assert ev["n"] == 4 and 0.0 <= ev["accuracy"] <= 1.0 and 0.0 <= ev["pass@1"] <= 1.0
    report = json.loads((run / "report.json").read_text())
    assert "tool_use" in report["eval"]["rl"] and "code" in report["eval"]["rl"]
