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
"""

from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass, field
from typing import Callable


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
