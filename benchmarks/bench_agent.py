"""Multi-turn agentic rollouts: concurrent episodes vs one episode at a time, same engine, same run.

The token-level agent loop (k2sys.envs.agent_loop) runs every episode as its own coroutine, so
the engine batches the turns of many episodes (continuous batching) while environments step
between turns; each turn re-sends the whole conversation, which the engine's prefix cache serves
from the KV of the previous turns. Rows (same weights, greedy, same specs, so same tokens):
  concurrent_vs_serial       all episodes at once vs one after another (prefix cache on)
  prefix_cache_vs_none       all episodes at once, prefix cache on vs off
The figure is policy tokens per second (env tokens excluded).

  python benchmarks/bench_agent.py --json benchmarks/results/bench_agent_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import env_info, print_results, result, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from k2sys.engine.config import EngineConfig
    from k2sys.engine.engine import NativeEngine
    from k2sys.envs import tool_use_specs
    from k2sys.envs.agent_loop import AgentConfig, new_episode_group, run_episodes
    from k2sys.models import build_model, k2_tiny, save_hf
    from k2sys.tasks.format import stop_token_ids
    from k2sys.tokenizer import default_corpus, load_tokenizer, train_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--episodes", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--turn-tokens", type=int, default=24, help="tokens per assistant turn (cap)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", help="an HF checkpoint with its tokenizer, e.g. runs/tiny-k2-agent/sft_hf (a model "
                    "that calls tools plays several turns); default: random k2-tiny weights")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as d:
        if args.model:
            from k2sys.models import load_config

            ckpt, tok = Path(args.model), load_tokenizer(args.model)
            cfg = load_config(ckpt)
        else:
            tok = load_tokenizer(train_tokenizer(default_corpus(n=1500), 2048, Path(d) / "tok"))
            cfg = k2_tiny(vocab_size=tok.get_vocab_size())
            ckpt = save_hf(build_model(cfg, seed=0), Path(d) / "m")
        acfg = AgentConfig(max_turn_tokens=args.turn_tokens, max_episode_tokens=cfg.max_position_embeddings)
        stops = stop_token_ids(tok)

        def run_with(eng, n: int, concurrent: bool) -> tuple[float, int, int]:
            trajs = [new_episode_group(s, i, 1, tok, seed=i)[0] for i, s in enumerate(tool_use_specs(n, seed=0))]
            t0 = time.perf_counter()
            for batch in ([trajs] if concurrent else [[t] for t in trajs]):
                asyncio.run(run_episodes(eng, tok, batch, version=0, temperature=0.0, top_p=1.0, cfg=acfg,
                                         stop_ids=stops, seed=0))
            dt = time.perf_counter() - t0
            return dt, sum(sum(t.meta["response_mask"]) for t in trajs), sum(len(t.meta["actions"]) for t in trajs)

        # the peer for the prefix cache: the same engine without it, same episodes, same run
        with NativeEngine.from_pretrained(ckpt, EngineConfig(max_total_tokens=1 << 17, cpu_threads=args.threads,
                                                             enable_prefix_caching=False)) as nocache:
            run_with(nocache, 2, True)
            peer = {n: run_with(nocache, n, True) for n in args.episodes}
        with NativeEngine.from_pretrained(ckpt, EngineConfig(max_total_tokens=1 << 17, cpu_threads=args.threads)) as eng:

            def play(n: int, concurrent: bool) -> tuple[float, int, int]:
                eng.flush_cache()  # every measurement starts cold
                return run_with(eng, n, concurrent)

            play(2, True)  # warm-up
            for n in args.episodes:
                t_seq, tok_seq, turns = play(n, False)
                t_con, tok_con, _ = play(n, True)
                assert tok_con == tok_seq, "greedy episodes must produce the same tokens either way"
                results.append(result(f"agent_rollout_{n}_tool_use_episodes_concurrent_vs_serial", tok_con / t_con,
                                      "policy tok/s", tok_seq / t_seq, turns=turns, policy_tokens=tok_con,
                                      serial_s=t_seq, concurrent_s=t_con))
                t_nc, tok_nc, _ = peer[n]
                assert tok_nc == tok_con, "the prefix cache must not change greedy episodes"
                results.append(result(f"agent_rollout_{n}_tool_use_episodes_prefix_cache_vs_none", tok_con / t_con,
                                      "policy tok/s", tok_nc / t_nc, turns=turns, no_cache_s=t_nc, cache_s=t_con))
    print_results(results, "# multi-turn agent rollouts (k2-tiny, native engine)")
    write_json(args.json, {"results": results, "env": env_info(threads=args.threads, turn_tokens=args.turn_tokens,
                                                               model=args.model or "random k2-tiny")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
