"""Recipe faults (issue 15): kill -9 of the coordinator at chosen points of the tiny recipe, then the
same command again, until it completes.

The kill points are made deterministic by the K2SYS_FAULT test hook (k2sys.coordinator.state.fault_point):
K2SYS_FAULT=point:n makes the coordinator SIGKILL itself the n-th time it passes `point`.

Checked after the drill: the final trainer step equals an uninterrupted run's (iterations x inner steps;
SFT steps), metrics.jsonl and the commit pointer show every iteration exactly once, no process of a
killed coordinator outlives it, report.json's total time covers every segment of the run. Fast unit
tests below cover the pieces: the commit pointer, the metrics rewrite, the reaper, megatron's writer
without helper processes, and one error (not one traceback per request) when the engine dies.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from k2sys.coordinator import state as sm

ROOT = Path(__file__).resolve().parents[1]
SFT_STEPS, ITERS, INNER = 3, 3, 1
ARGS = ["--set", f"sft.steps={SFT_STEPS}", "--set", "sft.checkpoint_every=1", "--set", "sft.rows_per_batch=2",
        "--set", f"rl.iterations={ITERS}", "--set", f"rl.inner_steps={INNER}", "--set", "rl.ptx_rows=2",
        "--set", "rl.filter_prompts=0", "--set", "rl.mismatch_probe=0", "--set", "tasks.n_train=20",
        "--set", "tasks.n_heldout=4", "--set", "eval.n_tasks=2", "--set", "rollout.prompts_per_iter=1",
        "--set", "rollout.samples_per_prompt=2"]


# ---- helpers --------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _marked(mark: str) -> list[tuple[int, str]]:
    """Live processes whose environment carries K2SYS_TEST_MARK=mark: the coordinator this test started
    and everything below it (exec'd children inherit the variable, forked ones share the memory)."""
    needle = f"K2SYS_TEST_MARK={mark}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0") and _alive(int(d.name)):
                out.append((int(d.name), (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]))
        except OSError:
            continue
    return out


def _wait_gone(mark: str, timeout: float) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    while (left := _marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.25)
    return left


