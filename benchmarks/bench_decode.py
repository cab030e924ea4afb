"""Native engine decode vs the memory roofline, and grouped vs per-expert-loop routed experts (issue 16).

System: one decode step of the native engine exactly as its scheduler thread runs it
(`Scheduler.step()`: plan, batch tensors, `ModelRunner` forward, sampling), greedy, every sequence
decoding (32-token prompts prefilled first, untimed), on a random model of the preset (k2-small).
Runners of the same weights run side by side: moe_impl="grouped" (the engine's default; at batch 1
in fp32 its whole layer stack is one C++ call, csrc/decode_layer.h), moe_impl="loop" (the
per-expert loop it replaced, with its packed expert weights, op by op), and at batch 1 "per_op"
(grouped with ModelRunner.fused_decode=False: the same C++ kernels called op by op from Python).

Bound (batch 1): the memory roofline of a step = the weight bytes the step must read / the memory
bandwidth of a plain copy measured in this run (`common.CopyBound`: the engine's own weight
tensors, exactly the bytes one step reads, copied onto a touched scratch buffer, 1 thread and all
cores, per round the faster of memcpy / torch copy_). Bytes read per step: the embedding rows of
the step's tokens, every attention / dense / norm / router / shared-expert weight, the routed
experts the step selects (batch 1: top-k per layer; batch 32: the distinct experts its routing
used, counted during warm-up), the final norm and lm_head. A copy of N bytes reads N and writes N
bytes, so its memory bandwidth is 2N / t (the STREAM convention) and the roofline step time is
t_copy / 2; counting only N / t would give a "bound" that a read-only pass such as a GEMV beats (the
rows also carry that ratio as `ratio_copy_bytes`). Rows at 1 thread and at all cores, engine and
copy on the same thread count.

Peers: step seconds of "loop" vs "grouped" and, at batch 1, of "per_op" vs the fused stack, in the
same rounds (ratio = peer / system, higher = the engine's path faster); routed-expert seconds of
"loop" vs "grouped" where both run them from Python (batch 32), and each per-op path's routed share
of the step (diagnostic). Diagnostic: the batch-1 step's weight GEMVs alone (the same weight bytes, one row
through each matrix, no other op) as a share of the step: what is left after it is the engine's
own work (attention over the cache, routing, norms, Python, sampling).

Rule (benchmarks/common.py): everything in one run, interleaved rounds (>= 5), ratio = median of
per-round ratios with its spread. In a round each side runs K times back to back (K decode steps, K
copies, K GEMV passes; --steps-b1/--steps-b32) and counts per repetition, so every side is timed
in its own steady state of the caches rather than right after another side evicted it (this VM's
last-level cache is large next to k2-small's weights).

    python benchmarks/bench_decode.py --json OUT [--model k2-small] [--dtype float32] [--reps 15]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import k2sys  # noqa: E402,F401  (before torch: its host-allocation settings, k2sys/__init__.py)
import torch
import torch.nn.functional as F

from k2sys import ext
from k2sys.engine.core.config import EngineConfig, SamplingParams
from k2sys.engine.core.kv_cache import PagedLatentCache
from k2sys.engine.core.model_runner import ModelRunner
from k2sys.engine.core.scheduler import Request, Scheduler
from k2sys.models import build_model, param_shapes, preset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (MIN_REPS, CopyBound, add_common_args, diagnostic, env_info, interleaved,  # noqa: E402
                    paired_row, print_results, thread_counts, write_results)

PROMPT_LEN = 32
TARGET_B1 = 0.6
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


class TimedRunner(ModelRunner):
    """The engine's runner, timing its routed experts (and, while `count` is on, recording which
    experts each layer ran: the bytes a step must read)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.routed_s = 0.0
        self.count = False
        self.used: dict[int, set[int]] = {}
        self._index = {id(L): i for i, L in enumerate(self.layers)}

    def routed_experts(self, L, x, weights, ids):
        t0 = time.perf_counter()
        out = super().routed_experts(L, x, weights, ids)
        self.routed_s += time.perf_counter() - t0
        if self.count:
            self.used.setdefault(self._index[id(L)], set()).update(ids.unique().tolist())
        return out


