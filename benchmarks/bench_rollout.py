"""Rollout throughput: the native engine vs transformers `generate`, same model, same run.

For each model (k2-tiny, optionally k2-small) and batch (1, 32, 128 prompts x 32 prompt tokens,
128 new tokens, greedy; plus n=8 sampled continuations per prompt) it measures generated tokens
per second of both and reports native / transformers (higher = better). Targets (issue 4):
>= 2x at 32 and 128 prompts, >= 1x at 1 prompt.

    python benchmarks/bench_rollout.py --json OUT [--models k2-tiny,k2-small] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from k2sys.engine.config import EngineConfig, SamplingParams
from k2sys.engine.engine import NativeEngine
from k2sys.models import build_model, preset, save_hf

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


def bench_model(name: str, batches: list[int], n_samples: int, repeats: int, out: list[dict]) -> None:
    cfg = preset(name)
    torch.manual_seed(0)
    model = build_model(cfg, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_hf(model, Path(tmp) / name)
        hf = _hf_model(path)
        engine = NativeEngine.from_pretrained(path, EngineConfig(max_total_tokens=262144, max_num_batched_tokens=4096))
    try:
        cases = [(b, 1) for b in batches] + ([(128 // n_samples, n_samples)] if n_samples > 1 else [])
        for b, n in cases:
            prompts = torch.randint(2, cfg.vocab_size, (b, PROMPT_LEN))
            greedy = n == 1
            params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0 if greedy else 1.0, n=n,
                                    ignore_eos=True, sampling_seed=1)
            rows = prompts.tolist()

            def native() -> None:
                outs = engine.generate_sglang(rows, params)
                assert sum(len(o["output_ids"]) for o in outs) == b * n * NEW_TOKENS

            def reference() -> None:
                with torch.inference_mode():
                    g = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=NEW_TOKENS,
                                    min_new_tokens=NEW_TOKENS, do_sample=not greedy, num_return_sequences=n,
                                    top_k=None, top_p=None, temperature=1.0 if not greedy else None)
                assert g.shape == (b * n, PROMPT_LEN + NEW_TOKENS)

            native()  # warm up both (first-call allocations, lazy init)
            reference()
            t_nat, t_ref = _time(native, repeats), _time(reference, repeats)
            toks = b * n * NEW_TOKENS
            nat, ref = toks / t_nat, toks / t_ref
            label = f"{name} {b} prompts" + (f" x n={n}" if n > 1 else "")
            out.append({"name": f"rollout tok/s native vs transformers: {label}", "value": round(nat, 1),
                        "unit": "new tok/s", "baseline": round(ref, 1), "ratio": round(nat / ref, 3),
                        "target": TARGETS.get(b, 2.0)})
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
    args = ap.parse_args(argv)
    results: list[dict] = []
    for name in args.models.split(","):
        bench_model(name.strip(), [int(b) for b in args.batches.split(",")], args.n, args.repeats, results)
    import transformers

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
           "device": "cpu", "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"results": results, "env": env}, indent=2) + "\n")
    os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
