"""FP8 block-128 quantization of a weight bucket (what the engine does to each bucket of a bf16 update).

Figures (higher = better), measured on the same tensors with the same thread count, repeats
interleaved so both sides see the same machine load:
  quantize        C++ thread pool (one quantize_fp8_blocks call for the whole bucket) GB/s of input;
                  ratio = torch reference time / C++ time (the vectorized torch definition, per tensor)
  vs_copy         C++ GB/s / a plain copy of the same input bytes into a touched buffer (the bound a
                  streaming kernel cannot beat; quantizing reads the input twice, block by block)
  triton (CUDA)   the Triton kernel on the GPU, ratio = torch reference on the GPU / Triton

The bucket defaults to Kimi-K2 expert shapes ([2048, 7168] gate/up, [7168, 2048] down) in bf16.

    python benchmarks/bench_fp8_quant.py --json OUT [--tensors 6] [--dtype bfloat16] [--threads N] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import env_info, print_results, result, write_json  # noqa: E402

from k2sys import ext  # noqa: E402
from k2sys.quant import quantize_fp8_block_reference, quantize_fp8_blocks  # noqa: E402

SHAPES = [(2048, 7168), (2048, 7168), (7168, 2048)]  # one Kimi-K2 expert: gate, up, down
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bucket(n: int, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(*SHAPES[i % len(SHAPES)], generator=g) * 0.02).to(dtype).to(device) for i in range(n)]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def bitwise_equal(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return all(torch.equal(qa.view(torch.uint8), qb.view(torch.uint8)) and torch.equal(sa, sb)
               for (qa, sa), (qb, sb) in zip(a, b))


def run(args) -> list[dict]:
    dtype = DTYPES[args.dtype]
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    out = []
    ws = bucket(args.tensors, dtype, "cpu")
    nbytes = sum(w.numel() * w.element_size() for w in ws)
    ref = lambda: [quantize_fp8_block_reference(w) for w in ws]  # noqa: E731
    cpp = lambda: quantize_fp8_blocks(ws, threads=threads, backend="cpp")  # noqa: E731
    dst = [torch.empty_like(w) for w in ws]
    copy = lambda: [d.copy_(w) for d, w in zip(dst, ws)]  # noqa: E731
    same = bitwise_equal(cpp(), ref())  # also warms both paths
    copy()
    t_ref, t_cpp, t_copy, ratios = [], [], [], []
    for _ in range(args.repeats):
        t_ref.append(timed(ref, "cpu"))
        t_cpp.append(timed(cpp, "cpu"))
        t_copy.append(timed(copy, "cpu"))
        ratios.append(t_ref[-1] / t_cpp[-1])
    m_ref, m_cpp, m_copy = (statistics.median(t) for t in (t_ref, t_cpp, t_copy))
    gbs = nbytes / m_cpp / 1e9
    out.append(result(f"quantize_cpp_{args.dtype}", gbs, "GB/s", nbytes / m_ref / 1e9,
                      ratio=statistics.median(ratios), baseline_is="torch reference (same tensors, same threads)",
                      threads=threads, tensors=len(ws), bytes=nbytes, bitwise_equal=same,
                      seconds_cpp=t_cpp, seconds_torch=t_ref))
    out.append(result(f"quantize_cpp_vs_copy_{args.dtype}", gbs, "GB/s", nbytes / m_copy / 1e9,
                      baseline_is="torch copy_ of the same bytes into a touched buffer", seconds_copy=t_copy))
    if torch.cuda.is_available() and not args.skip_cuda:
        wg = [w.to("cuda") for w in ws]
        ref_g = lambda: [quantize_fp8_block_reference(w) for w in wg]  # noqa: E731
        tri = lambda: quantize_fp8_blocks(wg, backend="triton")  # noqa: E731
        same_g = bitwise_equal(tri(), ref_g())
        t_rg, t_tri, r_g = [], [], []
        for _ in range(args.repeats):
            t_rg.append(timed(ref_g, "cuda"))
            t_tri.append(timed(tri, "cuda"))
            r_g.append(t_rg[-1] / t_tri[-1])
        out.append(result(f"quantize_triton_{args.dtype}", nbytes / statistics.median(t_tri) / 1e9, "GB/s",
                          nbytes / statistics.median(t_rg) / 1e9, ratio=statistics.median(r_g),
                          baseline_is="torch reference on the GPU", bitwise_equal=same_g,
                          seconds_triton=t_tri, seconds_torch=t_rg))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="write results here (atomically)")
    ap.add_argument("--tensors", type=int, default=6, help="tensors in the bucket (Kimi-K2 expert shapes)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=0, help="threads for both sides (0: all CPUs)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-cuda", action="store_true")
    args = ap.parse_args(argv)
    if not ext.HAS_CPP:
        print("k2sys._C is not built: " + ext.REBUILD_HINT, file=sys.stderr)
        return 1
    rows = run(args)
    print_results(rows, "FP8 block-128 quantization of a bucket")
    if args.json:
        write_json(args.json, {"results": rows, "env": env_info(tensors=args.tensors, dtype=args.dtype,
                                                                  repeats=args.repeats)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
