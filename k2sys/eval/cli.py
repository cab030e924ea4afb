"""`k2sys eval` (python -m k2sys.eval.cli): run benchmark suites against a model, compare checkpoints.

    k2sys eval MODEL --suite gsm8k=data/gsm8k/test.jsonl --suite math:math500=data/math500.jsonl \\
        [--n 8 --temperature 0.7 --k 1 --k 8] [--limit 100] [--max-tokens 2048] --out runs/eval/ckpt-a
    k2sys eval compare runs/eval/base/results.json runs/eval/rl/results.json --out runs/eval/report.md
    k2sys eval adapters

MODEL is an OpenAI-compatible endpoint (http://host:port, /v1 optional: `k2sys serve`, SGLang, vLLM) or
a checkpoint directory, which is served with `k2sys serve` on a free port for the run (--serve-arg passes
flags to it, e.g. --serve-arg=--device=cuda).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="k2sys eval", description="Evaluate a model on benchmark suites "
                                "(avg@n, unbiased pass@k), or compare results files.")
    p.add_argument("model", help="http(s):// endpoint or checkpoint directory")
    p.add_argument("--suite", action="append", required=True, metavar="ADAPTER[:LABEL]=PATH",
                   help="benchmark file/folder per family (repeatable); adapters: gsm8k math ifeval humaneval "
                        "mbpp tau")
    p.add_argument("--out", required=True, help="output folder: results.json, samples.jsonl, serve.log")
    p.add_argument("--n", type=int, default=1, help="samples per task (default 1: greedy)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--k", type=int, action="append", help="pass@k to report (repeatable; default 1 and n)")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--limit", type=int, default=None, help="first N tasks of each family")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=1.0, help="reward at which a sample counts as correct")
    p.add_argument("--name", default=None, help="model name in the results (default: MODEL)")
    p.add_argument("--served-model", default=None, help="model id for the endpoint (default: first of /v1/models)")
    p.add_argument("--api-key-env", default=None, help="environment variable holding the endpoint's API key")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    p.add_argument("--sandbox-time-limit", type=float, default=10.0, help="seconds per program (humaneval, mbpp)")
    p.add_argument("--sandbox-memory-mb", type=int, default=1024)
    p.add_argument("--serve-arg", action="append", default=[], help="flag for `k2sys serve` (checkpoint MODEL)")
    p.add_argument("--serve-timeout", type=float, default=900.0)
    return p


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="k2sys eval compare", description="One report comparing results files; "
                                "the first is the baseline.")
    p.add_argument("results", nargs="+", help="results.json files (or folders holding one)")
    p.add_argument("--out", required=True, help="report .md path (the PNG goes next to it)")
    p.add_argument("--names", nargs="+", default=None, help="a name per results file")
    p.add_argument("--no-png", action="store_true")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    return p


def _run(args: argparse.Namespace) -> int:
    from k2sys.eval.generators import OpenAIChatGenerator, served_checkpoint
    from k2sys.eval.suite import SamplingConfig, parse_suite_arg, run_suite

    entries = [parse_suite_arg(s) for s in args.suite]
    for e in entries:
        e.limit = args.limit
    ks = tuple(sorted(set(args.k or [1, args.n])))
    cfg = SamplingConfig(n=args.n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                         seed=args.seed, ks=ks, threshold=args.threshold, concurrency=args.concurrency)
    cfg.validate()
    options = {a: {"time_limit_s": args.sandbox_time_limit, "memory_limit_mb": args.sandbox_memory_mb}
               for a in ("humaneval", "mbpp")}
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not api_key:
        raise ValueError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    out = Path(args.out)

    def log(msg: str) -> None:
        print(f"[eval] {msg}", file=sys.stderr, flush=True)

    def go(url: str) -> dict:
        gen = OpenAIChatGenerator(url, model=args.served_model, api_key=api_key, concurrency=args.concurrency)
        try:
            return run_suite(gen, entries, cfg, model=args.name or args.model, out_dir=out,
                             adapter_options=options, log=log)
        finally:
            gen.close()

    if args.model.startswith(("http://", "https://")):
        res = go(args.model)
    else:
        with served_checkpoint(args.model, log_path=out / "serve.log", extra_args=args.serve_arg,
                               timeout_s=args.serve_timeout) as url:
            res = go(url)
    width = max(len("overall/macro"), *(len(f) for f in res["families"])) + 2
    for fam, r in res["families"].items():
        print(f"{fam:{width}s}" + "  ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items()))
    for kind in ("micro", "macro"):
        print(f"{'overall/' + kind:{width}s}" + "  ".join(f"{k}={v:.4f}" for k, v in res["overall"][kind].items()))
    print(f"results: {out / 'results.json'}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from k2sys.eval.compare import write_report
    from k2sys.eval.suite import load_results

    paths = [Path(p) / "results.json" if Path(p).is_dir() else Path(p) for p in args.results]
    results = [load_results(p) for p in paths]
    if args.names and len(args.names) != len(results):
        raise ValueError(f"--names: {len(args.names)} names for {len(results)} results files")
    cmp = write_report(results, args.out, names=args.names, png=None if args.no_png else "auto",
                       resamples=args.resamples, seed=args.seed)
    print(f"report: {args.out}" + (f"\nplot: {cmp['png']}" if cmp.get("png") else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    from k2sys.engine.launch import LaunchError
    from k2sys.rewards.sandbox import SandboxUnavailable

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "compare":
            return _compare(compare_parser().parse_args(argv[1:]))
        if argv and argv[0] == "adapters":
            from k2sys.eval.adapters import ADAPTERS

            for name, cls in ADAPTERS.items():
                print(f"{name:10s} {'episodes' if cls.episodic else 'text'}")
            return 0
        return _run(build_parser().parse_args(argv))
    except (ValueError, KeyError, FileNotFoundError, ConnectionError, SandboxUnavailable, LaunchError) as e:
        print(f"k2sys eval: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
