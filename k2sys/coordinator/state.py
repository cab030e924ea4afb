"""The ownership state machine of one colocated RL iteration.

    READY --continue--> ROLLOUT --pause--> PAUSED --release_engine--> RELEASED
      ^                                                                  |
      |                                                            onload_trainer
  resume_kv                                                              v
      |                                                              TRAINING --train--> TRAINED
  WEIGHTS_SYNCED <--update_weights-- WEIGHTS_RESUMED <--resume_weights-- OFFLOADED <--offload_trainer--+

Only one side holds the device at a time: the engine in READY..PAUSED and WEIGHTS_RESUMED..READY,
the trainer in TRAINING..TRAINED, nobody in RELEASED and OFFLOADED. Any other order raises
IllegalTransition *before* the action runs. Every transition is timed, and the caller reports
bytes moved and the device memory each side holds afterwards; the records go to metrics.jsonl.

Also here: what makes a run resumable after `kill -9` at any instant.

  CommittedCheckpoints  checkpoints in <root>/step_<n>/ and ONE pointer file, <root>/latest.json, that
                        names the committed one together with its counters (RL iteration, trainer step,
                        data cursor, partial-rollout buffer file). The pointer is replaced atomically,
                        last: a checkpoint without a pointer (a kill between save and commit, or during
                        the write) is never loaded, and prune() removes it on the next start.
  fault_point           TEST HOOK for fault drills: K2SYS_FAULT=name:n SIGKILLs the process the n-th
                        time it passes the named point (tests/test_faults.py). Unset: a no-op.
"""

from __future__ import annotations

import enum
import json
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable


class Phase(str, enum.Enum):
    READY = "ready"                      # engine owns the device, weights current, KV cache allocated
    ROLLOUT = "rollout"                  # engine generating
    PAUSED = "paused"                    # generation paused; unfinished trajectories taken out
    RELEASED = "released"                # engine freed KV cache and weights; device idle
    TRAINING = "training"                # trainer state onloaded; trainer owns the device
    TRAINED = "trained"                  # optimizer step(s) done
    OFFLOADED = "offloaded"              # trainer state in host DRAM; device idle
    WEIGHTS_RESUMED = "weights_resumed"  # engine re-allocated weight storage (stale values)
    WEIGHTS_SYNCED = "weights_synced"    # checkpoint engine wrote the new weights
    # back to READY after resume_kv


class Owner(str, enum.Enum):
    ENGINE = "engine"
    TRAINER = "trainer"
    NOBODY = "nobody"


OWNER = {
    Phase.READY: Owner.ENGINE, Phase.ROLLOUT: Owner.ENGINE, Phase.PAUSED: Owner.ENGINE,
    Phase.RELEASED: Owner.NOBODY, Phase.TRAINING: Owner.TRAINER, Phase.TRAINED: Owner.TRAINER,
    Phase.OFFLOADED: Owner.NOBODY, Phase.WEIGHTS_RESUMED: Owner.ENGINE, Phase.WEIGHTS_SYNCED: Owner.ENGINE,
}

TRANSITIONS: dict[tuple[Phase, str], Phase] = {
    (Phase.READY, "continue"): Phase.ROLLOUT,
    (Phase.ROLLOUT, "pause"): Phase.PAUSED,
    (Phase.PAUSED, "release_engine"): Phase.RELEASED,
    (Phase.RELEASED, "onload_trainer"): Phase.TRAINING,
    (Phase.TRAINING, "train"): Phase.TRAINED,
    (Phase.TRAINED, "offload_trainer"): Phase.OFFLOADED,
    (Phase.OFFLOADED, "resume_weights"): Phase.WEIGHTS_RESUMED,
    (Phase.WEIGHTS_RESUMED, "update_weights"): Phase.WEIGHTS_SYNCED,
    (Phase.WEIGHTS_SYNCED, "resume_kv"): Phase.READY,
}

# The order an iteration walks, for logs and the switch-latency benchmark.
ROLLOUT_TO_TRAIN = ("pause", "release_engine", "onload_trainer")
TRAIN_TO_ROLLOUT = ("offload_trainer", "resume_weights", "update_weights", "resume_kv", "continue")


class IllegalTransition(RuntimeError):
    pass


@dataclass
class StepRecord:
    action: str
    src: str
    dst: str
    seconds: float
    bytes_moved: int = 0
    engine_device_bytes: int | None = None
    trainer_device_bytes: int | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class StepResult:
    """What an action returns to the state machine (all optional)."""
    bytes_moved: int = 0
    extra: dict = field(default_factory=dict)


