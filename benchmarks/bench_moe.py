"""MoE kernel benchmark: Triton fused MoE vs a dense bf16 matmul of equal FLOPs and vs the torch
per-expert reference, all measured in the same run.

GPU: Kimi-K2 per-GPU shapes, H=7168, top-8:
  ep8  E=48 local experts, I=2048   (expert parallel over 8 GPUs; every routed pair is local)
  tp8  E=384 experts, I=256         (tensor parallel over 8 GPUs: I = 2048 / 8)
  tokens 1..8192. Targets at 4096 tokens: >= 35% of the dense matmul's TFLOP/s, >= 5x the
  torch reference. Router rows compare the Triton router with its torch reference (E=384).
  Trainer rows (--train-tokens): grouped_experts forward + backward on expert-grouped rows (the
  K2FusedExperts path in megatron) vs the per-expert torch loop (megatron's SequentialMLP).
CPU (no GPU): tiny shapes, the torch reference vs the dense matmul only; labelled as a CPU run
  (the Triton interpreter is a test tool, its timings mean nothing).

  python benchmarks/bench_moe.py --json benchmarks/results/moe_h200.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (MIN_REPS, Timings, add_common_args, env_info, interleaved, paired_row,  # noqa: E402
                    print_results, write_results)

FLOPS_PER_PAIR = 6  # x @ w13^T (2 * H * 2I) + act @ w2^T (2 * I * H) = 6 * H * I per pair
K2_SHAPES = {"ep8": dict(E=48, I=2048), "tp8": dict(E=384, I=256)}
GPU_TOKENS = [1, 16, 64, 256, 1024, 4096, 8192]
CPU_SHAPE = dict(E=16, I=64, H=256, top_k=4)
CPU_TOKENS = [1, 8, 32, 128]
TARGET_TOKENS = 4096


def time_fn(fn, device: str, iters: int, warmup: int) -> float:
    """Median seconds per call of one function (the tuner's ranking of configs; figures use `rounds`)."""
    return rounds({"fn": fn}, device, iters, warmup).median("fn")


def rounds(fns: dict, device: str, reps: int, warmup: int, inner: int = 1) -> Timings:
    """Interleaved rounds (benchmarks/common.py) of seconds per call; on CUDA each timing covers
    `inner` back-to-back calls and one synchronize, so launch and sync overhead are amortized."""
    sync = torch.cuda.synchronize if device == "cuda" else None

    def many(fn):
        def run():
            for _ in range(inner):
                fn()
        return run
    tm = interleaved({k: many(f) for k, f in fns.items()}, reps, warmup=warmup, sync=sync)
    tm.times = {k: [t / inner for t in v] for k, v in tm.times.items()}
    return tm


def make_problem(T, H, I, E, top_k, dtype, device, seed=0):
    """Random activations/weights and routing through the K2 router (sigmoid + bias, top-k)."""
    from k2sys.kernels import k2_router_topk_torch

    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, H, device=device, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, device=device, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=device, generator=g) / I**0.5).to(dtype)
    logits = torch.randn(T, E, device=device, generator=g)
    bias = torch.randn(E, device=device, generator=g) * 0.1
    w, ids = k2_router_topk_torch(logits, bias, top_k, 1, 1, 2.827, True)
    return x, w13, w2, w, ids


def dense_peer(P, H, I, dtype, device):
    """A [P, H] x [H, 3I] matmul: the same 6*P*H*I FLOPs as the MoE, with no routing."""
    a = torch.randn(max(P, 1), H, device=device).to(dtype)
    b = torch.randn(H, 3 * I, device=device).to(dtype)
    return lambda: torch.matmul(a, b)


def peer_row(name, tm: Timings, system: str, peer: str, work: float, unit: str, scale: float, bound: str,
             target=None, **extra):
    """system vs peer from the same interleaved rounds (ratio = median of per-round peer/system)."""
    threads = torch.get_num_threads()
    return paired_row(name, tm[system], tm[peer], bound=bound, threads=threads, system_threads=threads, kind="peer",
                      target=target, work=work, unit=unit, scale=scale, digits=6,
                      time_ms=round(tm.median(system) * 1e3, 4), peer_ms=round(tm.median(peer) * 1e3, 4), **extra)