class Decoder:
    """Runner + latent cache + scheduler as NativeEngine builds them, driven on this thread."""

    def __init__(self, cfg, state, dtype: torch.dtype, moe_impl: str, batch: int, seed: int, fused: bool = True):
        ecfg = EngineConfig(max_total_tokens=16384, max_num_batched_tokens=8192)
        self.runner = TimedRunner(cfg, state, dtype, "cpu", max_positions=cfg.max_position_embeddings,
                                  moe_kernels="torch", moe_impl=moe_impl)
        self.runner.fused_decode = fused
        # batch 32 compares the routed experts of the per-op path (grouped GEMMs vs the expert loop);
        # a model whose layers fit in the cache would run the fused stack token by token there
        # (ModelRunner.fused_max_batch, measured by bench_rollout / bench_agent), k2-small does not
        self.runner.fused_max_batch = 1
        self.cache = PagedLatentCache(cfg.num_hidden_layers, ecfg.num_blocks, ecfg.block_size, cfg.kv_lora_rank,
                                      cfg.qk_rope_head_dim, dtype)
        self.sched = Scheduler(ecfg, self.runner, self.cache, cfg.max_position_embeddings, None)
        g = torch.Generator().manual_seed(seed)
        for b in range(batch):
            ids = torch.randint(2, cfg.vocab_size, (PROMPT_LEN,), generator=g).tolist()
            self.sched.add(Request(rid=f"{moe_impl}-{b}", input_ids=ids,
                                   params=SamplingParams(max_new_tokens=1 << 20, temperature=0.0, ignore_eos=True)))
        self.sched.step()  # the batch's prefill (untimed)
        if any(len(s.tokens) - s.num_computed != 1 for s in self.sched.running):
            raise RuntimeError("bench_decode: the prefill did not fit one step; raise max_num_batched_tokens")
        self.batch = batch

    def steps(self, n: int):
        def run() -> None:
            for _ in range(n):
                if self.sched.step() != self.batch:
                    raise RuntimeError("bench_decode: a step did not decode the whole batch")
        return run


def read_tensors(runner: ModelRunner, tokens: int, experts: dict[int, int]) -> list[torch.Tensor]:
    """The weight tensors (views into the engine's storage) holding exactly the bytes one decode step
    reads: `tokens` embedding rows, experts[layer] routed experts per MoE layer, everything else whole."""
    cfg, out = runner.cfg, []
    for name, t in runner.params.items():
        m = _EXPERT.match(name)
        if m:
            if int(m.group(2)) < experts[int(m.group(1))]:
                out.append(t)
        elif name == "model.embed_tokens.weight" and not cfg.tie_word_embeddings:
            out.append(t[:tokens])
        else:
            out.append(t)
    return [t for t in out if t.numel()]


def gemv_floor(tensors: list[torch.Tensor], dtype: torch.dtype):
    """One row through every weight matrix of the step (the embedding rows excluded: a row copy), with the
    GEMV the engine uses for one row (k2sys's C++ GEMV in fp32 where built, else F.linear)."""
    mats = [t.view(-1, t.shape[-1]) for t in tensors if t.dim() == 2 and t.dtype == dtype and t.shape[0] > 1]
    xs = {w.shape[1]: torch.randn(1, w.shape[1]).to(dtype) for w in mats}
    gemv = ext.gemv if ext.HAS_CPP and dtype == torch.float32 else (lambda w, x: F.linear(x, w))

    def run() -> None:
        with torch.inference_mode():
            for w in mats:
                gemv(w, xs[w.shape[1]])
    return run


def _repeat(fn, n: int):
    def run() -> None:
        for _ in range(n):
            fn()
    return run


