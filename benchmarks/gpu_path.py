"""The GPU path of k2sys on one device, each figure paired with a bound measured in the same run.

  python benchmarks/gpu_path.py onload --json OUT     pinned H2D onload (k2sys.ext.h2d_copy_ ring, and the
                                                      trainer's StateOffloader) vs cudaMemcpyAsync of the
                                                      same pinned bytes into the same device buffers (>= 0.9)
  python benchmarks/gpu_path.py switch --json OUT     the colocated switch on one GPU (Megatron trainer +
                                                      native engine, k2-small): device bytes freed / taken
                                                      (cudaMemGetInfo) vs the bytes each side holds, and
                                                      stage seconds: diagnostics, no ratio, no target
  python benchmarks/gpu_path.py decode --json OUT     native engine decode at batch 1: weight bytes read per
                                                      token x tok/s vs a device-to-device copy of a buffer
                                                      of the same byte count (the HBM roofline)
  python benchmarks/gpu_path.py mfu --json OUT        Megatron trainer model FLOP/s on k2-small vs a dense
                                                      bf16 matmul's FLOP/s

The bound rule (benchmarks/common.py, docs/benchmarks.md): system and bound run interleaved round by
round (common.interleaved, >= MIN_REPS rounds after an untimed warm-up, rotated start), each timed
wall-clock up to torch.cuda.synchronize(); a ratio is the median of the per-round ratios (bound
seconds / system seconds, higher = better) with its spread. Every row names its bound, the host
threads issuing the work (1 on both sides here) and the CUDA stream of each side.

The row building (paired seconds -> rows) is pure and runs without a GPU: `onload_row`,
`decode_row`, `mfu_row`, `switch_rows` (tests/test_gpu_path_rows.py).
scripts/gpu_check.sh runs all four (plus benchmarks/bench_moe.py for the fused MoE figures). Every
subcommand needs a CUDA device and says so otherwise; `--help` works anywhere.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import (MIN_REPS, add_common_args, diagnostic, env_info, interleaved, paired_row,  # noqa: E402
                    print_results, summarize, write_results)

GIB = 1 << 30
ONLOAD_TARGET = 0.9
DEFAULT_STREAM = "the default CUDA stream"


def _sync() -> None:
    torch.cuda.synchronize()


# ------------------------------------------------------------------------------------ rows (pure)
def onload_row(name: str, system_s, bound_s, nbytes: int, *, bound: str, streams: dict,
               target: float | None = ONLOAD_TARGET, **extra) -> dict:
    """Onload GB/s vs the H2D copy bound: per round, bound seconds / system seconds."""
    return paired_row(name, system_s, bound_s, bound=bound, threads=1, system_threads=1, target=target,
                      work=nbytes, unit="GB/s", scale=1e9, stream=streams, bytes=int(nbytes), **extra)


def decode_row(preset: str, short_s, long_s, copy_s, *, tokens: int, bytes_per_token: int, copies: int) -> dict:
    """Decode weight GB/s vs the HBM copy roofline, from paired rounds.

    short_s / long_s: seconds of a generate of 16 / 16 + `tokens` new tokens (prefill and the first
    steps cancel in the difference); copy_s: seconds of `copies` back-to-back device-to-device copies
    of a `bytes_per_token`-byte buffer. A copy moves 2 x its bytes (read + write), so the roofline
    time of one decode step is half of one copy's time: the weight bytes at the copy's HBM rate.
    """
    if not (len(short_s) == len(long_s) == len(copy_s)):
        raise ValueError(f"decode_row: {len(short_s)}/{len(long_s)}/{len(copy_s)} rounds of short/long/copy")
    if tokens < 1 or copies < 1 or bytes_per_token < 1:
        raise ValueError(f"decode_row: tokens={tokens}, copies={copies}, bytes_per_token={bytes_per_token} "
                         "must all be >= 1")
    per_token = [(lo - sh) / tokens for sh, lo in zip(short_s, long_s)]
    bad = [i for i, t in enumerate(per_token) if t <= 0]
    if bad:
        raise ValueError(f"decode_row: rounds {bad}: the long generate was not slower than the short one "
                         "(timing noise exceeds the decode time); raise --tokens")
    roof = [c / copies / 2 for c in copy_s]
    bound = (f"HBM roofline: {bytes_per_token / 1e6:.1f} MB (the weight bytes one batch-1 step reads) at the "
             f"read+write rate of a device-to-device copy of a {bytes_per_token / 1e6:.1f} MB buffer (copy "
             f"time / 2; {copies} copies per round), {DEFAULT_STREAM}")
    return paired_row(f"decode/{preset}/batch1_weight_bytes_vs_hbm_copy", per_token, roof, bound=bound, threads=1,
                      system_threads=1, work=bytes_per_token, unit="GB/s", scale=1e9,
                      stream={"system": f"{DEFAULT_STREAM} (engine loop thread)", "bound": DEFAULT_STREAM},
                      tokens_per_s=round(1 / statistics.median(per_token), 2), bytes_per_token=int(bytes_per_token),
                      tokens_per_round=tokens, note="value: weight bytes/s read by decode; baseline: the copy's "
                                                    "read+write bytes/s")


def mfu_row(preset: str, step_s, matmul_s, *, flops_per_step: float, matmul_flops: float, batch: int, seq: int,
            **extra) -> dict:
    """Trainer model FLOP/s vs a dense bf16 matmul's FLOP/s, from paired rounds.

    step_s: seconds of one train step; matmul_s: seconds of the matmul call, which does
    `matmul_flops` FLOPs. The bound time of a step is its model FLOPs at that round's matmul rate.
    """
    if len(step_s) != len(matmul_s):
        raise ValueError(f"mfu_row: {len(step_s)} step rounds vs {len(matmul_s)} matmul rounds")
    if flops_per_step <= 0 or matmul_flops <= 0:
        raise ValueError(f"mfu_row: flops_per_step={flops_per_step}, matmul_flops={matmul_flops} must be > 0")
    bound_s = [flops_per_step * m / matmul_flops for m in matmul_s]
    bound = (f"the step's model FLOPs ({flops_per_step / 1e12:.3f} TFLOP: 6 x active params x tokens + causal "
             f"attention) at the FLOP/s of a dense bf16 matmul ({matmul_flops / 1e12:.3f} TFLOP per round), "
             f"interleaved with the steps on {DEFAULT_STREAM}")
    return paired_row(f"mfu/{preset}/bf16_B{batch}_T{seq}_model_flops_vs_dense_matmul", step_s, bound_s, bound=bound,
                      threads=1, system_threads=1, work=flops_per_step, unit="TFLOP/s", scale=1e12,
                      stream={"system": DEFAULT_STREAM, "bound": DEFAULT_STREAM},
                      tokens_per_s=round(batch * seq / statistics.median(step_s), 1), **extra)


# (name, before snapshot, after snapshot, sign, held key, what): sign +1 = bytes freed, -1 = bytes taken
SWITCH_MEMORY = (
    ("engine_release_freed", "cycle_start", "engine_released", 1, "engine",
     "device bytes freed by engine.release_memory(kv_cache, weights) (cudaMemGetInfo)"),
    ("trainer_onload_taken", "engine_released", "trainer_onloaded", -1, "trainer",
     "device bytes taken by trainer.onload"),
    ("trainer_offload_freed", "trained", "trainer_offloaded", 1, "trainer",
     ("device bytes freed by trainer.offload (it empties the caching allocator: what another process could use; "
      "the train step's cached activations are freed too)")),
    ("extra_empty_cache_freed", "trainer_offloaded", "trainer_offloaded_empty_cache", 1, "trainer",
     "device bytes a further torch.cuda.empty_cache freed after offload (non-zero: the allocator held memory back)"),
    ("engine_resume_taken", "trainer_offloaded_empty_cache", "engine_resumed", -1, "engine",
     "device bytes taken by engine resume(weights) + update + resume(kv_cache)"),
)
SWITCH_STAGES = ("release_engine", "onload_trainer", "offload_trainer", "resume_update_engine")


def switch_rows(preset: str, rounds: list[dict], *, trainer_bytes: int, engine_bytes: int) -> list[dict]:
    """Diagnostics of the colocated switch (no bound was measured: no ratio, no target).

    rounds: per switch cycle {"free": {snapshot: cudaMemGetInfo free bytes}, "seconds": {stage: s}}.
    """
    if not rounds:
        raise ValueError("switch_rows: no rounds")
    held = {"trainer": int(trainer_bytes), "engine": int(engine_bytes)}
    rows = []
    for name, a, b, sign, side, what in SWITCH_MEMORY:
        moved = [sign * (r["free"][b] - r["free"][a]) for r in rounds]
        sp = summarize(moved)
        rows.append(diagnostic(f"switch/{preset}/{name}", int(sp["median"]), "B",
                               f"{what}, vs the {held[side]} bytes the {side} holds", reps=len(moved),
                               spread={k: int(sp[k]) for k in ("min", "q1", "q3", "max")}, held_bytes=held[side],
                               fraction_of_held=round(sp["median"] / held[side], 4) if held[side] else None))
    for stage in SWITCH_STAGES + ("switch_total",):
        xs = [sum(r["seconds"][s] for s in SWITCH_STAGES) if stage == "switch_total" else r["seconds"][stage]
              for r in rounds]
        sp = summarize(xs)
        rows.append(diagnostic(f"switch/{preset}/{stage}_s", round(sp["median"], 5), "s",
                               "stage seconds (median over switch cycles); switch_total = release + onload + "
                               "offload + resume/update, without the train step and rollout", reps=len(xs),
                               spread={k: round(sp[k], 5) for k in ("min", "q1", "q3", "max")}))
    return rows


# ------------------------------------------------------------------------------------ onload
def _h2d_bound(pairs_fn, stream):
    """One cudaMemcpyAsync per (device dst, pinned src) pair, on `stream` (the bound's copies)."""
    def copy():
        with torch.cuda.stream(stream):
            for d, s in pairs_fn():
                d.copy_(s, non_blocking=True)
    return copy


def cmd_onload(args) -> list[dict]:
    from k2sys import ext
    from k2sys.trainer.offload import StateOffloader

    n = int(args.gib * GIB)
    side = torch.cuda.Stream()  # non-blocking, as the ring's own stream is
    ring_stream = "k2sys._cuda ring's own non-blocking stream (32 MiB cudaMemcpyAsync chunks)"
    bound_stream = "one non-blocking torch.cuda.Stream (the ring's stream is internal to k2sys._cuda)"
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    host[: 1 << 20].random_(0, 256)  # misplaced bytes show in the checks below
    host[-(1 << 20):].random_(0, 256)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    rows = []
    bound_def = (f"one cudaMemcpyAsync of the same {n / 1e9:.2f} GB pinned host buffer into the same device "
                 "buffer, 1 host thread")
    if ext.HAS_CUDA:
        dev.zero_()
        ext.h2d_copy_(dev, host)
        _sync()
        for a, b in ((0, 1 << 20), (n - (1 << 20), n)):
            assert torch.equal(dev[a:b].cpu(), host[a:b]), "h2d_copy_ landed wrong bytes"
        tm = interleaved({"ring": lambda: ext.h2d_copy_(dev, host), "bound": _h2d_bound(lambda: [(dev, host)], side)},
                         args.repeats, sync=_sync)
        rows.append(onload_row(f"onload/h2d_copy_ring_{args.gib:g}GiB_vs_cudaMemcpy", tm["ring"], tm["bound"], n,
                               bound=bound_def, streams={"system": ring_stream, "bound": bound_stream},
                               system="k2sys.ext.h2d_copy_ (pinned source: direct chunks on the ring's stream)"))
    else:
        tm = interleaved({"bound": _h2d_bound(lambda: [(dev, host)], side)}, args.repeats, sync=_sync)
        sp = summarize(tm["bound"])
        rows.append(diagnostic(f"onload/h2d_copy_ring_{args.gib:g}GiB: SKIPPED", round(n / sp["median"] / 1e9, 3),
                               "GB/s", "k2sys._cuda is not built or sees no device: only the bound ran (value = "
                               "its GB/s)", reps=sp["n"], skipped=True))
    dev = host = None  # free both before the trainer's case allocates its own
    torch.cuda.empty_cache()
    # The trainer's path: a state of 16 tensors offloaded to pinned DRAM and onloaded back
    # (re-allocating the device storages each time); the bound copies the offloader's own host
    # buffers onto the onloaded storages (which hold the same bytes, so it changes nothing).
    per = n // 16 // 4
    state = [torch.randn(per, device="cuda") for _ in range(16)]
    probe = [t[:4096].clone() for t in state]
    off = StateOffloader()
    cur: list = []  # (live storage, host buffer) pairs: the storages move on every onload

    def refresh() -> None:
        cur[:] = list(zip(*off.buffers()))

    tm = interleaved({"onload": off.onload, "bound": _h2d_bound(lambda: cur, side)}, args.repeats, sync=_sync,
                     before={"onload": lambda: off.offload(state), "bound": refresh})
    for t, p in zip(state, probe):
        assert torch.equal(t[:4096], p), "StateOffloader round trip changed the state"
    nbytes = 16 * per * 4
    rows.append(onload_row(f"onload/state_offloader_{nbytes / GIB:g}GiB_vs_cudaMemcpy", tm["onload"], tm["bound"],
                           nbytes, bound="one cudaMemcpyAsync per storage (16) of the offloader's own pinned host "
                                         "buffers into the onloaded device storages, 1 host thread",
                           streams={"system": ring_stream, "bound": bound_stream},
                           system="trainer StateOffloader.onload, incl. re-allocating the device storages"))
    return rows


# ------------------------------------------------------------------------------------ switch
def _batch(vocab: int, B: int, T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, vocab, (B, T + 1), generator=g)
    return {"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": torch.ones(B, T)}


def _free() -> int:
    _sync()
    return int(torch.cuda.mem_get_info()[0])


def cmd_switch(args) -> list[dict]:
    from k2sys.ckpt import update_weights
    from k2sys.ckpt.engine_sinks import NativeEngineSink
    from k2sys.ckpt.pipeline import TrainerShards
    from k2sys.engine.core.config import EngineConfig, SamplingParams
    from k2sys.engine.core.engine import NativeEngine
    from k2sys.models import build_model, preset
    from k2sys.trainer.backend import MegatronBackend, TrainerConfig

    cfg = preset(args.preset)
    ref = build_model(cfg, seed=0)
    trainer = MegatronBackend.from_model(ref, train=TrainerConfig(dtype="bfloat16"))
    trainer.train_step(_batch(cfg.vocab_size, 2, 64, 0))  # optimizer state exists
    engine = NativeEngine.from_model(ref, EngineConfig(device="cuda", dtype="bfloat16", max_total_tokens=1 << 16))
    sink = NativeEngineSink(engine)
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    prompt = [list(range(2, 34))]

    def cycle(step: int) -> dict:
        """rollout -> release engine -> onload trainer -> train -> offload trainer -> resume + update engine."""
        free, sec = {"cycle_start": _free()}, {}

        def timed(stage, fn):
            t0 = time.perf_counter()
            out = fn()
            _sync()
            sec[stage] = time.perf_counter() - t0
            return out

        engine.generate_sglang(prompt, params)  # rollout
        timed("release_engine", lambda: engine.release_memory(["kv_cache", "weights"]))
        free["engine_released"] = _free()
        timed("onload_trainer", trainer.onload)
        free["trainer_onloaded"] = _free()
        trainer.train_step(_batch(cfg.vocab_size, 2, 64, step))
        free["trained"] = _free()
        timed("offload_trainer", trainer.offload)
        free["trainer_offloaded"] = _free()
        torch.cuda.empty_cache()
        free["trainer_offloaded_empty_cache"] = _free()

        def resume_update():
            engine.resume_memory(["weights"])
            tensors, lay = trainer.export_shards()
            update_weights(TrainerShards(layout=lay, tensors=tensors), sink)
            engine.resume_memory(["kv_cache"])
        timed("resume_update_engine", resume_update)
        free["engine_resumed"] = _free()
        out = engine.generate_sglang(prompt, params)
        assert len(out[0]["output_ids"]) == 16, "engine did not generate after the switch"
        return {"free": free, "seconds": sec}

    try:
        engine_bytes = sum(engine.memory_bytes().values())
        trainer_bytes = trainer.offload()["bytes"]  # a rollout starts with the trainer offloaded
        cycle(1)  # warm-up: allocations, plans, kernel compiles (not counted)
        rounds = [cycle(2 + i) for i in range(args.repeats)]
    finally:
        engine.shutdown()
    return switch_rows(args.preset, rounds, trainer_bytes=trainer_bytes, engine_bytes=engine_bytes)


# ------------------------------------------------------------------------------------ decode
def bytes_per_decode_token(cfg, elem: int) -> int:
    """Weight bytes a batch-1 decode step reads: every weight once, one embedding row, and of the
    routed experts only the top-k of each MoE layer (the KV cache is not counted)."""
    from k2sys.models import param_shapes

    total = 0
    for name, shape in param_shapes(cfg).items():
        n = 1
        for d in shape:
            n *= d
        if "embed_tokens" in name:
            n = shape[-1]
        elif ".mlp.experts." in name:
            n = n * cfg.num_experts_per_tok // cfg.n_routed_experts
        total += n * elem
    return total


def cmd_decode(args) -> list[dict]:
    from k2sys.engine.core.config import EngineConfig, SamplingParams
    from k2sys.engine.core.engine import NativeEngine
    from k2sys.models import build_model, preset

    cfg = preset(args.preset)
    per_token = bytes_per_decode_token(cfg, 2)
    src = torch.empty(per_token, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    copies = max(1, math.ceil(GIB / per_token))  # >= 1 GiB per timed call: launch overhead is noise

    def copy():
        for _ in range(copies):
            dst.copy_(src)

    engine = NativeEngine.from_model(build_model(cfg, seed=0), EngineConfig(device="cuda", dtype="bfloat16"))
    prompt = [list(range(2, 34))]

    def run(new: int):
        def go():
            out = engine.generate_sglang(prompt, SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True))
            assert len(out[0]["output_ids"]) == new
        return go

    try:
        run(8)()  # kernel compiles, allocations (interleaved adds one more untimed round)
        tm = interleaved({"short": run(16), "long": run(16 + args.tokens), "copy": copy}, args.repeats, sync=_sync)
    finally:
        engine.shutdown()
    return [decode_row(args.preset, tm["short"], tm["long"], tm["copy"], tokens=args.tokens,
                       bytes_per_token=per_token, copies=copies)]


# ------------------------------------------------------------------------------------ mfu
def train_flops_per_token(cfg, seq: int) -> float:
    """6 x active parameters (routed experts at top_k / E, no embedding lookup) + causal attention."""
    from k2sys.models import param_shapes

    active = 0
    for name, shape in param_shapes(cfg).items():
        n = 1
        for d in shape:
            n *= d
        if "embed_tokens" in name or "norm" in name or "e_score_correction_bias" in name:
            continue  # lookups, elementwise scales and the router's selection bias: no matmul
        if ".mlp.experts." in name:
            n = n * cfg.num_experts_per_tok // cfg.n_routed_experts
        active += n
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    attn = 3 * 2 * (seq / 2) * cfg.num_attention_heads * (qk + cfg.v_head_dim) * cfg.num_hidden_layers
    return 6 * active + attn


def cmd_mfu(args) -> list[dict]:
    from k2sys.models import build_model, preset
    from k2sys.trainer.backend import MegatronBackend, TrainerConfig

    cfg = preset(args.preset)
    be = MegatronBackend.from_model(build_model(cfg, seed=0), train=TrainerConfig(dtype="bfloat16"))
    B, T = args.batch, args.seq
    be.train_step(_batch(cfg.vocab_size, B, T, 0))  # Triton compiles, allocations
    batches = iter([_batch(cfg.vocab_size, B, T, s + 1) for s in range(args.steps + 1)])  # + interleaved's warm-up
    n, k = args.matmul_n, 8  # 8 matmuls per timed call: ~10 ms on an H200 at n=8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)

    def matmul():
        for _ in range(k):
            torch.matmul(a, b, out=c)

    tm = interleaved({"step": lambda: be.train_step(next(batches)), "matmul": matmul}, args.steps, sync=_sync)
    return [mfu_row(args.preset, tm["step"], tm["matmul"], flops_per_step=train_flops_per_token(cfg, T) * B * T,
                    matmul_flops=k * 2 * n**3, batch=B, seq=T, matmul=f"{k} x ({n}x{n} @ {n}x{n}) bf16",
                    moe_kernels=be.train.moe_kernels, fused_experts=be.fused_experts)]


COMMANDS = {"onload": cmd_onload, "switch": cmd_switch, "decode": cmd_decode, "mfu": cmd_mfu}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    rounds = f"interleaved rounds after a warm-up (>= {MIN_REPS}; fewer are recorded in env.rule_warnings)"
    p = sub.add_parser("onload", help="pinned H2D onload vs cudaMemcpyAsync of the same pinned bytes")
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=MIN_REPS, help=rounds)
    p = sub.add_parser("switch", help="colocated switch on one GPU: cudaMemGetInfo per stage (diagnostics)")
    p.add_argument("--preset", default="k2-small")
    p.add_argument("--repeats", type=int, default=MIN_REPS, help="switch cycles after a warm-up cycle")
    p = sub.add_parser("decode", help="native engine decode bytes/s vs an HBM copy at batch 1")
    p.add_argument("--preset", default="k2-small")
    p.add_argument("--tokens", type=int, default=128, help="decode steps timed per round")
    p.add_argument("--repeats", type=int, default=MIN_REPS, help=rounds)
    p = sub.add_parser("mfu", help="Megatron trainer model FLOP/s vs a dense bf16 matmul")
    p.add_argument("--preset", default="k2-small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=MIN_REPS, help="train steps timed, each paired with a matmul; "
                                                               + rounds)
    p.add_argument("--matmul-n", type=int, default=8192, help="size of the square bf16 matmul bound")
    for p in sub.choices.values():
        p.add_argument("--json", help="write {'results': [...], 'env': {...}} here")
        add_common_args(p)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu_path {args.cmd}: needs a CUDA device (none visible)", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    rows = COMMANDS[args.cmd](args)
    env = env_info(benchmark=f"gpu_path {args.cmd}", gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   args={k: v for k, v in vars(args).items() if k not in ("json", "note")}, note=args.note,
                   load_avg_before=load_before, load_avg_after=os.getloadavg())
    print_results(rows, f"# gpu_path {args.cmd} on {env['gpu']}")
    write_results(args.json, rows, env)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