class OwnershipMachine:
    """Runs actions in the only legal order and measures each one.

    `memory_probe()` returns (engine_device_bytes, trainer_device_bytes) after each action:
    torch.cuda memory stats on GPU, tracked tensor bytes on CPU.
    """

    def __init__(self, start: Phase = Phase.READY,
                 memory_probe: Callable[[], tuple[int | None, int | None]] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.phase = start
        self.records: list[StepRecord] = []
        self._probe = memory_probe
        self._clock = clock

    @property
    def owner(self) -> Owner:
        return OWNER[self.phase]

    def allowed(self) -> list[str]:
        return [a for (p, a) in TRANSITIONS if p == self.phase]

    def do(self, action: str, fn: Callable[[], StepResult | None] | None = None) -> StepRecord:
        key = (self.phase, action)
        if key not in TRANSITIONS:
            raise IllegalTransition(
                f"cannot {action!r} in phase {self.phase.value!r} (owner {self.owner.value}); "
                f"allowed now: {self.allowed()}")
        dst = TRANSITIONS[key]
        t0 = self._clock()
        res = fn() if fn is not None else None
        dt = self._clock() - t0
        res = res if isinstance(res, StepResult) else StepResult()
        eng, tr = self._probe() if self._probe else (None, None)
        rec = StepRecord(action=action, src=self.phase.value, dst=dst.value, seconds=dt, bytes_moved=res.bytes_moved,
                         engine_device_bytes=eng, trainer_device_bytes=tr, extra=res.extra)
        self.phase = dst
        self.records.append(rec)
        return rec

    def reset(self, phase: Phase) -> None:
        """Force a phase after recovery (e.g. a restarted engine that already holds fresh weights)."""
        self.phase = phase

    def drain_records(self) -> list[dict]:
        out = [asdict(r) for r in self.records]
        self.records.clear()
        return out


def summarize(records: list[dict]) -> dict:
    """Per-direction switch latency from one iteration's records."""
    secs = {r["action"]: r["seconds"] for r in records}
    return {
        "rollout_to_train_s": sum(secs.get(a, 0.0) for a in ROLLOUT_TO_TRAIN if a != "pause"),
        "train_to_rollout_s": sum(secs.get(a, 0.0) for a in TRAIN_TO_ROLLOUT if a != "continue"),
        "bytes_moved": sum(r["bytes_moved"] for r in records),
        **{f"{a}_s": s for a, s in secs.items()},
    }


# ---- resume points -------------------------------------------------------------------------------
POINTER = "latest.json"
POINTER_FORMAT = "k2sys-commit-v1"
_STEP_DIR = re.compile(r"^\.?step_(\d+)(\..*)?$")  # step_N, and .step_N.tmp / .step_N.old of a cut save


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_durable(path: Path, obj: Any) -> None:
    """Write obj to path through a temp file, fsync, rename and fsync the directory: after a crash the
    file is either the old one or the new one, and the rename itself is on disk."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk or a kill: the old file stays, no temp file is left beside it
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class CommittedCheckpoints:
    """Checkpoints of one training stage, committed as one unit with their counters.

        store.dir_for(n)            where the checkpoint of step n is written (trainer.save(dir), extras beside)
        store.commit(n, **fields)   atomically point latest.json at step_n (+ fields), then drop older dirs
        store.read()                the committed pointer ({"step", "checkpoint", **fields}) or None
        store.path()                the committed checkpoint directory or None
        store.prune()               remove every step dir / temp dir the pointer does not name

    Resume reads only the pointer: the checkpoint and the counters it records always agree.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.pointer = self.root / POINTER

    def dir_for(self, step: int) -> Path:
        return self.root / f"step_{int(step):06d}"

    def read(self) -> dict | None:
        try:
            rec = json.loads(self.pointer.read_text())
        except FileNotFoundError:
            return None
        if rec.get("format") != POINTER_FORMAT:
            raise ValueError(f"{self.pointer}: not a k2sys commit pointer (format {rec.get('format')!r})")
        if not (self.root / rec["checkpoint"]).is_dir():
            raise FileNotFoundError(f"{self.pointer} names {rec['checkpoint']}, which is missing: the run directory "
                                    "was changed by hand; delete the run or restore the checkpoint")
        return rec

    def path(self) -> Path | None:
        rec = self.read()
        return None if rec is None else self.root / rec["checkpoint"]

    def commit(self, step: int, **fields: Any) -> dict:
        ckpt = self.dir_for(step)
        if not ckpt.is_dir():
            raise FileNotFoundError(f"commit step {step}: {ckpt} was not written")
        _fsync_dir(self.root)  # the checkpoint's own rename is durable before the pointer names it
        rec = {"format": POINTER_FORMAT, "step": int(step), "checkpoint": ckpt.name, "time": time.time(), **fields}
        write_json_durable(self.pointer, rec)
        self.prune()
        return rec

    def prune(self) -> list[str]:
        """Delete what no pointer names: older committed steps, and newer ones that were written but never
        committed (a kill between save and commit) or cut mid-write. Returns the names removed."""
        if not self.root.is_dir():
            return []
        rec = self.read()
        keep = rec["checkpoint"] if rec else None
        removed = []
        for p in sorted(self.root.iterdir()):
            if p.name == keep or not (_STEP_DIR.match(p.name) or p.name.startswith(f".{POINTER}.")):
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p.name)
        return removed


# ---- fault injection (TEST HOOK) ----------------------------------------------------------------
FAULT_ENV = "K2SYS_FAULT"
_fault_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """TEST HOOK, for fault drills only: with K2SYS_FAULT="name:n[,other:m]" in the environment the
    process SIGKILLs itself (exactly like `kill -9`) the n-th time it reaches the point `name`;
    "name:n@r" only in the torchrun rank r (env RANK), e.g. a trainer rank that is not the coordinator.
    Without the variable this does nothing. Points: sft_step, eval, rollout, rl_saved, weight_update,
    rl_commit, ckpt_write."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        item, _, rank = item.strip().partition("@")
        point, _, count = item.partition(":")
        if point != name or (rank and rank != os.environ.get("RANK", "0")):
            continue
        _fault_hits[name] = _fault_hits.get(name, 0) + 1
        if _fault_hits[name] == int(count or 1):
            sys.stderr.write(f"{FAULT_ENV} test hook: SIGKILL at fault point {name!r} (hit {_fault_hits[name]})\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