DENSE = "a dense [P, H] x [H, 3I] matmul of the same FLOPs (no routing), same dtype and device"
REF = "the torch per-expert reference (k2sys.kernels fused_moe_torch), same inputs"


def bench_gpu(args) -> list[dict]:
    from k2sys.kernels import fused_moe, fused_moe_torch, k2_router_topk, k2_router_topk_torch, quantize_fp8_block

    results, dtype, H, k = [], torch.bfloat16, 7168, 8
    for shape in args.shapes:
        E, I = K2_SHAPES[shape]["E"], K2_SHAPES[shape]["I"]
        x_all, w13, w2, _, _ = make_problem(max(args.tokens), H, I, E, k, dtype, "cuda")
        q = quantize_fp8_block(w13) + quantize_fp8_block(w2) if args.fp8 else None
        for T in args.tokens:
            x = x_all[:T]
            _, _, _, w, ids = make_problem(T, 16, 16, E, k, dtype, "cuda", seed=T)
            flops = FLOPS_PER_PAIR * T * k * H * I
            tgt = T == TARGET_TOKENS
            base = f"moe_{shape}_E{E}_I{I}_T{T}"
            fns = {"triton": lambda: fused_moe(x, w13, w2, w, ids), "torch_ref": lambda: fused_moe_torch(x, w13, w2, w, ids),
                   "dense": dense_peer(T * k, H, I, dtype, "cuda")}
            if q is not None:
                fns["fp8"] = lambda: fused_moe(x, q[0], q[2], w, ids, w13_scale=q[1], w2_scale=q[3])
            tm = rounds(fns, "cuda", args.repeats, args.warmup, inner=args.inner)
            results.append(peer_row(f"{base}_tflops_vs_dense_bf16", tm, "triton", "dense", flops, "TFLOP/s", 1e12,
                                    DENSE, 0.35 if tgt else None))
            results.append(peer_row(f"{base}_speedup_vs_torch_ref", tm, "triton", "torch_ref", T, "tok/s", 1.0,
                                    REF, 5.0 if tgt else None))
            if q is not None:
                results.append(peer_row(f"{base}_fp8_speedup_vs_bf16_triton", tm, "fp8", "triton", T, "tok/s", 1.0,
                                        "the bf16 Triton fused MoE, same inputs"))
        del w13, w2, x_all, q
        torch.cuda.empty_cache()
    if args.train_tokens:
        results += bench_train_gpu(args)
    for T in (256, TARGET_TOKENS):
        logits = torch.randn(T, 384, device="cuda")
        bias = torch.randn(384, device="cuda") * 0.1
        tm = rounds({"triton": lambda: k2_router_topk(logits, bias, 8, 1, 1, 2.827),
                     "torch_ref": lambda: k2_router_topk_torch(logits, bias, 8, 1, 1, 2.827)}, "cuda", args.repeats,
                    args.warmup, inner=args.inner)
        results.append(peer_row(f"router_E384_top8_T{T}_speedup_vs_torch_ref", tm, "triton", "torch_ref", T, "tok/s",
                                1.0, "the torch router reference (k2_router_topk_torch), same logits"))
    return results


