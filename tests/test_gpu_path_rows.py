"""benchmarks/gpu_path.py row building, without a GPU: paired synthetic timings -> rows.

Each builder must give rows that pass benchmarks/common.validate_rows (bound, threads, reps,
no target on diagnostics), with the ratio oriented higher-is-better (a faster system or a slower
bound raises it) and the values computed from the formulas, checked here independently.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

BENCH = str(Path(__file__).resolve().parents[1] / "benchmarks")


@pytest.fixture(scope="module")
def mods():
    sys.path.insert(0, BENCH)
    try:
        import common
        import gpu_path

        yield gpu_path, common
    finally:
        sys.path.remove(BENCH)
        sys.modules.pop("gpu_path", None)


SYS = [0.10, 0.12, 0.11, 0.13, 0.10]
BOUND = [0.09, 0.10, 0.10, 0.12, 0.08]


def _check_ratio_row(common, row, reps=5):
    assert common.validate_rows([row]) == []  # 5 rounds: no rule warning
    assert row["kind"] == "bound" and row["reps"] == reps and row["threads"] == 1 and row["system_threads"] == 1
    assert row["bound"] and set(row["stream"]) == {"system", "bound"}
    assert set(row["spread"]) == {"min", "q1", "q3", "max"}
    assert row["spread"]["min"] <= row["ratio"] <= row["spread"]["max"]


def test_onload_row_is_a_paired_bound_with_the_target(mods):
    gp, common = mods
    n = 4 << 30
    row = gp.onload_row("onload/x", SYS, BOUND, n, bound="one cudaMemcpyAsync", streams={"system": "a", "bound": "b"})
    _check_ratio_row(common, row)
    assert row["target"] == gp.ONLOAD_TARGET == 0.9 and row["unit"] == "GB/s" and row["bytes"] == n
    # ratio: median over rounds of bound / system seconds; value / baseline: GB/s of the medians
    assert row["ratio"] == pytest.approx(statistics.median(b / s for s, b in zip(SYS, BOUND)), abs=1e-4)
    assert row["value"] == pytest.approx(n / statistics.median(SYS) / 1e9, abs=1e-3)
    assert row["baseline"] == pytest.approx(n / statistics.median(BOUND) / 1e9, abs=1e-3)
    assert row["ratio"] < 1  # the system was slower than its bound in every round
    faster = gp.onload_row("onload/x", [s / 2 for s in SYS], BOUND, n, bound="b", streams={"system": "a", "bound": "b"})
    assert faster["ratio"] == pytest.approx(2 * row["ratio"], rel=1e-3)  # higher is better
    assert faster["value"] > row["value"]


def test_decode_row_prices_the_step_at_the_copy_rate(mods):
    gp, common = mods
    W, tokens, copies = 121_000_000, 128, 9
    per_token = [1e-3, 1.1e-3, 0.9e-3, 1e-3, 1.2e-3]
    short = [0.5, 0.6, 0.55, 0.5, 0.52]
    long = [s + t * tokens for s, t in zip(short, per_token)]
    one_copy = [60e-6, 62e-6, 58e-6, 61e-6, 60e-6]  # seconds of one W-byte device-to-device copy
    copy = [c * copies for c in one_copy]
    row = gp.decode_row("k2-small", short, long, copy, tokens=tokens, bytes_per_token=W, copies=copies)
    _check_ratio_row(common, row)
    assert row["target"] is None and row["unit"] == "GB/s" and row["bytes_per_token"] == W
    # roofline: the step reads W bytes at the copy's read + write rate (2 W / one copy's seconds)
    rate = [2 * W / c for c in one_copy]
    want = statistics.median((W / r) / t for r, t in zip(rate, per_token))
    assert row["ratio"] == pytest.approx(want, abs=1e-4)
    assert row["value"] == pytest.approx(W / statistics.median(per_token) / 1e9, rel=1e-3)
    assert row["baseline"] == pytest.approx(statistics.median(rate) / 1e9, rel=1e-3)
    assert row["tokens_per_s"] == pytest.approx(1 / statistics.median(per_token), rel=1e-3)
    slower = gp.decode_row("k2-small", short, [s + 2 * (lo - s) for s, lo in zip(short, long)], copy, tokens=tokens,
                           bytes_per_token=W, copies=copies)
    assert slower["ratio"] == pytest.approx(row["ratio"] / 2, rel=1e-3)  # a slower decode scores lower


def test_decode_row_refuses_noise_and_ragged_rounds(mods):
    gp, _ = mods
    with pytest.raises(ValueError, match="--tokens"):
        gp.decode_row("p", [1.0] * 5, [1.0, 2, 2, 2, 2], [1.0] * 5, tokens=8, bytes_per_token=10, copies=1)
    with pytest.raises(ValueError, match="rounds"):
        gp.decode_row("p", [1.0] * 5, [2.0] * 4, [1.0] * 5, tokens=8, bytes_per_token=10, copies=1)
    with pytest.raises(ValueError, match="copies"):
        gp.decode_row("p", [1.0] * 5, [2.0] * 5, [1.0] * 5, tokens=8, bytes_per_token=10, copies=0)


def test_mfu_row_is_model_flops_over_matmul_flops(mods):
    gp, common = mods
    F = 3.2e13  # model FLOPs of one step
    mm = 8 * 2 * 8192**3
    step = [0.20, 0.21, 0.19, 0.22, 0.20]
    matmul = [0.0115, 0.0112, 0.0118, 0.0114, 0.0113]
    row = gp.mfu_row("k2-small", step, matmul, flops_per_step=F, matmul_flops=mm, batch=8, seq=1024)
    _check_ratio_row(common, row)
    assert row["target"] is None and row["unit"] == "TFLOP/s"
    want = statistics.median((F / s) / (mm / m) for s, m in zip(step, matmul))  # MFU per round
    assert row["ratio"] == pytest.approx(want, abs=1e-4)
    assert row["value"] == pytest.approx(F / statistics.median(step) / 1e12, rel=1e-3)
    assert row["baseline"] == pytest.approx(mm / statistics.median(matmul) / 1e12, rel=1e-3)
    assert row["tokens_per_s"] == pytest.approx(8 * 1024 / statistics.median(step), rel=1e-3)
    quicker_matmul = gp.mfu_row("k2-small", step, [m / 2 for m in matmul], flops_per_step=F, matmul_flops=mm,
                                batch=8, seq=1024)
    assert quicker_matmul["ratio"] == pytest.approx(row["ratio"] / 2, rel=1e-3)  # a faster bound lowers it
    with pytest.raises(ValueError):
        gp.mfu_row("p", step, matmul[:3], flops_per_step=F, matmul_flops=mm, batch=8, seq=1024)


def _switch_rounds(n=5):
    rounds = []
    for i in range(n):
        base = 100_000 + i
        free = {"cycle_start": base, "engine_released": base + 3000, "trainer_onloaded": base + 3000 - 5000,
                "trained": base - 2000 - 700, "trainer_offloaded": base - 2700 + 5600,
                "trainer_offloaded_empty_cache": base - 2700 + 5600 + 10 * i, "engine_resumed": base + 200 + 10 * i}
        rounds.append({"free": free, "seconds": {"release_engine": 0.01, "onload_trainer": 0.1 + i / 100,
                                                 "offload_trainer": 0.2, "resume_update_engine": 0.3}})
    return rounds


def test_switch_rows_are_diagnostics_without_ratio_or_target(mods):
    gp, common = mods
    rows = gp.switch_rows("k2-small", _switch_rounds(), trainer_bytes=5000, engine_bytes=3000)
    assert common.validate_rows(rows) == []
    assert all(r["kind"] == "diagnostic" and r["ratio"] is None and r["target"] is None and r["reps"] == 5
               for r in rows)
    by = {r["name"].split("/")[-1]: r for r in rows}
    assert by["engine_release_freed"]["value"] == 3000 and by["engine_release_freed"]["fraction_of_held"] == 1.0
    assert by["trainer_onload_taken"]["value"] == 5000  # bytes taken are reported positive
    assert by["trainer_offload_freed"]["value"] == 5600 and by["trainer_offload_freed"]["held_bytes"] == 5000
    assert by["extra_empty_cache_freed"]["value"] == 20 and by["extra_empty_cache_freed"]["spread"]["max"] == 40
    assert by["engine_resume_taken"]["value"] == 2700
    assert by["onload_trainer_s"]["value"] == pytest.approx(0.12)
    assert by["switch_total_s"]["value"] == pytest.approx(0.01 + 0.12 + 0.2 + 0.3)
    with pytest.raises(ValueError):
        gp.switch_rows("k2-small", [], trainer_bytes=1, engine_bytes=1)


def test_fewer_rounds_than_the_rule_are_flagged(mods):
    gp, common = mods
    row = gp.onload_row("onload/x", SYS[:3], BOUND[:3], 1 << 30, bound="b", streams={"system": "a", "bound": "b"})
    assert row["reps"] == 3 and len(common.validate_rows([row])) == 1
