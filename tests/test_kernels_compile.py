"""`k2sys kernels compile` (Triton kernels compiled for sm_90 / sm_80 without a GPU) and
`k2sys kernels nvcc` (ptxas -v over csrc/cuda).

The compile check runs in a subprocess: the kernels must be compiled, not interpreted, and the
test session usually has TRITON_INTERPRET=1 (the command re-runs itself without it; the first
test goes through that path). Small subsets only: CI runs the full matrix (.ci/run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_KEYS = {"name", "config", "dtype", "ok", "shared_bytes", "registers", "spills", "error"}

pytest.importorskip("triton")


def _k2sys(*args: str, interpret: str = "1", timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": interpret, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "TRITON_DEFAULT_FP_FUSION": os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")}
    return subprocess.run([sys.executable, "-m", "k2sys.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def _table(tmp_path: Path, configs: dict) -> Path:
    from k2sys_triton.configs import MoEKernelConfig, save_config_table

    table = {int(t): MoEKernelConfig(**c) for t, c in configs.items()}
    # k2-small's expert shapes: E=16, N=I=256, H=512, top-4.
    return save_config_table(table, 16, 256, "NVIDIA_H200", "bf16",
                             {"capability": [9, 0], "H": 512, "top_k": 4}, config_dir=tmp_path)


GOOD = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)
# 6 stages of a 16x256 A tile and two 128x256 B tiles (bf16): ~414 KiB of shared memory.
TOO_BIG = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=6)


def test_compile_reports_every_launch_and_fails_a_tile_over_shared_memory(tmp_path):
    path = _table(tmp_path, {1: GOOD, 4096: TOO_BIG})
    out = tmp_path / "sm90.json"
    proc = _k2sys("kernels", "compile", "--arch", "90", "--json", str(out), "--roles", "router", "fused_moe.fwd",
                  "--shapes", "k2-small", "--dtypes", "bf16", "--config-dir", str(tmp_path), "--no-heuristic",
                  "--jobs", "2", "--quiet")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # one entry failed
    report = json.loads(out.read_text())
    assert report["arch"] == 90 and report["shared_limit_bytes"] == 227 * 1024
    entries = report["kernels"]
    for e in entries:
        assert ENTRY_KEYS <= set(e), e
    names = {e["name"] for e in entries}
    assert {"router._router_topk_kernel", "align._count_kernel", "align._scan_kernel", "align._scatter_kernel",
            "fused_moe._grouped_gemm_kernel"} <= names
    assert [t for t in report["tables"] if t["table"] == path.name][0]["compiled"]
    gemms = [e for e in entries if e["name"] == "fused_moe._grouped_gemm_kernel"]
    good = [e for e in gemms if e["config"] == GOOD]
    bad = [e for e in gemms if e["config"] == TOO_BIG]
    assert len(good) == 2 and len(bad) == 2  # GEMM1 (gate/up + SiLU) and GEMM2 of each config
    for e in good + [x for x in entries if x["name"] != "fused_moe._grouped_gemm_kernel"]:
        assert e["ok"] and e["error"] is None, e
        assert 0 < e["registers"] <= 255 and e["spills"] == 0 and 0 <= e["shared_bytes"] <= 227 * 1024
        assert e["dtype"] == "bf16"
    for e in bad:
        assert not e["ok"] and e["shared_bytes"] > 227 * 1024 and "shared memory" in e["error"], e
    # The launch arguments are the launchers' own: GEMM1 reads A rows as pair // top_k (k2-small: 4).
    gemm1 = [e for e in good if e["constexprs"]["FUSE_SILU"]][0]
    assert gemm1["constexprs"]["A_DIV"] == 4 and gemm1["constexprs"]["BLOCK_M"] == 16
    assert gemm1["num_warps"] == 4 and gemm1["num_stages"] == 3
    s = report["summary"]
    assert s["entries"] == len(entries) and s["failed"] == 2 and s["ok"] == len(entries) - 2
    assert s["max_shared_bytes"] == max(e["shared_bytes"] for e in entries)
    assert "FAILED" in proc.stdout


def test_compile_sm80_subset_passes_and_skips_tables_of_other_archs(tmp_path):
    path = _table(tmp_path, {1: GOOD})
    out = tmp_path / "sm80.json"
    proc = _k2sys("kernels", "compile", "--arch", "80", "--json", str(out), "--roles", "router", "fused_moe.fwd",
                  "--shapes", "k2-small", "--dtypes", "fp16", "--config-dir", str(tmp_path), "--no-heuristic",
                  "--jobs", "1", "--quiet", interpret="0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["arch"] == 80 and report["shared_limit_bytes"] == 163 * 1024
    assert [e["name"] for e in report["kernels"]] == ["router._router_topk_kernel"]
    assert report["kernels"][0]["ok"] and report["kernels"][0]["dtype"] == "fp16"
    info = [t for t in report["tables"] if t["table"] == path.name][0]
    assert not info["compiled"] and "sm_90" in info["skipped"]


def test_compile_rejects_unknown_arch_and_role(tmp_path):
    proc = _k2sys("kernels", "compile", "--arch", "75", "--quiet", interpret="0")
    assert proc.returncode == 2 and "--arch 75" in proc.stderr
    proc = _k2sys("kernels", "compile", "--arch", "90", "--roles", "softmax", "--quiet", interpret="0")
    assert proc.returncode == 2 and "softmax" in proc.stderr


# ---- nvcc ------------------------------------------------------------------------------------
PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'
ptxas info    : Function properties for _Z6kernelPf
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem
ptxas info    : Compiling entry function '_Z5otherv' for 'sm_80'
ptxas info    : Function properties for _Z5otherv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers, 384 bytes cmem[0]
"""


def test_ptxas_log_parsing():
    from k2sys.kernels.nvcc_report import parse_ptxas

    a, b = parse_ptxas(PTXAS_LOG)
    assert a == {"mangled": "_Z6kernelPf", "arch": "sm_90", "registers": 255, "spill_stores": 8, "spill_loads": 12,
                 "stack_bytes": 16, "shared_bytes": 4096}
    assert b["arch"] == "sm_80" and b["registers"] == 24 and b["spill_stores"] == 0 and b["shared_bytes"] == 0


def test_nvcc_report_of_the_cuda_extension(tmp_path):
    from k2sys.kernels.nvcc_report import default_sources, find_nvcc

    try:
        find_nvcc()
    except FileNotFoundError:
        pytest.skip("no nvcc on this machine")
    src = [s for s in default_sources() if s.name == "batched_copy.cu"]
    assert src, "csrc/cuda/batched_copy.cu is gone: update this test"
    out = tmp_path / "nvcc.json"
    proc = _k2sys("kernels", "nvcc", "--arch", "90", "--sources", str(src[0]), "--json", str(out), interpret="0")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    (k,) = report["kernels"]
    assert "batched_copy_kernel" in k["name"] and k["arch"] == "sm_90" and k["ok"]
    assert 0 < k["registers"] <= 255 and k["spills"] == 0
    assert "-Xptxas" in report["flags"] and "-gencode=arch=compute_90,code=sm_90" in report["flags"]


def test_nvcc_report_script_exists():
    script = ROOT / "scripts" / "nvcc_report.sh"
    assert script.is_file() and os.access(script, os.X_OK)
    if shutil.which("bash"):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
