"""Bucket schedules of the distributed update (k2sys.ckpt.schedule) with recording fakes in place of
the stage/broadcast/apply steps: order, buffer reuse, broadcasts in flight, failures that stop it."""

from __future__ import annotations

import random
import threading
import time

import pytest

from k2sys.ckpt.schedule import run_ring, run_serial


class Recorder:
    """Fake steps that log (event, bucket) in the order they happen, with small random delays."""

    def __init__(self, seed: int = 0, fail_land: int | None = None):
        self.log: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.rng = random.Random(seed)
        self.fail_land = fail_land
        self.in_flight = 0
        self.max_in_flight = 0

    def _note(self, what: str, i: int) -> None:
        with self.lock:
            self.log.append((what, i))
            delay = self.rng.random() * 2e-3
        time.sleep(delay)

    def stage(self, i):
        self._note("stage", i)

    def issue(self, i):
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._note("issue", i)
        return i

    def land(self, i, work):
        assert work == i
        if i == self.fail_land:
            raise RuntimeError("fake: peer died")
        self._note("land", i)
        with self.lock:
            self.in_flight -= 1

    def apply(self, i):
        self._note("apply", i)

    def at(self, what: str, i: int) -> int:
        return self.log.index((what, i))


def owned_by(rank: int, world: int = 2):
    return lambda i: i % world == rank


@pytest.mark.parametrize("depth", [2, 3, 4, 6])
@pytest.mark.parametrize("rank", [0, 1])
def test_ring_keeps_order_and_never_reuses_a_busy_buffer(depth, rank):
    n = 23
    for seed in range(3):
        r = Recorder(seed)
        own = owned_by(rank)
        run_ring(n, depth, own, r.stage, r.issue, r.land, r.apply)
        assert [i for w, i in r.log if w == "issue"] == list(range(n))  # collectives in bucket order
        assert [i for w, i in r.log if w == "apply"] == list(range(n))
        assert [i for w, i in r.log if w == "stage"] == [i for i in range(n) if own(i)]
        for i in range(n):
            assert r.at("issue", i) < r.at("land", i) < r.at("apply", i)
            if own(i):
                assert r.at("stage", i) < r.at("issue", i)
            if i >= depth:  # bucket i's buffer held bucket i - depth: written only after that was applied
                first_write = r.at("stage", i) if own(i) else r.at("issue", i)
                assert r.at("apply", i - depth) < first_write
        assert r.max_in_flight <= max(1, min(2, depth - 2))
        if depth >= 4:
            assert r.max_in_flight == 2  # the pipeline does keep two broadcasts going


def test_ring_overlaps_where_serial_does_not():
    r = Recorder(1)
    run_serial(9, r.stage, r.issue, r.land, r.apply)
    assert r.log == [(w, i) for i in range(9) for w in ("stage", "issue", "land", "apply")]
    r = Recorder(1)
    run_ring(9, 4, owned_by(0, 1), r.stage, r.issue, r.land, r.apply)
    assert r.log != [(w, i) for i in range(9) for w in ("stage", "issue", "land", "apply")]
    assert r.at("stage", 1) < r.at("apply", 0)  # the next bucket is staged before this one is applied


def test_ring_stops_its_threads_when_a_broadcast_fails():
    r = Recorder(2, fail_land=5)
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="peer died"):
        run_ring(20, 4, owned_by(0), r.stage, r.issue, r.land, r.apply)
    assert threading.active_count() == before  # stager and applier joined
    assert max(i for w, i in r.log if w == "apply") < 5


def test_ring_reraises_a_helper_bug():
    def bad_apply(i):
        if i == 3:
            raise KeyError("bug in apply")

    r = Recorder(3)
    with pytest.raises(KeyError, match="bug in apply"):
        run_ring(12, 4, owned_by(0), r.stage, r.issue, r.land, bad_apply)
    with pytest.raises(ValueError, match="depth"):
        run_ring(3, 1, owned_by(0), r.stage, r.issue, r.land, r.apply)
