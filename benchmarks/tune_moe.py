"""Tune fused-MoE tile configs and write the JSON tables that k2sys_triton.configs reads.

For each (E, I) shape and token count, every candidate config is timed on the full forward
(align + GEMM1 + GEMM2) and the fastest kept; one table per (E, N=I, device, dtype) is written
atomically to --out-dir (default: the package's configs/ folder). Each chosen config is
reported against the heuristic fallback measured in the same run (speedup >= 1 by definition
of the search: the heuristic's tiles are always among the candidates).

  python benchmarks/tune_moe.py --shapes ep8 tp8                       # H200: writes the tables
  python benchmarks/tune_moe.py --dry-run --out-dir /tmp/cfg           # CPU: interpreter smoke run

--dry-run runs the same pipeline on tiny shapes in the Triton CPU interpreter with two
candidates: it checks the tuner end to end; its timings say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import sys

import torch

if not torch.cuda.is_available():  # triton decides interpreter vs compiler at kernel import time
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench_moe import K2_SHAPES, make_problem, time_fn  # noqa: E402

DEFAULT_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
SMEM_BYTES = 200 * 1024  # H100/H200 allow ~227 KiB per block; keep headroom for the epilogue


def candidates(num_tokens: int, E: int, top_k: int, dtype_key: str, elem_bytes: int):
    """Config space pruned by shared memory and by how many rows an expert block can fill."""
    from k2sys_triton import MoEKernelConfig, heuristic_config
    from k2sys_triton.configs import MAX_ACCUMULATORS_PER_THREAD, accumulators_per_thread

    per_expert = max(1.0, num_tokens * top_k / E)
    max_bm = max(16, min(128, 1 << (int(per_expert) * 2 - 1).bit_length()))
    block_ks = [64, 128]
    out = {heuristic_config(num_tokens, E, top_k, dtype_key)}
    for bm, bn, bk, gm, warps, stages in itertools.product(
        [16, 32, 64, 128], [32, 64, 128, 256], block_ks, [1, 16], [4, 8], [3, 4]
    ):
        if bm > max_bm:
            continue
        smem = stages * (bm * bk + 2 * bn * bk) * elem_bytes  # A tile + gate and up B tiles
        cfg = MoEKernelConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=warps, num_stages=stages)
        # Shared memory, and register spills of the fused gate/up GEMM (training reuses the table's tiles).
        if smem > SMEM_BYTES or accumulators_per_thread(cfg) > MAX_ACCUMULATORS_PER_THREAD:
            continue
        out.add(cfg)
    return sorted(out, key=lambda c: tuple(c.to_dict().values()))


def tune_shape(E, I, H, top_k, tokens, dtype, device, iters, space=None, max_configs=0, log=print):
    """{tokens: best config} plus per-token rows (best ms, heuristic ms).

    max_configs > 0 keeps a seeded random subset of the candidates (plus the heuristic) to fit
    a time budget; 0 tries them all.
    """
    from k2sys_triton import fused_moe, heuristic_config
    from k2sys_triton.configs import dtype_key

    key = dtype_key(dtype)
    x_all, w13, w2, _, _ = make_problem(max(tokens), H, I, E, top_k, dtype, device)
    table, report = {}, []
    for T in tokens:
        x = x_all[:T]
        _, _, _, w, ids = make_problem(T, 16, 16, E, top_k, dtype, device, seed=T)
        heur = heuristic_config(T, E, top_k, key)
        cands = list(space) if space is not None else candidates(T, E, top_k, key, x.element_size())
        if max_configs and len(cands) > max_configs:
            pick = torch.randperm(len(cands), generator=torch.Generator().manual_seed(T))[:max_configs]
            cands = [cands[i] for i in sorted(pick.tolist())]
        cands = [heur] + [c for c in cands if c != heur]  # the fallback is always a candidate
        timed = {}
        for cfg in cands:
            try:
                timed[cfg] = time_fn(lambda: fused_moe(x, w13, w2, w, ids, config=cfg), device, iters, 1)
            except Exception as e:  # a config the compiler rejects (resources) is skipped, not fatal
                log(f"  skip {cfg}: {type(e).__name__}: {str(e)[:120]}")
        if not timed:
            raise RuntimeError(f"no candidate config ran for E={E} I={I} T={T}")
        best = min(timed, key=timed.get)
        t_heur = timed.get(heur, float("nan"))
        table[T] = best
        report.append(dict(tokens=T, best_ms=timed[best] * 1e3, heuristic_ms=t_heur * 1e3, tried=len(timed)))
        log(f"E={E} I={I} T={T:>5}: best {timed[best] * 1e3:8.3f} ms vs heuristic {t_heur * 1e3:8.3f} ms "
            f"({t_heur / timed[best]:.2f}x, {len(timed)} configs) {best.to_dict()}")  # fmt: skip
    return table, report, key


def main(argv=None) -> int:
    import triton

    from k2sys_triton import MoEKernelConfig
    from k2sys_triton.configs import device_name, save_config_table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=sorted(K2_SHAPES), default=sorted(K2_SHAPES))
    ap.add_argument("--tokens", type=int, nargs="+", default=DEFAULT_TOKENS)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--max-configs", type=int, default=0, help="random subset per token count (0 = all)")
    ap.add_argument("--out-dir", help="where the tables go (default: the k2sys_triton configs/ folder)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, 2 configs: checks the pipeline (CPU ok)")
    args = ap.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.dry_run:
        ap.error("tuning needs a GPU; on CPU use --dry-run (interpreter smoke run) with --out-dir")
    if args.dry_run and not args.out_dir:
        ap.error("--dry-run needs --out-dir so that smoke tables never land in the package")
    if args.dry_run:
        shapes = {"dry": dict(E=5, I=32)}
        tokens, H, top_k = [1, 9], 64, 2
        space = [MoEKernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_stages=2),
                 MoEKernelConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_stages=2)]  # fmt: skip
    else:
        shapes = {s: K2_SHAPES[s] for s in args.shapes}
        tokens, H, top_k, space = args.tokens, args.hidden, args.top_k, None
    dev = device_name(torch.device(device))
    for name, s in shapes.items():
        table, report, key = tune_shape(s["E"], s["I"], H, top_k, tokens, dtype, device, args.iters, space, args.max_configs)
        capability = list(torch.cuda.get_device_capability()) if device == "cuda" else None
        meta = dict(shape=name, E=s["E"], N=s["I"], H=H, top_k=top_k, dtype=key, device=dev, capability=capability,
                    triton=triton.__version__, torch=torch.__version__, dry_run=args.dry_run,
                    tuned_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    measurements=report)  # fmt: skip
        path = save_config_table(table, s["E"], s["I"], dev, key, meta, config_dir=args.out_dir)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
