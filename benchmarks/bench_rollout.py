"""Rollout throughput: the native engine vs transformers `generate`, same model, same run.

For each model (k2-tiny, optionally k2-small) and batch (1, 32, 128 prompts x 32 prompt tokens,
128 new tokens, greedy; plus n=8 sampled continuations per prompt) it measures generated tokens
per second of both and reports native / transformers (higher = better). Targets (issue 4):
>= 2x at 32 and 128 prompts, >= 1x at 1 prompt.

Both sides run with the same intra-op thread count (--threads, default 1 = the engine's default
cpu_threads): a peer comparison at equal resources. On a shared box an oversubscribed
multi-threaded side collapses (OpenMP barriers wait on descheduled threads), so the load
average before and after the run is recorded in "env" to judge the figures.

    python benchmarks/bench_rollout.py --json OUT [--models k2-tiny,k2-small] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from k2sys.engine.config import EngineConfig, SamplingParams
from k2sys.engine.engine import NativeEngine
from k2sys.models import build_model, preset, save_hf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import env_info, result, write_json  # noqa: E402

PROMPT_LEN, NEW_TOKENS = 32, 128
TARGETS = {1: 1.0, 32: 2.0, 128: 2.0}


def _hf_model(path: Path):
    from transformers import DeepseekV3ForCausalLM

    m = DeepseekV3ForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    m.generation_config.eos_token_id = None  # always generate exactly NEW_TOKENS, as the engine does
    m.generation_config.pad_token_id = 0
    return m


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_model(name: str, batches: list[int], n_samples: int, repeats: int, threads: int,
                out: list[dict]) -> None:
    cfg = preset(name)
    torch.manual_seed(0)
    model = build_model(cfg, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_hf(model, Path(tmp) / name)
        hf = _hf_model(path)
        engine = NativeEngine.from_pretrained(path, EngineConfig(max_total_tokens=262144, max_num_batched_tokens=4096,
                                                                 cpu_threads=threads))
    try:
        cases = [(b, 1) for b in batches] + ([(128 // n_samples, n_samples)] if n_samples > 1 else [])
        for b, n in cases:
            prompts = torch.randint(2, cfg.vocab_size, (b, PROMPT_LEN))
            greedy = n == 1
            params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0 if greedy else 1.0, n=n,
                                    ignore_eos=True, sampling_seed=1)
            rows = prompts.tolist()

            def native(new: int = NEW_TOKENS) -> None:
                outs = engine.generate_sglang(rows, dataclasses.replace(params, max_new_tokens=new))
                assert sum(len(o["output_ids"]) for o in outs) == b * n * new

            def reference(new: int = NEW_TOKENS) -> None:
                with torch.inference_mode():
                    g = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                                    min_new_tokens=new, do_sample=not greedy, num_return_sequences=n,
                                    top_k=None, top_p=None, temperature=1.0 if not greedy else None)
                assert g.shape == (b * n, PROMPT_LEN + new)

            native(8)  # warm up both (first-call allocations, lazy init, oneDNN primitive caches)
            reference(8)
            t_nat, t_ref = _time(native, repeats), _time(reference, repeats)
            toks = b * n * NEW_TOKENS
            nat, ref = toks / t_nat, toks / t_ref
            label = f"{name} {b} prompts" + (f" x n={n}" if n > 1 else "")
            out.append(result(f"rollout tok/s native vs transformers: {label}", round(nat, 1), "new tok/s",
                              round(ref, 1), TARGETS.get(b, 2.0), ratio=round(nat / ref, 3)))
            print(f"{label:32s} native {nat:9.1f} tok/s  transformers {ref:9.1f} tok/s  "
                  f"ratio {nat / ref:5.2f}x  (target {TARGETS.get(b, 2.0)}x)", flush=True)
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True, help="write results here")
    ap.add_argument("--models", default="k2-tiny", help="comma-separated presets (k2-tiny, k2-small)")
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt for the n-sample case (1 = skip)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per case (best is kept)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of both sides (>= 1)")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)  # transformers runs on this thread; the engine sets its own
    load_before = os.getloadavg()
    results: list[dict] = []
    for name in args.models.split(","):
        bench_model(name.strip(), [int(b) for b in args.batches.split(",")], args.n, args.repeats, args.threads,
                    results)
    import transformers

    env = env_info(transformers=transformers.__version__, threads=args.threads, device="cpu",
                   prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS,
                   loadavg_1_5_15_before=[round(v, 2) for v in load_before],
                   loadavg_1_5_15_after=[round(v, 2) for v in os.getloadavg()])
    write_json(args.json, {"results": results, "env": env})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
