"""Compile every k2sys Triton kernel for a GPU architecture on a machine without a GPU.

What compiles on a GPU and what runs in the CPU interpreter differ: tile sizes below 16, shared
memory over the block limit, register spills and unsupported ops only show up when triton lowers a
kernel to PTX and ptxas assembles it. This module does that lowering for sm_80 / sm_90 with
triton's bundled ptxas, for exactly the argument sets the launchers would use:

  1. cases: each kernel role (router, fused MoE forward for the engine, FP8 weights, the
     FusedMoEFunction and grouped-experts trainer paths with their backward, align with int64
     ids, FP8 bucket quantization) x dtype x shape (Kimi-K2: H 7168, I 2048, E 384, top-8, its
     EP=8 and TP=8 slices, k2-small) x tile config (the heuristic at token counts 1..65536 and
     every config of every tuned table for this arch and triton version);
  2. each case drives the real launcher code on meta tensors inside `launch.collect_launches()`,
     so the recorded launches carry the launchers' own arguments, strides and constexprs;
  3. each launch is specialized as triton's runtime would (16-byte divisibility, ints equal to 1
     folded to constants), identical (kernel, signature, constexprs, options) compiles are
     deduplicated, and the rest compile in parallel worker processes;
  4. each compile reports shared memory (checked against the arch's per-block limit: 227 KiB on
     sm_90, 163 KiB on sm_80), registers and spill bytes (from ptxas -v); a compile error, a
     shared-memory overflow, more registers than a block can hold or any spill fails the entry.

`run_check(arch, ...)` returns the report {"arch", "kernels": [...], "summary", ...}; the CLI is
`k2sys kernels compile --arch 90 --json OUT` (k2sys.kernels.cli). Kernels must be compiled, not
interpreted: with TRITON_INTERPRET=1 set before import the CLI re-runs itself without it.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import io
import multiprocessing as mp
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ._interp import KERNELS_INTERPRETED, cdiv
from .configs import CONFIG_DIR, MoEKernelConfig, heuristic_config, list_config_tables, triton_version
from .fp8 import FP8_BLOCK, FP8_DTYPE
from .launch import Launch, collect_launches, record

__all__ = ["SHAPES", "TOKENS", "ROLES", "SHARED_LIMIT", "Case", "build_cases", "run_check", "summarize",
           "default_workers"]

# Per-block shared memory a kernel may use (opt-in maximum), bytes.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
REGISTERS_PER_BLOCK = 64 * 1024
SHAPES = {
    "kimi-k2": dict(H=7168, I=2048, E=384, top_k=8, n_group=1, topk_group=1),
    "kimi-k2-ep8": dict(H=7168, I=2048, E=48, top_k=8, n_group=1, topk_group=1),  # local experts at EP=8
    "kimi-k2-tp8": dict(H=7168, I=256, E=384, top_k=8, n_group=1, topk_group=1),  # expert slices at TP=8
    "k2-small": dict(H=512, I=256, E=16, top_k=4, n_group=4, topk_group=2),
}
TOKENS = (1, 16, 64, 256, 1024, 4096, 16384, 65536)
ACT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ROLES = ("router", "fused_moe.fwd", "fused_moe.fwd.fp8", "fused_moe.train", "grouped_experts.train", "align.int64",
         "fp8_quant")
_META = torch.device("meta")


@dataclass
class Case:
    """One use of the kernels: `drive()` calls the real launchers on meta tensors."""

    role: str
    dtype: str
    shape: str
    config: dict
    source: str  # where the config comes from: "heuristic (T=...)", a table file, "kernel"
    drive: Callable[[], None]
    arch: int | None = None  # only for this arch (tuned tables); None = any


@dataclass
class _Job:
    key: str
    launch: Launch
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    name: str
    role: str
    dtype: str
    config: dict
    constexprs_named: dict
    used_by: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------- cases
def _t(*shape, dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device=_META)


def _moe_tensors(s: dict, T: int, act: torch.dtype, fp8: bool, top_k: int):
    H, I, E = s["H"], s["I"], s["E"]
    wdt = FP8_DTYPE if fp8 else act
    w13, w2 = _t(E, 2 * I, H, dtype=wdt), _t(E, H, I, dtype=wdt)
    scales = None
    if fp8:
        scales = (_t(E, cdiv(2 * I, FP8_BLOCK), cdiv(H, FP8_BLOCK), dtype=torch.float32),
                  _t(E, cdiv(H, FP8_BLOCK), cdiv(I, FP8_BLOCK), dtype=torch.float32))
    return _t(T, H, dtype=act), w13, w2, _t(T, top_k, dtype=torch.float32), _t(T, top_k, dtype=torch.int32), scales


def _drive_moe(s: dict, T: int, act: torch.dtype, cfg: MoEKernelConfig, *, fp8=False, train=False, grouped=False,
               ids_dtype=torch.int32):
    from .fused_moe import _backward, _forward

    top_k = 1 if grouped else s["top_k"]
    rows = T * s["top_k"] if grouped else T  # grouped experts: one row per routed (token, expert) pair
    x, w13, w2, w, ids, scales = _moe_tensors(s, rows, act, fp8, top_k)
    ids = ids.to(ids_dtype)
    s13, s2 = scales if scales else (None, None)
    _, align, preact = _forward(x, w13, w2, w, ids, s13, s2, cfg, train)
    if train:
        _backward(_t(rows, s["H"], dtype=act), x, w13, w2, w, preact, align, cfg)


def _drive_router(s: dict, T: int, dtype: torch.dtype):
    from .router import _router_topk

    _router_topk(_t(T, s["E"], dtype=dtype), _t(s["E"], dtype=torch.float32), s["top_k"], s["n_group"],
                 s["topk_group"], 2.827, True)


def _fp8_quant_launches(rows: int, cols: int, src: str, out: str) -> list[Launch]:
    """The launches of k2sys_triton.fp8_quant's two launchers (that module launches directly, so the
    arguments are restated here: block 128x128, TILE_R 32, QUANT_NUM_WARPS / 4 warps)."""
    from . import _interp
    from .fp8_quant import QUANT_NUM_WARPS, _tile_rows, dequant_fp8_kernel, quant_fp8_kernel

    tl = _interp.tl
    br = bc = 128
    tl_src = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}[src]
    table = _t(3, 5, dtype=torch.int64)
    quant = Launch(quant_fp8_kernel, (cdiv(rows, br) * cdiv(cols, bc), 3), (table,),
                   dict(SRC_DTYPE=tl_src, BR=br, BC=bc, TILE_R=_tile_rows(br)), dict(num_warps=QUANT_NUM_WARPS))
    out_t = _t(rows, cols, dtype=torch.int16 if out == "bf16" else ACT_DTYPES[out])
    dequant = Launch(dequant_fp8_kernel, (cdiv(rows, br), cdiv(cols, bc)),
                     (_t(rows, cols, dtype=torch.uint8), _t(cdiv(rows, br), cdiv(cols, bc), dtype=torch.float32),
                      out_t, rows, cols),
                     dict(OUT_BF16=out == "bf16", BR=br, BC=bc, TILE_R=_tile_rows(br)), dict(num_warps=4))
    return [quant, dequant]


def _heuristic_configs(s: dict, key: str, grouped: bool, arch: int) -> dict[MoEKernelConfig, list[int]]:
    """Heuristic config -> token counts that select it (as get_config sees the call: rows and top_k)."""
    out: dict[MoEKernelConfig, list[int]] = {}
    for T in TOKENS:
        rows, k = (T * s["top_k"], 1) if grouped else (T, s["top_k"])
        out.setdefault(heuristic_config(rows, s["E"], k, key, arch), []).append(T)
    return out


def _moe_cases(role: str, shape: str, s: dict, dtype: str, cfgs: dict, source: Callable[[Any], str],
               arch: int | None = None) -> list[Case]:
    fp8 = role == "fused_moe.fwd.fp8"
    act = ACT_DTYPES[dtype.split("+")[-1]]
    train = role in ("fused_moe.train", "grouped_experts.train")
    grouped = role == "grouped_experts.train"
    ids_dtype = torch.int64 if role == "align.int64" else torch.int32
    cases = []
    for cfg, toks in cfgs.items():
        T = toks[0]

        def drive(cfg=cfg, T=T):
            _drive_moe(s, T, act, cfg, fp8=fp8, train=train, grouped=grouped, ids_dtype=ids_dtype)

        cases.append(Case(role, dtype, shape, cfg.to_dict(), source(toks), drive, arch))
    return cases


def build_cases(arch: int, roles=ROLES, shapes=None, dtypes=None, config_dir: Path | None = None,
                heuristic: bool = True) -> tuple[list[Case], list[dict]]:
    """(cases, tables): every case for `arch`, and what was done with each tuned table found."""
    shapes = list(shapes or SHAPES)
    unknown = [r for r in roles if r not in ROLES] + [s for s in shapes if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown role/shape {unknown}; roles: {', '.join(ROLES)}; shapes: {', '.join(SHAPES)}")
    want = set(dtypes) if dtypes else None

    def dtype_ok(d: str) -> bool:
        return want is None or d in want or d.split("+")[-1] in want or d.split("+")[0] in want

    moe_dtypes = {
        "fused_moe.fwd": ["fp32", "fp16", "bf16"],
        "fused_moe.fwd.fp8": ["fp8_w8a16_block128+bf16", "fp8_w8a16_block128+fp16"],
        "fused_moe.train": ["fp32", "fp16", "bf16"],
        "grouped_experts.train": ["fp32", "fp16", "bf16"],
        "align.int64": ["bf16"],
    }
    cases: list[Case] = []
    for role in roles:
        if role == "router":
            for shape in shapes:
                s = SHAPES[shape]
                for d in ("fp32", "bf16", "fp16"):
                    if dtype_ok(d):
                        cfg = {k: s[k] for k in ("E", "top_k", "n_group", "topk_group")}
                        cases.append(Case(role, d, shape, cfg, "kernel",
                                          lambda s=s, d=d: _drive_router(s, 16, ACT_DTYPES[d])))
        elif role == "fp8_quant":
            for src in ("fp32", "bf16", "fp16"):
                if not dtype_ok(src):
                    continue
                for rows, cols in ((4096, 7168), (129, 7)):  # 16-divisible sizes and ragged edges
                    cases.append(Case(role, src, f"{rows}x{cols}", {"block": [128, 128]}, "kernel",
                                      _FixedLaunches(_fp8_quant_launches(rows, cols, src, src))))
        elif heuristic:
            for shape in shapes:
                s = SHAPES[shape]
                for d in moe_dtypes[role]:
                    if not dtype_ok(d):
                        continue
                    key = d.split("+")[0]
                    cfgs = _heuristic_configs(s, key, role == "grouped_experts.train", arch)
                    cases += _moe_cases(role, shape, s, d, cfgs, lambda toks: f"heuristic (tokens {toks})")
    tables = []
    for path, key, meta, error in list_config_tables(config_dir or CONFIG_DIR):
        info = {"table": path.name, "compiled": False}
        tables.append(info)
        if error:
            info["skipped"] = error
            continue
        if key["triton"] != triton_version():
            info["skipped"] = f"tuned with triton {key['triton']}, this is {triton_version()} (not selectable)"
            continue
        cap = meta.get("capability")
        if not (isinstance(cap, list) and len(cap) == 2):
            info["skipped"] = "meta.capability [major, minor] missing: cannot tell which arch the table is for"
            continue
        if cap[0] * 10 + cap[1] != arch:
            info["skipped"] = f"for sm_{cap[0]}{cap[1]}, not sm_{arch}"
            continue
        from .configs import load_config_table

        table = load_config_table(key["E"], key["N"], key["device_name"], key["dtype"], path.parent, key["triton"])
        s = dict(H=int(meta.get("H", 7168)), I=key["N"], E=key["E"], top_k=int(meta.get("top_k", 8)))
        by_cfg: dict[MoEKernelConfig, list[int]] = {}
        for tokens, cfg in sorted(table.items()):
            by_cfg.setdefault(cfg, []).append(tokens)
        fp8 = key["dtype"] == "fp8_w8a16_block128"
        table_roles = (["fused_moe.fwd.fp8"] if fp8 else ["fused_moe.fwd", "fused_moe.train", "grouped_experts.train"])
        dts = ["fp8_w8a16_block128+bf16", "fp8_w8a16_block128+fp16"] if fp8 else [key["dtype"]]
        for role in table_roles:
            if role not in roles:
                continue
            for d in dts:
                if dtype_ok(d):
                    cases += _moe_cases(role, f"table E={key['E']} N={key['N']} H={s['H']}", s, d, by_cfg,
                                        lambda toks, n=path.name: f"{n} (tokens {toks})", arch)
        info["compiled"] = True
    return cases, tables


class _FixedLaunches:
    """A case driver that records launches built by hand (kernels whose module launches directly)."""

    def __init__(self, launches: list[Launch]):
        self.launches = launches

    def __call__(self) -> None:
        for ln in self.launches:
            record(ln)


# ---------------------------------------------------------------------------------- specialize
def _specialize(launch: Launch, backend) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as triton's JIT runtime derives them from these arguments."""
    from triton.runtime.jit import native_specialize_impl

    kernel = launch.kernel
    bound = launch.bound()
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        v = bound[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = v
            continue
        ty, spec = native_specialize_impl(backend, v, p.is_const, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = spec
        elif isinstance(spec, str):
            attrs[(i,)] = backend.parse_attr(spec)
    return signature, constexprs, attrs


def _show(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


def _collect_jobs(cases: list[Case], arch: int, fp_fusion: bool) -> list[_Job]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    jobs: dict[str, _Job] = {}
    for case in cases:
        if case.arch is not None and case.arch != arch:
            continue
        with collect_launches(arch) as launches:
            case.drive()
        for ln in launches:
            sig, cons, attrs = _specialize(ln, backend)
            opts = {"num_warps": 4, "num_stages": 3, **ln.options, "enable_fp_fusion": fp_fusion}
            name = f"{ln.kernel.fn.__module__.rsplit('.', 1)[-1]}.{ln.kernel.__name__}"
            raw = repr((name, sorted(sig.items()), sorted((k, _show(v)) for k, v in cons.items()),
                        sorted(attrs.items()), sorted(opts.items())))
            key = hashlib.sha1(raw.encode()).hexdigest()[:16]
            use = f"{case.role} {case.dtype} {case.shape}: {case.source}"
            if key not in jobs:
                names = [p.name for p in ln.kernel.params]
                named = {names[k[0]]: _show(v) for k, v in cons.items()}
                jobs[key] = _Job(key, ln, sig, cons, attrs, opts, name, case.role, case.dtype, case.config, named)
            if use not in jobs[key].used_by:
                jobs[key].used_by.append(use)
    return list(jobs.values())


# ------------------------------------------------------------------------------------- compile
_JOBS: list[_Job] = []
_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile_job(index: int, arch: int, cache_dir: str) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    job = _JOBS[index]
    out = {"ok": False, "shared_bytes": None, "registers": None, "spills": None, "error": None}
    buf = io.StringIO()
    t0 = time.perf_counter()
    with knobs.nvidia.scope(), knobs.compilation.scope(), knobs.cache.scope():
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v output is printed: registers and spills
        knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
        knobs.cache.dir = cache_dir
        try:
            with contextlib.redirect_stdout(buf):
                compiled = triton.compile(ASTSource(job.launch.kernel, job.signature, job.constexprs, job.attrs),
                                          target=GPUTarget("cuda", arch, 32), options=dict(job.options))
        except Exception as e:  # noqa: BLE001 - the compiler's error is the result
            msg = str(e).strip().splitlines()
            out["error"] = f"{type(e).__name__}: " + " | ".join(m for m in msg[:6] if m.strip())[:1500]
            out["seconds"] = round(time.perf_counter() - t0, 3)
            return out
    log = buf.getvalue()
    regs = [int(m) for m in _REGS.findall(log)]
    spills = [int(a) + int(b) for a, b in _SPILL.findall(log)]
    out["shared_bytes"] = int(compiled.metadata.shared)
    out["registers"] = max(regs) if regs else None
    out["spills"] = sum(spills) if spills else (0 if regs else None)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    problems = []
    if out["registers"] is None:
        problems.append("ptxas reported no register count")
    limit = SHARED_LIMIT[arch]
    if out["shared_bytes"] > limit:
        problems.append(f"shared memory {out['shared_bytes']} B exceeds the sm_{arch} block limit {limit} B "
                        f"({limit // 1024} KiB): lower BLOCK_*/num_stages")
    threads = job.options["num_warps"] * 32
    if out["registers"] and out["registers"] * threads > REGISTERS_PER_BLOCK:
        problems.append(f"{out['registers']} registers x {threads} threads exceed the {REGISTERS_PER_BLOCK} per block")
    if out["spills"]:
        problems.append(f"register spills: {out['spills']} bytes (spill stores + loads): more num_warps or smaller tiles")
    out["ok"] = not problems
    out["error"] = "; ".join(problems) or None
    return out


def _run_jobs(jobs: list[_Job], arch: int, workers: int, progress: Callable[[str], None] | None) -> list[dict]:
    global _JOBS
    _JOBS = jobs
    cache_dir = tempfile.mkdtemp(prefix="k2sys-compile-check-")
    results: list[dict | None] = [None] * len(jobs)
    try:
        if workers <= 1:
            for i in range(len(jobs)):
                results[i] = _compile_job(i, arch, cache_dir)
                if progress:
                    progress(f"[{i + 1}/{len(jobs)}] {jobs[i].name} {'ok' if results[i]['ok'] else 'FAILED'}")
        else:
            # fork: workers inherit the prepared jobs (kernels, specializations) without pickling them.
            with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
                futs = {pool.submit(_compile_job, i, arch, cache_dir): i for i in range(len(jobs))}
                for n, fut in enumerate(cf.as_completed(futs), 1):
                    i = futs[fut]
                    results[i] = fut.result()
                    if progress:
                        progress(f"[{n}/{len(jobs)}] {jobs[i].name} {'ok' if results[i]['ok'] else 'FAILED'}")
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
        _JOBS = []
    return results  # type: ignore[return-value]


def summarize(entries: list[dict]) -> dict:
    ok = [e for e in entries if e["ok"]]
    shared = [e["shared_bytes"] for e in entries if e["shared_bytes"] is not None]
    regs = [e["registers"] for e in entries if e["registers"] is not None]
    by_name: dict[str, int] = {}
    for e in entries:
        by_name[e["name"]] = by_name.get(e["name"], 0) + 1
    return {
        "entries": len(entries), "ok": len(ok), "failed": len(entries) - len(ok),
        "max_shared_bytes": max(shared, default=None), "max_registers": max(regs, default=None),
        "spilling": sum(1 for e in entries if e["spills"]), "per_kernel": by_name,
        "failures": [f"{e['name']} {e['dtype']} {e['config']}: {e['error']}" for e in entries if not e["ok"]][:50],
    }


def run_check(arch: int, *, roles=ROLES, shapes=None, dtypes=None, config_dir: Path | None = None,
              heuristic: bool = True, workers: int = 1, progress: Callable[[str], None] | None = None) -> dict:
    """Compile every selected case for sm_`arch`; the report of the module docstring."""
    if arch not in SHARED_LIMIT:
        raise ValueError(f"--arch {arch}: supported {sorted(SHARED_LIMIT)} (sm_80 A100, sm_90 H100/H200)")
    if KERNELS_INTERPRETED:
        raise RuntimeError("k2sys_triton was imported with TRITON_INTERPRET=1: the kernels are interpreted "
                           "functions and cannot be compiled; run without TRITON_INTERPRET")
    import triton
    from triton import knobs

    t0 = time.perf_counter()
    fp_fusion = not knobs.language.force_disable_fp_fusion and knobs.language.default_fp_fusion
    cases, tables = build_cases(arch, roles, shapes, dtypes, config_dir, heuristic)
    jobs = _collect_jobs(cases, arch, fp_fusion)
    results = _run_jobs(jobs, arch, workers, progress)
    entries = []
    for job, res in zip(jobs, results):
        entries.append({
            "name": job.name, "role": job.role, "config": job.config, "dtype": job.dtype,
            "ok": res["ok"], "shared_bytes": res["shared_bytes"], "registers": res["registers"],
            "spills": res["spills"], "error": res["error"],
            "num_warps": job.options["num_warps"], "num_stages": job.options["num_stages"],
            "constexprs": job.constexprs_named,
            "signature": {k: v for k, v in job.signature.items() if v != "constexpr"},
            "used_by": job.used_by, "compile_seconds": res.get("seconds"),
        })
    from triton.backends.nvidia.compiler import get_ptxas

    return {
        "arch": arch,
        "target": f"cuda sm_{arch}",
        "shared_limit_bytes": SHARED_LIMIT[arch],
        "triton": triton.__version__,
        "ptxas": get_ptxas(arch).path,
        "enable_fp_fusion": fp_fusion,
        "cases": len(cases),
        "tables": tables,
        "summary": summarize(entries),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "workers": workers,
        "kernels": entries,
    }


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)