def _reset(runner: TimedRunner):
    return lambda: setattr(runner, "routed_s", 0.0)


def _record(runner: TimedRunner, out: list[float], steps: int):
    return lambda: out.append(runner.routed_s / steps)


def bench(args) -> tuple[list[dict], dict]:
    cfg = preset(args.model, eos_token_id=None)
    dtype = DTYPES[args.dtype]
    model = build_model(cfg, seed=0)
    state = {k: v for k, v in model.state_dict().items() if k in param_shapes(cfg)}
    del model
    threads = thread_counts()
    rows: list[dict] = []
    info: dict = {}
    cases = [(b, s) for b, s in ((1, args.steps_b1), (32, args.steps_b32)) if b in args.batches]
    for B, n_steps in cases:
        dec = {impl: Decoder(cfg, state, dtype, impl, B, seed=B) for impl in ("grouped", "loop")}
        if B == 1:  # the engine's batch-1 path is the fused C++ stack; this peer runs the same kernels op by op
            dec["per_op"] = Decoder(cfg, state, dtype, "grouped", B, seed=B, fused=False)
        runner = dec["grouped"].runner
        runner.count = True  # warm-up: oneDNN primitive caches, and which experts a step reads
        for d in dec.values():
            d.steps(3)()
        runner.count = False
        k = cfg.num_experts_per_tok
        used = {i: (k if B == 1 else len(runner.used.get(i, ())))
                for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)}
        tensors = read_tensors(runner, B, used)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        info[f"b{B}"] = {"read_bytes_per_step": nbytes, "routed_experts_read_per_layer": used,
                         "steps_per_round": n_steps}
        scratch = torch.zeros(nbytes, dtype=torch.uint8)
        cb = CopyBound(scratch, tensors, threads=threads, label=f"copy_b{B}",
                       where=f"the engine's weight tensors one batch-{B} step reads, onto a touched scratch buffer")
        if cb.nbytes != nbytes:
            raise AssertionError(f"copy bound covers {cb.nbytes} bytes, the step reads {nbytes}")
        floor = gemv_floor(tensors, dtype) if B == 1 else None
        for t in threads:
            torch.set_num_threads(t)
            fns = {impl: d.steps(n_steps) for impl, d in dec.items()}
            if floor is not None:
                fns["gemv_floor"] = _repeat(floor, n_steps)
            # as many copies back to back as steps: both sides in the same steady state of the caches
            fns.update({cb.name(i, t): _repeat(cb.copier(i, t), n_steps) for i in cb.impls})
            routed: dict[str, list[float]] = {impl: [] for impl in dec}
            tm = interleaved(fns, reps=args.reps, warmup=1,
                             before={i: _reset(d.runner) for i, d in dec.items()},
                             after={i: _record(d.runner, routed[i], n_steps) for i, d in dec.items()})
            step = {i: [s / n_steps for s in tm[i]] for i in dec}
            routed = {i: v[-tm.reps:] for i, v in routed.items()}
            copy_s = [c / n_steps for c in cb.seconds(tm, t)]
            roof = [c / 2 for c in copy_s]  # STREAM: a copy of N bytes moves 2N
            bound = (f"memory roofline: {nbytes / 1e6:.1f} MB read per step at the bandwidth of a plain copy "
                     f"(2 x bytes copied / s; {cb.definition(t)})")
            for impl in dec:
                r = paired_row(f"decode_b{B}_{impl}_vs_roofline_x{t}", step[impl], roof, bound=bound, threads=t,
                               system_threads=t, kind="bound", work=nbytes, unit="GB/s", scale=1e9,
                               target=TARGET_B1 if (B == 1 and impl == "grouped") else None,
                               moe_impl="grouped" if impl == "per_op" else impl, batch=B,
                               fused_decode=dec[impl].runner.fused_decode and B == 1 and impl == "grouped",
                               step_ms=round(1e3 * sorted(step[impl])[len(step[impl]) // 2], 3))
                r["ratio_copy_bytes"] = round(2 * r["ratio"], 4)  # vs N / t_copy
                rows.append(r)
            if "per_op" in dec:
                rows.append(paired_row(f"decode_b{B}_step_fused_vs_per_op_x{t}", step["grouped"], step["per_op"],
                                       bound="peer: the same step with ModelRunner.fused_decode=False (the same C++ "
                                             "kernels called op by op from Python), same weights and threads",
                                       kind="peer", threads=t, system_threads=t, batch=B))
            rows.append(paired_row(f"decode_b{B}_step_grouped_vs_loop_x{t}", step["grouped"], step["loop"],
                                   bound="peer: the same step with moe_impl=loop (per-expert GEMM loop, packed "
                                         "expert weights" + (", op by op" if B == 1 else "") + "), same weights, "
                                         "batch and threads", kind="peer", threads=t, system_threads=t, batch=B))
            # routed-expert seconds: only the per-op paths time them (the fused stack runs them inside C++)
            timed = [i for i in dec if routed[i] and sum(routed[i]) > 0]
            if "grouped" in timed and "loop" in timed:
                rows.append(paired_row(f"decode_b{B}_routed_experts_grouped_vs_loop_x{t}", routed["grouped"],
                                       routed["loop"], bound="peer: routed-expert seconds per step with "
                                       "moe_impl=loop, same steps", kind="peer", threads=t, system_threads=t, batch=B))
            for impl in timed:
                share = sorted(r / s for r, s in zip(routed[impl], step[impl]))
                rows.append(diagnostic(f"decode_b{B}_routed_share_{impl}_x{t}", round(share[len(share) // 2], 4),
                                       "fraction", f"routed-expert seconds / step seconds, {impl} (median "
                                       "of rounds)", threads=t, reps=len(share), batch=B))
            if floor is not None:
                share = sorted(f / n_steps / s for f, s in zip(tm["gemv_floor"], step["grouped"]))
                rows.append(diagnostic(f"decode_b{B}_weight_gemvs_share_x{t}", round(share[len(share) // 2], 4),
                                       "fraction", "the step's weight bytes streamed by bare GEMVs (one row through "
                                       "each matrix, no other op) / the grouped step, same rounds", threads=t,
                                       reps=len(share), batch=B))
        cb.close()
        del dec, scratch
    return rows, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--model", default="k2-small", help="model preset")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--batches", default="1,32", help="comma-separated subset of 1,32")
    ap.add_argument("--reps", type=int, default=15, help=f"interleaved rounds (>= {MIN_REPS})")
    ap.add_argument("--steps-b1", type=int, default=6, help="decode steps (and copies) per round at batch 1")
    ap.add_argument("--steps-b32", type=int, default=2, help="decode steps (and copies) per round at batch 32")
    add_common_args(ap)
    args = ap.parse_args(argv)
    args.batches = {int(b) for b in args.batches.split(",")}
    if not args.batches or not args.batches <= {1, 32}:
        ap.error(f"--batches: a subset of 1,32, got {sorted(args.batches)}")
    if args.reps < 1 or args.steps_b1 < 1 or args.steps_b32 < 1:
        ap.error("--reps, --steps-b1 and --steps-b32 must be >= 1")
    load_before = os.getloadavg()
    keep = torch.get_num_threads()
    rows, info = bench(args)
    torch.set_num_threads(keep)
    env = env_info(model=args.model, dtype=args.dtype, prompt_len=PROMPT_LEN, reps=args.reps, note=args.note,
                   loadavg_1_5_15_before=[round(v, 2) for v in load_before],
                   loadavg_1_5_15_after=[round(v, 2) for v in os.getloadavg()], **info)
    print_results(rows, f"# decode: native engine ({args.model}, {args.dtype}) vs the memory roofline; grouped vs "
                        "loop routed experts")
    write_results(args.json, rows, env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
