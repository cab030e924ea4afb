"""FP8 block-128 quantization of a weight bucket (what the engine does to each bucket of a bf16 update).

Figures (higher = better), measured on the same tensors with the same thread count, repeats
interleaved so both sides see the same machine load:
  quantize        C++ thread pool (one quantize_fp8_blocks call for the whole bucket) GB/s of input;
                  ratio = torch reference time / C++ time (the vectorized torch definition, per tensor; peer)
  vs_copy         C++ GB/s vs a plain copy of the same input bytes (the same input tensors into touched
                  buffers of their size), N threads on one work queue at 1 thread and at the C++
                  thread count (the bound a streaming kernel cannot beat; benchmarks/common.py)
  triton (CUDA)   the Triton kernel on the GPU, ratio = torch reference on the GPU / Triton
All rows come from interleaved rounds (>= 5) with median ratio and spread.

The bucket defaults to Kimi-K2 expert shapes ([2048, 7168] gate/up, [7168, 2048] down) in bf16.

    python benchmarks/bench_fp8_quant.py --json OUT [--tensors 6] [--dtype bfloat16] [--threads N] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (MIN_REPS, CopyBound, add_common_args, copy_bound_rows, env_info, interleaved,  # noqa: E402
                    paired_row, print_results, thread_counts, write_results)

from k2sys import ext  # noqa: E402
from k2sys.quant import quantize_fp8_block_reference, quantize_fp8_blocks  # noqa: E402

SHAPES = [(2048, 7168), (2048, 7168), (7168, 2048)]  # one Kimi-K2 expert: gate, up, down
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bucket(n: int, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(*SHAPES[i % len(SHAPES)], generator=g) * 0.02).to(dtype).to(device) for i in range(n)]


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
    same = bitwise_equal(cpp(), ref())  # also warms both paths
    dst = [torch.empty_like(w).fill_(0) for w in ws]
    with CopyBound(dst, ws, threads=thread_counts(threads),
                   where="the same input tensors into touched buffers of their sizes") as cb:
        tm = interleaved({"cpp": cpp, "torch": ref, **cb.fns()}, args.repeats)
    out.append(paired_row(f"quantize_cpp_{args.dtype}", tm["cpp"], tm["torch"], kind="peer", work=nbytes, unit="GB/s",
                          scale=1e9, threads=threads, system_threads=threads, bitwise_equal=same, tensors=len(ws),
                          bound=f"torch reference (same tensors, {threads} intra-op threads)"))
    out += copy_bound_rows(f"quantize_cpp_{args.dtype}", tm["cpp"], cb, tm, system_threads=threads,
                           what="system: one quantize_fp8_blocks call (C++ pool), reads the input twice")
    if torch.cuda.is_available() and not args.skip_cuda:
        wg = [w.to("cuda") for w in ws]
        ref_g = lambda: [quantize_fp8_block_reference(w) for w in wg]  # noqa: E731
        tri = lambda: quantize_fp8_blocks(wg, backend="triton")  # noqa: E731
        same_g = bitwise_equal(tri(), ref_g())
        tg = interleaved({"triton": tri, "torch": ref_g}, args.repeats, sync=torch.cuda.synchronize)
        out.append(paired_row(f"quantize_triton_{args.dtype}", tg["triton"], tg["torch"], kind="peer", work=nbytes,
                              unit="GB/s", scale=1e9, threads=1, system_threads=1, bitwise_equal=same_g,
                              bound="torch reference on the GPU (same tensors)"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="write results here (atomically)")
    ap.add_argument("--tensors", type=int, default=6, help="tensors in the bucket (Kimi-K2 expert shapes)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=0, help="threads for both sides (0: all CPUs)")
    ap.add_argument("--repeats", type=int, default=MIN_REPS, help=f"interleaved rounds (>= {MIN_REPS})")
    add_common_args(ap)
    ap.add_argument("--skip-cuda", action="store_true")
    args = ap.parse_args(argv)
    if not ext.HAS_CPP:
        print("k2sys._C is not built: " + ext.REBUILD_HINT, file=sys.stderr)
        return 1
    rows = run(args)
    print_results(rows, "FP8 block-128 quantization of a bucket")
    write_results(args.json, rows, env_info(tensors=args.tensors, dtype=args.dtype, repeats=args.repeats,
                                            note=args.note))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
