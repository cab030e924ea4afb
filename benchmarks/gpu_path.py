"""The GPU path of k2sys on one device, each figure a ratio to a bound measured in the same run.

  python benchmarks/gpu_path.py onload --json OUT     pinned H2D onload (k2sys.ext.h2d_copy_ ring, and the
                                                      trainer's StateOffloader) vs one cudaMemcpyAsync of
                                                      the same pinned bytes (target >= 0.9)
  python benchmarks/gpu_path.py switch --json OUT     the colocated switch on one GPU (Megatron trainer +
                                                      native engine, k2-small): device bytes from
                                                      cudaMemGetInfo before/after each release and
                                                      re-acquire, vs the bytes each side holds
  python benchmarks/gpu_path.py decode --json OUT     native engine decode at batch 1: weight bytes read per
                                                      token x tok/s vs device-to-device copy bandwidth (HBM)
  python benchmarks/gpu_path.py mfu --json OUT        Megatron trainer model FLOP/s on k2-small vs a dense
                                                      bf16 matmul's FLOP/s measured here

scripts/gpu_check.sh runs all four (plus benchmarks/bench_moe.py for the fused MoE figures). Every
subcommand needs a CUDA device and says so otherwise; `--help` works anywhere.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import env_info, print_results, result, write_json  # noqa: E402

GIB = 1 << 30


def _sync() -> None:
    torch.cuda.synchronize()


def _best(fn, repeats: int) -> float:
    """Best wall seconds of fn() followed by a device synchronize."""
    fn()
    _sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _mem() -> dict:
    free, total = torch.cuda.mem_get_info()
    return {"device_free": int(free), "device_total": int(total), "torch_reserved": int(torch.cuda.memory_reserved()),
            "torch_allocated": int(torch.cuda.memory_allocated())}


def hbm_copy_bps(nbytes: int = GIB, repeats: int = 5) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (the HBM bound)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    t = _best(lambda: dst.copy_(src), repeats)
    return 2 * nbytes / t


def dense_bf16_flops(n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n bf16 matmul (the dense peak measured on this device)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = _best(lambda: torch.matmul(a, b), repeats)
    return 2 * n**3 / t


# ------------------------------------------------------------------------------------ onload
def cmd_onload(args) -> list[dict]:
    from k2sys import ext
    from k2sys.trainer.offload import StateOffloader

    n = int(args.gib * GIB)
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True).random_(0, 256)  # misplaced bytes show
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    t_bound = _best(lambda: dev.copy_(host, non_blocking=True), args.repeats)  # cudaMemcpyAsync, pinned
    bound = n / t_bound / 1e9
    rows = []
    if ext.HAS_CUDA:
        dev.zero_()
        ext.h2d_copy_(dev, host)
        torch.cuda.synchronize()
        for a, b in ((0, 1 << 20), (n - (1 << 20), n)):
            assert torch.equal(dev[a:b].cpu(), host[a:b]), "h2d_copy_ landed wrong bytes"
        t_ring = _best(lambda: ext.h2d_copy_(dev, host), args.repeats)
        rows.append(result("onload h2d_copy_ (k2sys._cuda ring) GB/s vs cudaMemcpy pinned", n / t_ring / 1e9, "GB/s",
                           bound, 0.9, bytes=n))
    else:
        rows.append(result("onload h2d_copy_ (k2sys._cuda ring): SKIPPED, k2sys._cuda not built or no device",
                           0.0, "GB/s", bound, None, skipped=True))
    dev = None  # free it before the next case
    # The trainer's path: a state of 16 tensors offloaded to pinned DRAM and onloaded back.
    per = n // 16 // 4
    state = [torch.randn(per, device="cuda") for _ in range(16)]
    off = StateOffloader()
    secs = []
    for _ in range(args.repeats):
        off.offload(state)
        secs.append(off.onload()["seconds"])
    rows.append(result("trainer StateOffloader.onload GB/s vs cudaMemcpy pinned (incl. device re-allocation)",
                       16 * per * 4 / min(secs) / 1e9, "GB/s", bound, 0.9, bytes=16 * per * 4))
    return rows


# ------------------------------------------------------------------------------------ switch
def _batch(vocab: int, B: int, T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, vocab, (B, T + 1), generator=g)
    return {"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": torch.ones(B, T)}


def cmd_switch(args) -> list[dict]:
    from k2sys.ckpt import update_weights
    from k2sys.ckpt.engine_sinks import NativeEngineSink
    from k2sys.ckpt.pipeline import TrainerShards
    from k2sys.engine.config import EngineConfig, SamplingParams
    from k2sys.engine.engine import NativeEngine
    from k2sys.models import build_model, preset
    from k2sys.trainer.backend import MegatronBackend, TrainerConfig

    cfg = preset(args.preset)
    ref = build_model(cfg, seed=0)
    trainer = MegatronBackend.from_model(ref, train=TrainerConfig(dtype="bfloat16"))
    trainer.train_step(_batch(cfg.vocab_size, 2, 64, 0))  # optimizer state exists
    engine = NativeEngine.from_model(ref, EngineConfig(device="cuda", dtype="bfloat16", max_total_tokens=1 << 16))
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    prompt = [list(range(2, 34))]
    rows, mem, st = [], {}, {}
    try:
        engine_bytes = sum(engine.memory_bytes().values())
        mem["start"] = _mem()
        t0 = time.perf_counter()
        trainer_bytes = trainer.offload()["bytes"]
        st["offload_trainer"] = time.perf_counter() - t0
        mem["trainer_offloaded"] = _mem()  # what offload itself gave back to the driver
        torch.cuda.empty_cache()
        mem["trainer_offloaded_empty_cache"] = _mem()
        engine.generate_sglang(prompt, params)  # rollout
        t0 = time.perf_counter()
        engine.release_memory(["kv_cache", "weights"])
        st["release_engine"] = time.perf_counter() - t0
        mem["engine_released"] = _mem()
        t0 = time.perf_counter()
        trainer.onload()
        st["onload_trainer"] = time.perf_counter() - t0
        mem["trainer_onloaded"] = _mem()
        trainer.train_step(_batch(cfg.vocab_size, 2, 64, 1))
        t0 = time.perf_counter()
        trainer.offload()
        st["offload_trainer_2"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.resume_memory(["weights"])
        tensors, lay = trainer.export_shards()
        update_weights(TrainerShards(layout=lay, tensors=tensors), NativeEngineSink(engine))
        engine.resume_memory(["kv_cache"])
        st["resume_update_engine"] = time.perf_counter() - t0
        mem["engine_resumed"] = _mem()
        out = engine.generate_sglang(prompt, params)
        assert len(out[0]["output_ids"]) == 16, "engine did not generate after the switch"
    finally:
        engine.shutdown()

    def freed(a: str, b: str) -> int:
        return mem[b]["device_free"] - mem[a]["device_free"]

    rows.append(result("trainer offload: device bytes freed (cudaMemGetInfo) / trainer state bytes",
                       freed("start", "trainer_offloaded"), "B", trainer_bytes, 0.9,
                       note="memory the driver got back (what a colocated engine in another process could use)"))
    rows.append(result("trainer offload + another torch.cuda.empty_cache: device bytes freed / trainer state bytes",
                       freed("start", "trainer_offloaded_empty_cache"), "B", trainer_bytes, None,
                       note="diagnostic: above this row's ratio, the caching allocator held freed memory back"))
    rows.append(result("engine release(kv_cache, weights): device bytes freed / engine bytes",
                       freed("trainer_offloaded_empty_cache", "engine_released"), "B", engine_bytes, 0.9))
    rows.append(result("trainer onload: device bytes taken / trainer state bytes",
                       -freed("engine_released", "trainer_onloaded"), "B", trainer_bytes, None))
    total = sum(st.values())
    rows.append(result(f"colocated switch {args.preset}: stage seconds (rollout->train->rollout)", total, "s", None,
                       None, stages=st, memory=mem))
    return rows


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
    from k2sys.engine.config import EngineConfig, SamplingParams
    from k2sys.engine.engine import NativeEngine
    from k2sys.models import build_model, preset

    cfg = preset(args.preset)
    engine = NativeEngine.from_model(build_model(cfg, seed=0), EngineConfig(device="cuda", dtype="bfloat16"))
    prompt = [list(range(2, 34))]
    try:
        def run(new: int) -> float:
            p = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)
            t0 = time.perf_counter()
            out = engine.generate_sglang(prompt, p)
            assert len(out[0]["output_ids"]) == new
            return time.perf_counter() - t0

        run(8)  # warm-up: kernel compiles, allocations
        short = min(run(16) for _ in range(2))
        long = min(run(16 + args.tokens) for _ in range(2))
    finally:
        engine.shutdown()
    tok_s = args.tokens / max(long - short, 1e-9)  # prefill and the first steps cancel out
    per_token = bytes_per_decode_token(cfg, 2)
    hbm = hbm_copy_bps()
    return [result(f"engine decode {args.preset} batch 1: weight bytes/s vs HBM copy bandwidth", per_token * tok_s,
                   "B/s", hbm, None, tokens_per_s=tok_s, bytes_per_token=per_token)]


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
    be.train_step(_batch(cfg.vocab_size, B, T, 0))  # warm-up: Triton compiles, allocations
    times = []
    for s in range(args.steps):
        _sync()
        t0 = time.perf_counter()
        be.train_step(_batch(cfg.vocab_size, B, T, s + 1))
        _sync()
        times.append(time.perf_counter() - t0)
    tok_s = B * T / statistics.median(times)
    model = train_flops_per_token(cfg, T) * tok_s
    peak = dense_bf16_flops()
    return [result(f"trainer MFU {args.preset} bf16 (B={B}, T={T}): model FLOP/s vs dense bf16 matmul FLOP/s",
                   model, "FLOP/s", peak, None, tokens_per_s=tok_s, moe_kernels=be.train.moe_kernels,
                   fused_experts=be.fused_experts)]


COMMANDS = {"onload": cmd_onload, "switch": cmd_switch, "decode": cmd_decode, "mfu": cmd_mfu}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("onload", help="pinned H2D onload vs cudaMemcpy of pinned memory")
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("switch", help="colocated switch on one GPU with cudaMemGetInfo before/after")
    p.add_argument("--preset", default="k2-small")
    p = sub.add_parser("decode", help="native engine decode bytes/s vs HBM bandwidth at batch 1")
    p.add_argument("--preset", default="k2-small")
    p.add_argument("--tokens", type=int, default=128, help="decode steps timed")
    p = sub.add_parser("mfu", help="Megatron trainer MFU")
    p.add_argument("--preset", default="k2-small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    for p in sub.choices.values():
        p.add_argument("--json", help="write {'results': [...], 'env': {...}} here")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu_path {args.cmd}: needs a CUDA device (none visible)", file=sys.stderr)
        return 2
    rows = COMMANDS[args.cmd](args)
    env = env_info(benchmark=f"gpu_path {args.cmd}", gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    print_results(rows, f"# gpu_path {args.cmd} on {env['gpu']}")
    if args.json:
        write_json(args.json, {"results": rows, "env": env})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
