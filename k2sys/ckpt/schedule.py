"""Bucket schedules of the distributed update: serial, and a ring of buffers that overlaps the stages.

    serial (1 buffer)   for each bucket i: stage(i) -> issue(i) -> land(i) -> apply(i)
    ring (D buffers)    bucket i uses buffer i % D, free again once apply(i - D) has finished
      stager thread     stage(i) for each bucket this rank owns, in order, as soon as its buffer is
                        free: it runs ahead of the broadcasts by up to D buckets
      calling thread    issue(i) (an async broadcast) in bucket order, once the owner has staged it
                        or, on a receiver, once its buffer is free; at most `inflight` broadcasts are
                        in flight (consecutive buckets have different owners, so on 2 ranks both
                        directions of the link carry data at once); land(i) waits for them in order
      applier thread    apply(i) in bucket order as each lands (checksum, copy into the sink)
    coop (D slots/rank) the shared-memory transport (k2sys.ckpt.shm_ring): one thread per rank, no
                        hand-off between threads. Before applying bucket i, stage and publish each
                        bucket j <= i + lookahead of this rank whose slot is free everywhere; then
                        apply bucket i once its owner has published it. The ranks' processes overlap
                        with each other: while one stages, the others apply. Helper threads would
                        only time-slice the same cores (ranks x threads > cores) and evict each
                        other's cache lines mid-copy: on 2 ranks x 2 cores that cost ~1.4x per byte.

Only the calling thread issues collectives, in bucket order on every rank (torch.distributed
needs the same order everywhere). stage/apply record their own failures and return (the update
then fails everywhere at the final vote); an exception from issue/land (a dead peer) stops the
helper threads and propagates.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Optional


def run_serial(n: int, stage: Callable[[int], None], issue: Callable[[int], Any],
               land: Callable[[int, Any], None], apply: Callable[[int], None]) -> None:
    """One bucket at a time: nothing overlaps (the update with pipelining off)."""
    for i in range(n):
        stage(i)
        land(i, issue(i))
        apply(i)


class _Abort(Exception):
    """The calling thread failed: helper threads stop waiting."""


def run_ring(n: int, depth: int, owned: Callable[[int], bool], stage: Callable[[int], None],
             issue: Callable[[int], Any], land: Callable[[int, Any], None], apply: Callable[[int], None],
             inflight: int = 2) -> None:
    """The ring schedule of the module doc over `depth` >= 2 buffers."""
    if depth < 2:
        raise ValueError(f"run_ring: depth must be >= 2 (1 buffer runs serially), got {depth}")
    inflight = max(1, min(inflight, depth - 2))  # buffers: in flight + one staging + one applying
    lock = threading.Lock()
    # one condition per waiter, so an event wakes only the thread it concerns (a spurious wake-up
    # costs a time slice on a busy machine)
    to_main, to_stager, to_applier = (threading.Condition(lock) for _ in range(3))
    staged = [False] * n
    state = {"landed": 0, "applied": 0, "abort": False}
    errors: list[BaseException] = []

    def wait(cv: threading.Condition, pred: Callable[[], bool]) -> None:
        with cv:
            while not pred():
                if state["abort"]:
                    raise _Abort()
                cv.wait()

    def free(i: int) -> bool:  # buffer i % depth no longer holds bucket i - depth
        return state["applied"] >= i - depth + 1

    def stop_all() -> None:
        with lock:
            state["abort"] = True
            for cv in (to_main, to_stager, to_applier):
                cv.notify_all()

    def guarded(body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except _Abort:
                pass
            except BaseException as e:  # a bug, not a bucket failure: stop everyone, re-raise below
                errors.append(e)
                stop_all()
        return run

    def stager() -> None:
        for i in range(n):
            if owned(i):
                wait(to_stager, lambda: free(i))
                stage(i)
                with lock:
                    staged[i] = True
                    to_main.notify()

    def applier() -> None:
        for i in range(n):
            wait(to_applier, lambda: state["landed"] > i)
            apply(i)
            with lock:
                state["applied"] = i + 1
                to_main.notify()
                to_stager.notify()

    threads = [threading.Thread(target=guarded(f), name=f"k2-ckpt-{f.__name__}", daemon=True)
               for f in (stager, applier)]
    for t in threads:
        t.start()
    pending: deque = deque()

    def land_oldest() -> None:
        j, work = pending.popleft()
        land(j, work)
        with lock:
            state["landed"] = j + 1
            to_applier.notify()

    try:
        for i in range(n):
            while len(pending) >= inflight:
                land_oldest()
            wait(to_main, lambda: staged[i] if owned(i) else free(i))
            pending.append((i, issue(i)))
        while pending:
            land_oldest()
        wait(to_main, lambda: state["applied"] == n)
    except _Abort:
        pass  # a helper thread failed; its error is raised below
    except BaseException:
        stop_all()
        for t in threads:
            t.join()
        raise
    for t in threads:
        t.join()
    if errors:
        raise errors[0]



def run_coop(n: int, owned: Callable[[int], bool], can_stage: Callable[[int], bool],
             stage_publish: Callable[[int], None], ready: Callable[[int], bool], apply: Callable[[int], None],
             wait: Callable[[Callable[[], bool], int], None], before: Optional[Callable[[int], None]] = None,
             lookahead: int = 2) -> None:
    """The coop schedule of the module doc: one thread interleaves this rank's stages with its applies.

    Before applying bucket i it stages (and publishes) each bucket j of its own with j <= i +
    `lookahead` whose slot is free (`can_stage`), so a peer that reaches j finds it published; then
    it applies bucket i once `ready(i)` (its owner published it; this rank's own: staged above, as
    j = i is always within reach). The lookahead keeps few buckets between a pack and its readers:
    a bucket read soon after it was written is still in the shared last-level cache (a ~16 MB bucket
    against 32 MB on the dev VM), one read a ring later comes from memory. `wait(pred, i)` blocks
    until pred() holds (polling, with the transport's dead-peer and timeout checks); `before(i)`
    runs once as bucket i becomes the next to apply."""
    if lookahead < 0:
        raise ValueError(f"run_coop: lookahead must be >= 0, got {lookahead}")
    mine = [i for i in range(n) if owned(i)]
    k = 0  # the next of this rank's buckets to stage
    for i in range(n):
        if before is not None:
            before(i)
        while True:
            while k < len(mine) and mine[k] <= i + lookahead and can_stage(mine[k]):
                stage_publish(mine[k])
                k += 1
            if k < len(mine) and mine[k] <= i:  # bucket i is this rank's and its slot is still busy
                nxt = mine[k]
                wait(lambda: can_stage(nxt), i)
                continue
            if ready(i):
                break
            nxt = mine[k] if k < len(mine) and mine[k] <= i + lookahead else None
            wait(lambda: ready(i) or (nxt is not None and can_stage(nxt)), i)
        apply(i)