def bench_train_gpu(args) -> list[dict]:
    """Trainer path: grouped_experts forward + backward on expert-grouped rows (what K2FusedExperts
    runs inside megatron) vs the per-expert torch loop (megatron's SequentialMLP), bf16."""
    from k2sys.kernels import grouped_experts, grouped_experts_torch

    results, dtype, H, k = [], torch.bfloat16, 7168, 8
    for shape in args.shapes:
        E, I = K2_SHAPES[shape]["E"], K2_SHAPES[shape]["I"]
        b13 = (torch.randn(E, 2 * I, H, device="cuda") / H**0.5).to(dtype)
        b2 = (torch.randn(E, H, I, device="cuda") / I**0.5).to(dtype)
        w13 = [torch.nn.Parameter(b13[e]) for e in range(E)]
        w2 = [torch.nn.Parameter(b2[e]) for e in range(E)]
        for T in args.train_tokens:
            _, _, _, _, ids = make_problem(T, 16, 16, E, k, dtype, "cuda", seed=T)
            counts = torch.bincount(ids.reshape(-1).long(), minlength=E)
            P = T * k
            x = torch.randn(P, H, device="cuda", dtype=dtype, requires_grad=True)
            p = torch.rand(P, device="cuda", requires_grad=True)
            dout = torch.randn(P, H, device="cuda", dtype=dtype)
            counts_cpu = counts.cpu()

            def step(fn, c):
                for t in (x, p, *w13, *w2):
                    t.grad = None
                fn(x, p, c, w13, w2).backward(dout)

            flops = 3 * FLOPS_PER_PAIR * P * H * I  # forward + 2x backward
            dense = dense_peer(P, H, I, dtype, "cuda")

            def dense3():
                for _ in range(3):  # forward + 2x backward worth of the same matmul
                    dense()
            tm = rounds({"triton": lambda: step(grouped_experts, counts),
                         "sequential": lambda: step(grouped_experts_torch, counts_cpu), "dense": dense3}, "cuda",
                        args.repeats, args.warmup, inner=1)
            base = f"train_fwd_bwd_{shape}_E{E}_I{I}_T{T}"
            results.append(peer_row(f"{base}_speedup_vs_sequential_mlp", tm, "triton", "sequential", T, "tok/s", 1.0,
                                    "the per-expert torch loop (megatron SequentialMLP), fwd + bwd, same rows"))
            results.append(peer_row(f"{base}_tflops_vs_dense_bf16", tm, "triton", "dense", flops, "TFLOP/s", 1e12,
                                    "3 dense matmuls of the forward's FLOPs (fwd + 2x bwd), bf16"))
        del w13, w2, b13, b2
        torch.cuda.empty_cache()
    return results


def bench_cpu(args) -> list[dict]:
    from k2sys.kernels import fused_moe_torch

    results, s = [], CPU_SHAPE
    for T in CPU_TOKENS:
        x, w13, w2, w, ids = make_problem(T, s["H"], s["I"], s["E"], s["top_k"], torch.float32, "cpu", seed=T)
        flops = FLOPS_PER_PAIR * T * s["top_k"] * s["H"] * s["I"]
        tm = rounds({"torch_ref": lambda: fused_moe_torch(x, w13, w2, w, ids),
                     "dense": dense_peer(T * s["top_k"], s["H"], s["I"], torch.float32, "cpu")}, "cpu", args.repeats,
                    args.warmup, inner=args.inner)
        name = f"cpu_torch_ref_E{s['E']}_H{s['H']}_I{s['I']}_top{s['top_k']}_T{T}_tflops_vs_dense_fp32"
        results.append(peer_row(name, tm, "torch_ref", "dense", flops, "TFLOP/s", 1e12, DENSE.replace("same dtype", "fp32")))
    return results


def moe_env(device: str) -> dict:
    import triton

    extra = dict(device=device, triton=triton.__version__)
    if device == "cuda":
        extra.update(gpu=torch.cuda.get_device_name(), cuda_version=torch.version.cuda)
    else:
        extra.update(note="CPU run: torch reference vs dense matmul on tiny shapes; no Triton timings (GPU only)")
    return env_info(**extra)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write {'results': [...], 'env': {...}} here")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--shapes", nargs="+", choices=sorted(K2_SHAPES), default=sorted(K2_SHAPES))
    ap.add_argument("--tokens", type=int, nargs="+", default=GPU_TOKENS, help="GPU token counts")
    ap.add_argument("--fp8", action="store_true", help="also time fp8 block-scaled weights (GPU)")
    ap.add_argument("--train-tokens", type=int, nargs="*", default=[1024, 4096],
                    help="token counts for the trainer rows (fwd+bwd on grouped rows, GPU); none to skip")
    ap.add_argument("--repeats", "--iters", type=int, default=20, help=f"interleaved rounds (>= {MIN_REPS})")
    ap.add_argument("--inner", type=int, default=1, help="calls per timing (amortizes launch/sync overhead)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: as set)")
    add_common_args(ap)
    args = ap.parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device visible")
    if min(args.tokens) < 1:
        ap.error("--tokens must all be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = bench_gpu(args) if device == "cuda" else bench_cpu(args)
    env = moe_env(device)
    env.update(repeats=args.repeats, inner=args.inner, note=args.note)
    print_results(results, f"# MoE benchmark on {env.get('gpu', 'CPU (reference path only)')}")
    write_results(args.json, results, env)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
