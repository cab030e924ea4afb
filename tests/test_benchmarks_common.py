"""The bound helpers of benchmarks/common.py: interleaving, statistics, thread plumbing, row kinds."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch

from k2sys import ext

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402

sys.path.pop(0)


def test_interleaved_rotates_the_order_each_round_and_skips_warmup():
    ran = []
    fns = {n: (lambda n=n: ran.append(n)) for n in "abc"}
    tm = common.interleaved(fns, reps=4, warmup=1)
    assert ran[:3] == ["a", "b", "c"]  # the warm-up round, untimed
    assert [n for _, n in tm.order] == list("abc" "bca" "cab" "abc") == ran[3:]
    assert [r for r, _ in tm.order] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert tm.reps == 4 and all(len(v) == 4 and min(v) >= 0 for v in tm.times.values())


def test_interleaved_in_fixed_order_with_untimed_setup():
    ran = []
    fns = {"switch": lambda: ran.append("switch"), "bound": lambda: ran.append("bound")}
    tm = common.interleaved(fns, reps=2, warmup=0, rotate=False, before={"bound": lambda: ran.append("flush")})
    assert ran == ["switch", "flush", "bound", "switch", "flush", "bound"]
    assert [n for _, n in tm.order] == ["switch", "bound", "switch", "bound"]
    with pytest.raises(ValueError):
        common.interleaved(fns, reps=0)


def test_summarize_median_and_spread():
    s = common.summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s["median"], s["min"], s["max"], s["q1"], s["q3"], s["n"]) == (3.0, 1.0, 5.0, 2.0, 4.0, 5)
    assert common.summarize([7.0])["q1"] == common.summarize([7.0])["q3"] == 7.0


def test_paired_row_takes_the_median_of_per_round_ratios():
    system = [1.0, 2.0, 1.0, 1.0, 4.0]
    bound = [0.5, 0.5, 1.0, 0.9, 1.0]  # per-round ratios 0.5, 0.25, 1.0, 0.9, 0.25
    r = common.paired_row("x", system, bound, bound="a copy", threads=2, system_threads=2, target=0.8,
                          work=2e9, unit="GB/s", scale=1e9)
    assert r["ratio"] == 0.5 and r["reps"] == 5 and r["threads"] == 2 and r["system_threads"] == 2
    assert r["spread"] == {"min": 0.25, "q1": 0.25, "q3": 0.9, "max": 1.0}
    assert r["value"] == 2.0 and r["baseline"] == pytest.approx(2e9 / 0.9 / 1e9, rel=1e-3)  # work / median s
    assert r["kind"] == "bound" and r["bound"] == "a copy" and r["target"] == 0.8
    t = common.paired_row("y", [2.0] * 5, [1.0] * 5, bound="b", threads=1, system_threads=1, kind="peer")
    assert t["unit"] == "s" and t["value"] == 2.0 and t["ratio"] == 0.5
    with pytest.raises(ValueError):
        common.paired_row("z", [1.0], [1.0, 2.0], bound="b", threads=1, system_threads=1)
    with pytest.raises(ValueError):
        common.paired_row("z", [1.0], [1.0], bound="b", threads=1, system_threads=1, kind="diagnostic")


def test_split_stream_covers_every_byte_in_contiguous_parts():
    dsts = [torch.zeros(5, dtype=torch.uint8), torch.zeros(3, dtype=torch.int16), torch.zeros(7, dtype=torch.uint8)]
    srcs = [torch.arange(13, dtype=torch.uint8), torch.arange(100, 106, dtype=torch.uint8)]  # 19 bytes, dst 18
    parts = common.split_stream(dsts, srcs, 4)
    sizes = [sum(d.numel() for d, _ in p) for p in parts]
    assert len(parts) == 4 and sum(sizes) == 18 and max(sizes) - min(sizes) <= 1
    for p in parts:
        for d, s in p:
            d.copy_(s)
    flat = torch.cat([t.view(-1).view(torch.uint8) for t in dsts])
    assert flat.tolist() == (list(range(13)) + list(range(100, 106)))[:18]


def test_split_pieces_cover_every_byte_at_most_piece_bytes_each():
    dsts = [torch.zeros(5, dtype=torch.uint8), torch.zeros(3, dtype=torch.int16), torch.zeros(7, dtype=torch.uint8)]
    srcs = [torch.arange(13, dtype=torch.uint8), torch.arange(100, 106, dtype=torch.uint8)]
    pieces = common.split_pieces(dsts, srcs, 4)
    assert all(0 < d.numel() <= 4 and d.numel() == s.numel() for d, s in pieces)
    for d, s in reversed(pieces):  # any order: pieces never overlap
        d.copy_(s)
    flat = torch.cat([t.view(-1).view(torch.uint8) for t in dsts])
    assert flat.tolist() == (list(range(13)) + list(range(100, 106)))[:18]
    assert sum(d.numel() for d, _ in common.split_pieces(dsts, srcs, 4, nbytes=10)) == 10
    with pytest.raises(ValueError):
        common.split_pieces(dsts, srcs, 0)


def test_copy_bound_copies_every_byte_with_every_impl_and_thread_count():
    n = (1 << 20) + 12345  # not a multiple of the piece size: a short last piece
    src = torch.randint(0, 256, (n,), dtype=torch.uint8)
    dst = torch.zeros(n, dtype=torch.uint8)
    with common.CopyBound(dst, src, threads=[1, 3], piece_bytes=64 << 10) as cb:
        assert cb.threads == [1, 3] and cb.nbytes == n
        assert cb.impls == (["memcpy", "torch", "stream", "pool"] if ext.HAS_CPP else ["memcpy", "torch"])
        assert len(cb._pieces) == -(-n // (64 << 10))
        for name, fn in cb.fns().items():
            dst.zero_()
            fn()
            assert torch.equal(dst, src), name
        tm = common.interleaved(cb.fns(), reps=2, warmup=0)
        assert set(tm.times) == {f"copy:{i}:x{t}" for i in cb.impls for t in (1, 3)}
        per_round = cb.seconds(tm, 3)
        assert per_round == [min(xs) for xs in zip(*(tm[f"copy:{i}:x3"] for i in cb.impls))]
        assert "on 3 thread(s)" in cb.definition(3) and "work queue" in cb.definition(3)
    with pytest.raises(ValueError, match="unknown implementations"):
        common.CopyBound(dst, src, threads=[1], impls=["nope"])


def test_copy_bound_threads_share_the_work():
    # Each worker takes pieces until the queue is empty: with one worker stalled on its first piece,
    # the others copy everything else (a static split would leave the stalled worker's chunk).
    n_pieces, size = 12, 4096
    src = torch.arange(n_pieces * size, dtype=torch.int64).to(torch.uint8)
    dst = torch.zeros_like(src)
    with common.CopyBound(dst, src, threads=[3], impls=["torch"], piece_bytes=size) as cb:
        seen: list[int] = []
        lock = threading.Lock()
        gate = threading.Event()
        first = threading.Event()
        orig = cb._copy_one

        def slow_first(impl):
            one = orig(impl)

            def copy(d, s):
                with lock:
                    seen.append(threading.get_ident())
                    am_first = not first.is_set()
                    first.set()
                if am_first:
                    gate.wait(timeout=5)
                one(d, s)
                if len(seen) == n_pieces:
                    gate.set()
            return copy

        cb._copy_one = slow_first
        cb.copier("torch", 3)()
        assert torch.equal(dst, src)
        stalled = seen[0]
        assert seen.count(stalled) == 1 and len(seen) == n_pieces


def test_workers_are_distinct_threads_with_one_torch_thread_each():
    keep = torch.get_num_threads()
    w = common._Workers(3)
    try:
        seen = []
        lock = threading.Lock()

        def job():
            with lock:
                seen.append((threading.get_ident(), torch.get_num_threads()))

        w.run([job] * 3)
        assert len({t for t, _ in seen}) == 3 and all(n == 1 for _, n in seen)
        assert threading.get_ident() not in {t for t, _ in seen}
        assert torch.get_num_threads() == keep  # the caller's thread count is left alone

        def boom():
            raise RuntimeError("x")

        with pytest.raises(RuntimeError):
            w.run([boom])
    finally:
        w.close()


def test_copy_bound_rows_label_a_bound_with_fewer_threads_as_reference():
    src = torch.ones(1 << 16, dtype=torch.uint8)
    with common.CopyBound(torch.zeros_like(src), src, threads=[1, 2]) as cb:
        fns = {"system": lambda: None, **cb.fns()}
        tm = common.interleaved(fns, reps=5, warmup=0)
        rows = common.copy_bound_rows("onload", tm["system"], cb, tm, system_threads=2, target=0.85)
    one, two = rows
    assert one["name"] == "onload_vs_copy_x1" and one["kind"] == "reference" and one["target"] is None
    assert two["name"] == "onload_vs_copy_x2" and two["kind"] == "bound" and two["target"] == 0.85
    assert one["threads"] == 1 and two["threads"] == 2 and two["system_threads"] == 2 and two["reps"] == 5
    assert common.validate_rows(rows) == []


def test_a_diagnostic_row_has_no_target_and_no_ratio():
    d = common.diagnostic("fault_aware", 1.5, "s", "copy into fresh pages", target=0.67, ratio=2.0)
    assert d["kind"] == "diagnostic" and d["target"] is None and d["ratio"] is None and d["baseline"] is None
    p = common.projection_row("k2_h20", 9.0, "s", "priced from cited figures", target=1.0)
    assert p["kind"] == "projection" and p["target"] is None and p["ratio"] is None
    assert common.validate_rows([d, p]) == []
    with pytest.raises(ValueError):
        common.validate_rows([{**d, "target": 0.67}])
    with pytest.raises(ValueError):
        common.validate_rows([{**p, "ratio": 2.0}])


def test_validate_rows_wants_bound_threads_reps_and_warns_on_few_rounds():
    r = common.paired_row("x", [1.0] * 3, [1.0] * 3, bound="b", threads=2, system_threads=2)
    assert common.validate_rows([r]) == ["x: 3 rounds (< 5)"]
    with pytest.raises(ValueError, match="threads"):
        common.validate_rows([{**r, "threads": None}])
    with pytest.raises(ValueError, match="kind"):
        common.validate_rows([{"name": "old", "ratio": 1.0, "target": None}])
    with pytest.raises(ValueError, match="reference"):
        common.validate_rows([{**r, "kind": "reference", "target": 1.0}])


def test_switch_targets_only_the_cases_issue_16_names():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_switch
    finally:
        sys.path.pop(0)
    assert bench_switch.targeted("k2-small") and bench_switch.targeted("synthetic-1GiB")
    assert bench_switch.targeted("synthetic-4GiB") and not bench_switch.targeted("k2-tiny")
