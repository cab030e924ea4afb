"""Multi-turn agentic rollouts: concurrent episodes vs one episode at a time, same engine, same run.

The token-level agent loop (k2sys.envs.agent_loop) runs every episode as its own coroutine, so
the engine batches the turns of many episodes (continuous batching) while environments step
between turns; each turn re-sends the whole conversation, which the engine's prefix cache serves
from the KV of the previous turns. Rows (same weights, greedy, same specs, so same tokens):
  concurrent_vs_serial       all episodes at once vs one after another (prefix cache on)
  prefix_cache_vs_none       all episodes at once, prefix cache on vs off
The figure is policy tokens per second (env tokens excluded). The three runs are interleaved
round by round (>= 5 rounds; benchmarks/common.py), each starting from a flushed cache.

The model must call tools, or there is nothing multi-turn to measure: by default the SFT checkpoint
of the tiny-k2-agent recipe, built in this checkout by

  python -m k2sys.cli sft tiny-k2-agent              # -> runs/tiny-k2-agent/sft_hf

(or let the benchmark run that command: --build). `--model random` takes random k2-tiny weights
(no tool turns: the rows then say so and are diagnostics).

  python benchmarks/bench_agent.py --json benchmarks/results/bench_agent_cpu.json [--build]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (MIN_REPS, add_common_args, diagnostic, env_info, interleaved, paired_row,  # noqa: E402
                    print_results, write_results)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "runs" / "tiny-k2-agent" / "sft_hf"
BUILD_CMD = [sys.executable, "-m", "k2sys.cli", "sft", "tiny-k2-agent", "--set", f"output_root={ROOT / 'runs'}"]


def resolve_model(arg: str | None, build: bool) -> Path | None:
    """The checkpoint to play (None: random weights), building the default one when asked."""
    if arg == "random":
        return None
    path = Path(arg) if arg else DEFAULT_MODEL
    if (path / "config.json").is_file():
        return path
    if arg is None and build:
        print(f"building the agent checkpoint: {' '.join(BUILD_CMD)}", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        subprocess.run(BUILD_CMD, check=True, cwd=ROOT, env=env)
        if (path / "config.json").is_file():
            return path
    raise SystemExit(f"bench_agent: no HF checkpoint at {path}. A model that calls tools is needed; build the "
                     f"recipe's SFT checkpoint first with\n  python -m k2sys.cli sft tiny-k2-agent\n(from {ROOT}; "
                     "writes runs/tiny-k2-agent/sft_hf), or rerun with --build to let this script run it, or pass "
                     "--model DIR (an HF checkpoint with its tokenizer), or --model random (no tool turns).")


def main(argv: list[str] | None = None) -> int:
    from k2sys.engine.core.config import EngineConfig
    from k2sys.engine.core.engine import NativeEngine
    from k2sys.envs import tool_use_specs
    from k2sys.envs.agent_loop import AgentConfig, new_episode_group, run_episodes
    from k2sys.models import build_model, k2_tiny, load_config, save_hf
    from k2sys.tasks.format import stop_token_ids
    from k2sys.tokenizer import default_corpus, load_tokenizer, train_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--episodes", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--turn-tokens", type=int, default=96, help="tokens per assistant turn (cap; the recipe's 96)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=MIN_REPS, help=f"interleaved rounds (>= {MIN_REPS})")
    ap.add_argument("--model", default=None, help=f"HF checkpoint with its tokenizer (default {DEFAULT_MODEL}); "
                    "'random' for random k2-tiny weights")
    ap.add_argument("--build", action="store_true", help="run the tiny-k2-agent SFT first if the default "
                    "checkpoint is missing")
    add_common_args(ap)
    args = ap.parse_args(argv)
    ckpt = resolve_model(args.model, args.build)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as d:
        if ckpt is not None:
            tok = load_tokenizer(str(ckpt))
            cfg = load_config(ckpt)
        else:
            tok = load_tokenizer(train_tokenizer(default_corpus(n=1500), 2048, Path(d) / "tok"))
            cfg = k2_tiny(vocab_size=tok.get_vocab_size())
            ckpt = save_hf(build_model(cfg, seed=0), Path(d) / "m")
            args.model = "random"
        acfg = AgentConfig(max_turn_tokens=args.turn_tokens, max_episode_tokens=cfg.max_position_embeddings)
        stops = stop_token_ids(tok)
        last: dict[str, tuple[int, int]] = {}

        def episodes(eng, n: int, concurrent: bool, key: str):
            def run() -> None:
                trajs = [new_episode_group(s, i, 1, tok, seed=i)[0] for i, s in enumerate(tool_use_specs(n, seed=0))]
                for batch in ([trajs] if concurrent else [[t] for t in trajs]):
                    asyncio.run(run_episodes(eng, tok, batch, version=0, temperature=0.0, top_p=1.0, cfg=acfg,
                                             stop_ids=stops, seed=0))
                last[key] = (sum(sum(t.meta["response_mask"]) for t in trajs),
                             sum(len(t.meta["actions"]) for t in trajs))
            return run

        ecfg = dict(max_total_tokens=1 << 17, cpu_threads=args.threads)
        with NativeEngine.from_pretrained(ckpt, EngineConfig(**ecfg)) as eng, \
                NativeEngine.from_pretrained(ckpt, EngineConfig(**ecfg, enable_prefix_caching=False)) as nocache:
            episodes(eng, 2, True, "warm")()  # warm-up (other episodes than the timed ones)
            episodes(nocache, 2, True, "warm")()
            for n in args.episodes:
                tm = interleaved({"serial": episodes(eng, n, False, "serial"),
                                  "concurrent": episodes(eng, n, True, "concurrent"),
                                  "nocache": episodes(nocache, n, True, "nocache")}, args.repeats, warmup=0,
                                 before={"serial": eng.flush_cache, "concurrent": eng.flush_cache})
                (toks, turns), (toks_s, _), (toks_nc, _) = last["concurrent"], last["serial"], last["nocache"]
                assert toks == toks_s, "greedy episodes must produce the same tokens either way"
                assert toks == toks_nc, "the prefix cache must not change greedy episodes"
                tool_turns = turns - n
                common = dict(kind="peer", work=toks, unit="policy tok/s", scale=1.0, digits=1, threads=args.threads,
                              system_threads=args.threads, turns=turns, tool_turns=tool_turns, episodes=n,
                              policy_tokens=toks)
                if tool_turns <= 0:
                    results.append(diagnostic(f"agent_rollout_{n}_tool_use_episodes", 0, "tool turns",
                                              "the model called no tool: nothing multi-turn to measure (use the "
                                              "tiny-k2-agent SFT checkpoint)", episodes=n, turns=turns))
                    continue
                results.append(paired_row(f"agent_rollout_{n}_tool_use_episodes_concurrent_vs_serial", tm["concurrent"],
                                          tm["serial"], bound="the same episodes one after another, same engine "
                                          "(prefix cache on, flushed before each run)", **common))
                results.append(paired_row(f"agent_rollout_{n}_tool_use_episodes_prefix_cache_vs_none", tm["concurrent"],
                                          tm["nocache"], bound="the same concurrent episodes on an engine without "
                                          "prefix cache (same weights, threads)", **common))
    print_results(results, f"# multi-turn agent rollouts ({args.model or DEFAULT_MODEL}, native engine)")
    env = env_info(threads=args.threads, turn_tokens=args.turn_tokens, repeats=args.repeats, note=args.note,
                   model=str(args.model or DEFAULT_MODEL.relative_to(ROOT)),
                   model_built_by=" ".join(["python", "-m", "k2sys.cli", "sft", "tiny-k2-agent"])
                   if args.model is None else None, load_avg_before=load_before, load_avg_after=os.getloadavg())
    write_results(args.json, results, env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
