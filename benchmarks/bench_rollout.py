"""Rollout throughput: the native engine vs transformers `generate`, same model, same run.

For each model (k2-tiny, optionally k2-small) and batch (1, 32, 128 prompts x 32 prompt tokens,
128 new tokens, greedy; plus n=8 sampled continuations per prompt) it measures generated tokens
per second of both and reports native / transformers (higher = better). Targets (issue 4):
>= 2x at 32 and 128 prompts, >= 1x at 1 prompt.

Rule (benchmarks/common.py): the three runs of a case (engine with prefix cache on, engine with
prefix cache off, transformers) are interleaved round by round, >= 5 rounds, and each ratio is the
median of the per-round ratios with its spread. Warm-up uses other prompts than the timed runs,
and the cache-on engine is flushed (untimed) before every timed run, so no timed run takes prompt
tokens from a cache. n=8: the engine prefills each prompt once and forks 8 samples from it, while
transformers (num_return_sequences=8) prefills 8 copies: part of the n=8 ratio is that design.

Both sides run with the same intra-op thread count (--threads, default 1 = the engine's default
cpu_threads): a peer comparison at equal resources. On a shared box an oversubscribed
multi-threaded side collapses (OpenMP barriers wait on descheduled threads), so the load
average before and after the run is recorded in "env" to judge the figures.

    python benchmarks/bench_rollout.py --json OUT [--models k2-tiny,k2-small] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from k2sys.engine.core.config import EngineConfig, SamplingParams
from k2sys.engine.core.engine import NativeEngine
from k2sys.models import build_model, preset, save_hf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import MIN_REPS, add_common_args, env_info, interleaved, paired_row, print_results, write_results  # noqa: E402,E501

PROMPT_LEN, NEW_TOKENS = 32, 128
TARGETS = {1: 1.0, 32: 2.0, 128: 2.0}


def _hf_model(path: Path):
    from transformers import DeepseekV3ForCausalLM

    m = DeepseekV3ForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    m.generation_config.eos_token_id = None  # always generate exactly NEW_TOKENS, as the engine does
    m.generation_config.pad_token_id = 0
    return m


def bench_model(name: str, batches: list[int], n_samples: int, repeats: int, threads: int,
                out: list[dict]) -> None:
    cfg = preset(name)
    torch.manual_seed(0)
    model = build_model(cfg, seed=0)
    ecfg = dict(max_total_tokens=262144, max_num_batched_tokens=4096, cpu_threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_hf(model, Path(tmp) / name)
        hf = _hf_model(path)
        engines = {"cache": NativeEngine.from_pretrained(path, EngineConfig(**ecfg)),
                   "nocache": NativeEngine.from_pretrained(path, EngineConfig(**ecfg, enable_prefix_caching=False))}
    g = torch.Generator().manual_seed(0)
    try:
        cases = [(b, 1) for b in batches] + ([(128 // n_samples, n_samples)] if n_samples > 1 else [])
        for b, n in cases:
            prompts = torch.randint(2, cfg.vocab_size, (b, PROMPT_LEN), generator=g)
            warm_prompts = torch.randint(2, cfg.vocab_size, (b, PROMPT_LEN), generator=g)  # never timed
            greedy = n == 1
            params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0 if greedy else 1.0, n=n,
                                    ignore_eos=True, sampling_seed=1)

            def native(engine, ids: torch.Tensor, new: int = NEW_TOKENS):
                rows = ids.tolist()

                def run() -> None:
                    outs = engine.generate_sglang(rows, params.replace(max_new_tokens=new))
                    assert sum(len(o["output_ids"]) for o in outs) == b * n * new
                return run

            def reference(ids: torch.Tensor, new: int = NEW_TOKENS):
                def run() -> None:
                    with torch.inference_mode():
                        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                          min_new_tokens=new, do_sample=not greedy, num_return_sequences=n,
                                          top_k=None, top_p=None, temperature=1.0 if not greedy else None)
                    assert out.shape == (b * n, PROMPT_LEN + new)
                return run

            # warm-up on other prompts (first-call allocations, lazy init, oneDNN primitive caches)
            for e in engines.values():
                native(e, warm_prompts, 8)()
            reference(warm_prompts, 8)()
            tm = interleaved({"native_cache": native(engines["cache"], prompts),
                              "native_nocache": native(engines["nocache"], prompts),
                              "transformers": reference(prompts)}, repeats, warmup=0,
                             before={"native_cache": engines["cache"].flush_cache})
            toks = b * n * NEW_TOKENS
            label = f"{name} {b} prompts" + (f" x n={n}" if n > 1 else "")
            note = ("the engine prefills each prompt once and forks n samples; transformers prefills n copies"
                    if n > 1 else None)
            for key, what in (("native_cache", "prefix cache on, flushed before each run"),
                              ("native_nocache", "prefix cache off")):
                row = paired_row(f"rollout tok/s native ({what.split(',')[0]}) vs transformers: {label}", tm[key],
                                 tm["transformers"], kind="peer", work=toks, unit="new tok/s", scale=1.0, digits=1,
                                 target=TARGETS.get(b, 2.0), threads=threads, system_threads=threads,
                                 bound=f"transformers generate, same weights, prompts and threads ({what} on the "
                                       "engine side; warm-up on other prompts)",
                                 **({"note": note} if note else {}))
                out.append(row)
                print(f"{label:26s} native[{key:14s}] {row['value']:9.1f} tok/s  transformers {row['baseline']:9.1f} "
                      f"tok/s  ratio {row['ratio']:5.2f}x [{row['spread']['min']:.2f}..{row['spread']['max']:.2f}] "
                      f"(target {row['target']}x)", flush=True)
    finally:
        for e in engines.values():
            e.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True, help="write results here")
    ap.add_argument("--models", default="k2-tiny", help="comma-separated presets (k2-tiny, k2-small)")
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt for the n-sample case (1 = skip)")
    ap.add_argument("--repeats", type=int, default=MIN_REPS, help=f"interleaved rounds per case (>= {MIN_REPS})")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of both sides (>= 1)")
    add_common_args(ap)
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
                   prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS, repeats=args.repeats, note=args.note,
                   loadavg_1_5_15_before=[round(v, 2) for v in load_before],
                   loadavg_1_5_15_after=[round(v, 2) for v in os.getloadavg()])
    print_results(results, "# rollout: native engine vs transformers generate")
    write_results(args.json, results, env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