def _records(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def _steps(run: Path, kind: str, key: str | None = None) -> list[int]:
    return [r["step"] for r in _records(run) if r["kind"] == kind and (key is None or key in r)]


# ---- the drill ------------------------------------------------------------------------------------
# (K2SYS_FAULT, what the kill interrupts) in order; each start resumes the previous one's run directory.
DRILL = [
    ("sft_step:2", "SFT: step 2 trained, its checkpoint not written"),
    ("eval:1", "held-out eval after SFT: results and metrics written, the eval not committed"),
    ("rl_commit:1", "RL iteration 1: checkpoint saved, weights pushed, metrics logged, pointer not committed"),
    ("weight_update:2", "RL iteration 2: engine weights released and resumed, the new ones not pushed"),
    ("ckpt_write:1", "RL iteration 2 again: checkpoint shards written, meta and rename not done"),
    ("rollout:2", "RL iteration 3: rollout with requests in flight"),
]


@pytest.mark.slow
def test_kill9_at_each_recipe_point_then_resume(tmp_path):
    run, name, mark = tmp_path / "drill", "drill", uuid.uuid4().hex
    walls, leftovers = [], {}
    base_env = {k: v for k, v in os.environ.items() if k != sm.FAULT_ENV}
    base_env.update(OMP_NUM_THREADS="1", K2SYS_TEST_MARK=mark)
    cmd = [sys.executable, "-m", "k2sys.cli", "run", "tiny-k2", "--set", f"name={name}",
           "--set", f"output_root={tmp_path}", *ARGS]
    log = tmp_path / "drill.log"
    for i, (fault, what) in enumerate([*DRILL, (None, "the rest of the run")]):
        env = dict(base_env, **({sm.FAULT_ENV: fault} if fault else {}))
        with open(log, "ab") as f:
            f.write(f"\n===== start {i + 1}: K2SYS_FAULT={fault} ({what})\n".encode())
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = p.wait(timeout=600)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        walls.append(time.monotonic() - t0)
        tail = log.read_text()[-4000:]
        if fault is None:
            assert rc == 0, tail
        else:
            point = fault.split(":")[0]
            assert rc == -signal.SIGKILL, f"start {i + 1} ({fault}) ended with {rc}, not by its fault\n{tail}"
            assert f"SIGKILL at fault point '{point}'" in tail, tail
        # nothing the coordinator started outlives it (the engine gets SIGTERM and needs a moment)
        left = _wait_gone(mark, timeout=20.0)
        leftovers[fault] = left
        for pid, _ in left:  # do not let one failure poison the next starts
            os.kill(pid, signal.SIGKILL)
        if fault == "rl_commit:1":  # the state the bug needed: a newer checkpoint without its commit
            assert (run / "rl_ckpt" / "step_000001").is_dir() and not (run / "rl_ckpt" / "latest.json").exists()
            assert 1 in _steps(run, "rl")  # ... and a metrics record of the uncommitted iteration
        if fault == "ckpt_write:1":  # a checkpoint cut mid-write, beside the committed iteration 1
            assert (run / "rl_ckpt" / ".step_000002.tmp").is_dir()
            assert json.loads((run / "rl_ckpt" / "latest.json").read_text())["step"] == 1
    assert leftovers == {f: [] for f, _ in DRILL} | {None: []}, leftovers

    state = json.loads((run / "state.json").read_text())
    pointer = json.loads((run / "rl_ckpt" / "latest.json").read_text())
    meta = json.loads((run / "rl_ckpt" / pointer["checkpoint"] / "k2sys_megatron.json").read_text())
    # the final trainer step is the uninterrupted run's: one optimizer step per inner step per iteration
    assert pointer["step"] == state["rl_iter"] == ITERS
    assert pointer["trainer_step"] == meta["step"] == state["rl_trainer_step"] == ITERS * INNER
    buffer = json.loads((run / "rl_ckpt" / pointer["checkpoint"] / pointer["buffer"]).read_text())
    assert buffer["iteration"] == ITERS and len(buffer["trajectories"]) == pointer["buffered"]  # committed with it
    assert state["sft_trainer_step"] == SFT_STEPS
    # no iteration repeated or lost, in the metrics either
    assert _steps(run, "rl") == list(range(1, ITERS + 1))
    assert [r["trainer_step"] for r in _records(run) if r["kind"] == "rl"] == [INNER * k for k in range(1, ITERS + 1)]
    assert _steps(run, "sft", "loss") == list(range(1, SFT_STEPS + 1))
    for tag in ("sft", "rl"):  # each eval logged once, the one cut by the kill dropped on resume
        assert sum(1 for r in _records(run) if r["kind"] == "eval" and f"{tag}/arithmetic/accuracy" in r) == 1
    assert set(state["eval"]) == {"sft", "rl"}
    assert len(_steps(run, "sft", "eval_loss")) == 1
    assert sorted(p.name for p in (run / "rl_ckpt").iterdir()) == sorted([pointer["checkpoint"], "latest.json"])
    resumes = [r for r in _records(run) if r["kind"] == "resume"]
    assert len(resumes) == len(DRILL) and sum(r["pruned_checkpoints"] for r in resumes) >= 2
    # time over every segment, not the last one only
    report = json.loads((run / "report.json").read_text())
    assert report["segments"] == len(DRILL) + 1 and report["interrupted"] == len(DRILL)
    assert report["segment_outcomes"] == ["killed"] * len(DRILL) + ["completed"]
    assert report["total_s"] == pytest.approx(sum(report["segment_s"]), abs=0.01)
    assert report["total_s"] <= sum(walls) + 1.0
    assert report["total_s"] >= 0.7 * sum(walls), (report["segment_s"], walls)
    assert report["total_s"] > 2 * report["segment_s"][-1]
    print(f"\nfault drill: {len(DRILL)} kills, walls {[round(w, 1) for w in walls]} s, report total_s "
          f"{report['total_s']:.1f} s, segments {report['segment_s']}")


# ---- commit pointer -------------------------------------------------------------------------------
def _fake_ckpt(store: sm.CommittedCheckpoints, step: int) -> None:
    d = store.dir_for(step)
    d.mkdir(parents=True)
    (d / "weights").write_text(str(step))


def test_commit_pointer_names_the_only_resume_point(tmp_path):
    store = sm.CommittedCheckpoints(tmp_path / "rl_ckpt")
    assert store.read() is None and store.prune() == []
    _fake_ckpt(store, 1)
    assert store.read() is None  # written, not committed: not a resume point
    store.commit(1, trainer_step=2, buffer="rollout_buffer.json")
    assert store.read()["step"] == 1 and store.read()["trainer_step"] == 2 and store.path() == store.dir_for(1)
    _fake_ckpt(store, 2)  # kill -9 between save and commit ...
    (store.root / ".step_000003.tmp").mkdir()  # ... and one cut mid-write
    assert store.read()["step"] == 1
    assert sorted(store.prune()) == [".step_000003.tmp", "step_000002"]
    assert sorted(p.name for p in store.root.iterdir()) == ["latest.json", "step_000001"]
    _fake_ckpt(store, 2)
    store.commit(2, trainer_step=4)
    assert store.read()["step"] == 2 and not store.dir_for(1).exists()  # the older commit goes
    with pytest.raises(FileNotFoundError):
        store.commit(3)  # nothing written for it


def test_fault_point_kills_at_the_nth_pass(tmp_path):
    code = ("from k2sys.coordinator.state import fault_point\n"
            "for i in range(5):\n    print(i, flush=True)\n    fault_point('here')\n    fault_point('other')\n")
    env = {**os.environ, sm.FAULT_ENV: "here:3"}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGKILL and p.stdout.split() == ["0", "1", "2"]
    assert "SIGKILL at fault point 'here' (hit 3)" in p.stderr
    env.pop(sm.FAULT_ENV)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.split() == ["0", "1", "2", "3", "4"]


# ---- metrics --------------------------------------------------------------------------------------
def test_metrics_keep_only_drops_uncommitted_and_cut_lines(tmp_path):
    from k2sys.coordinator.metrics import MetricsLog, read_metrics

    m = MetricsLog(tmp_path)
    for k in (1, 2, 3):
        m.log("rl", k, loss=float(k))
    m.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "rl", "step": 4, "lo')  # kill -9 mid-write
    m = MetricsLog(tmp_path)
    m.log("fault", 2, engine_restarted=1)  # appended after a cut line: must not be glued onto it
    m.close()
    assert [r["kind"] for r in read_metrics(tmp_path)] == ["rl", "rl", "rl", "fault"]
    m = MetricsLog(tmp_path)
    assert m.keep_only(lambda r: r["kind"] != "rl" or r["step"] <= 2) == 2  # step 3 and the cut line
    m.log("rl", 3, loss=3.5)
    m.close()
    recs = read_metrics(tmp_path)
    assert [(r["kind"], r["step"]) for r in recs] == [("rl", 1), ("rl", 2), ("fault", 2), ("rl", 3)]
    assert recs[-1]["loss"] == 3.5


def test_report_totals_accumulate_over_segments():
    from k2sys.coordinator.report import run_time

    segs = [{"start": 100.0, "end": 400.0, "outcome": "killed"}, {"start": 500.0, "end": 560.0, "outcome": "killed"},
            {"start": 600.0, "end": 618.0, "outcome": "completed"}]
    t = run_time({"segments": segs})
    assert t["total_s"] == pytest.approx(378.0) and t["wall_s"] == pytest.approx(518.0)
    assert t["segments"] == 3 and t["interrupted"] == 2 and t["segment_s"] == [300.0, 60.0, 18.0]


# ---- processes ------------------------------------------------------------------------------------
def test_reaper_kills_what_a_dead_coordinator_left_and_nothing_else(tmp_path):
    from k2sys.coordinator import engine_handle as eh

    dead = subprocess.Popen(["sleep", "0"])
    dead.wait()  # a pid that is gone
    tag = f"{tmp_path.resolve()}|"
    mine = f"{tag}{os.getpid()}|{eh.start_ticks(os.getpid())}"
    env = {k: v for k, v in os.environ.items() if k != eh.OWNER_ENV}
    orphan = subprocess.Popen(["sleep", "60"], env={**env, eh.OWNER_ENV: f"{tag}{dead.pid}|1"})
    owned = subprocess.Popen(["sleep", "60"], env={**env, eh.OWNER_ENV: mine})  # its owner lives
    other = subprocess.Popen(["sleep", "60"], env={**env, eh.OWNER_ENV: f"/elsewhere|{dead.pid}|1"})
    try:
        time.sleep(0.2)  # let exec finish: /proc/<pid>/environ is the new program's
        killed = eh.reap_leftovers(tmp_path)
        assert [k["pid"] for k in killed] == [orphan.pid]
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert owned.poll() is None and other.poll() is None
    finally:
        for p in (orphan, owned, other):
            p.kill()
            p.wait()


def test_one_coordinator_per_run_dir(tmp_path):
    from k2sys.coordinator import engine_handle as eh

    saved = os.environ.get(eh.OWNER_ENV)
    try:
        claim = eh.claim_run(tmp_path)
        assert json.loads((tmp_path / eh.PIDS_FILE).read_text())["coordinator"]["pid"] == os.getpid()
        assert os.environ[eh.OWNER_ENV].startswith(f"{tmp_path.resolve()}|{os.getpid()}|")
        with pytest.raises(RuntimeError, match=f"another coordinator \\(pid {os.getpid()}\\)"):
            eh.claim_run(tmp_path)  # a second open file description: flock refuses it as it would another process
        claim.release()
        eh.claim_run(tmp_path).release()
    finally:
        if saved is None:
            os.environ.pop(eh.OWNER_ENV, None)
        else:
            os.environ[eh.OWNER_ENV] = saved


_SAVE_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import psutil
    from k2sys.models import build_model, k2_tiny
    from k2sys.trainer import backend as B

    b = B.MegatronBackend.from_model(build_model(k2_tiny(256), seed=0))
    for i in range(2):
        b.save(sys.argv[1] + f"/ckpt{i}")
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    kids = [c for c in psutil.Process().children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE]
    print("QUEUE", type(filesystem_async._results_queue).__module__, flush=True)
    print("CHILDREN", len(kids), [" ".join(c.cmdline())[:80] for c in kids], flush=True)
    with B._writer_processes_die_with_us():  # a writer forked like megatron's, then kill -9 of us
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
    print("FORKED", pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.slow
def test_checkpoint_save_leaves_no_helper_processes(tmp_path):
    """megatron's writer would start a spawn Manager (~280 MB) and a resource_tracker that survive a
    kill -9 of the trainer; the save path uses neither, and its forked writers die with their parent."""
    log = tmp_path / "save.log"  # a file, not a pipe: helpers that inherit a pipe would hold it open
    with open(log, "wb") as f:
        rc = subprocess.run([sys.executable, "-c", _SAVE_SCRIPT, str(tmp_path)], stdout=f, stderr=subprocess.STDOUT,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    text = log.read_text()
    out = dict(line.split(" ", 1) for line in text.splitlines() if line.split(" ", 1)[0] in
               ("QUEUE", "CHILDREN", "FORKED"))
    assert rc == -signal.SIGKILL, text[-3000:]
    assert out["QUEUE"] == "queue"  # not a multiprocessing.managers proxy
    assert out["CHILDREN"].startswith("0 "), out["CHILDREN"]
    child = int(out["FORKED"])
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)
    assert (tmp_path / "ckpt1" / "k2sys_megatron.json").exists()


# ---- an engine that dies mid-rollout: one error, not one traceback per request --------------------
class _DeadEngine:
    def __init__(self):
        self.calls = 0

    async def async_generate(self, reqs):
        self.calls += 1
        await asyncio.sleep(0.01 * (self.calls % 7))
        from k2sys.engine.api.client import EngineHTTPError

        raise EngineHTTPError("/generate", None, "ConnectError: [Errno 111] Connection refused")

    def abort(self, rid=None):
        pass


def test_engine_death_mid_rollout_is_one_error(caplog):
    from k2sys.coordinator.rollout import _run_with_budget
    from k2sys.engine.api.client import EngineHTTPError

    eng = _DeadEngine()
    jobs = [lambda stopping, i=i: eng.async_generate([i]) for i in range(257)]
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        with pytest.raises(EngineHTTPError) as ei:
            asyncio.run(_run_with_budget(eng, jobs, 0.95, 60.0, lambda: None))
        gc.collect()
    assert "Connection refused" in str(ei.value)
    assert any("requests failed, the rest were cancelled" in n for n in ei.value.__notes__)
    never = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert never == [], f"{len(never)} unretrieved task exceptions logged"
