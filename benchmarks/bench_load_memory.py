"""Peak host memory per trainer rank while loading an HF checkpoint (issue 11).

Each of 2 torchrun ranks builds MegatronBackend.from_hf(ckpt, tp=2): it reads only the slices it
owns (positioned reads, FP8 dequantized straight into the parameters). Measured per rank: the
RSS before the model is built, the peak RSS while loading (VmHWM reset just before the load), and
the rank's share (its parameters and buffers). The peer, measured in the same run on the same
checkpoint and ranks, is the read-everything path (the full HF state dict in RAM, then sliced).

  value    = loading footprint = peak RSS during load - RSS before the model (median over runs)
  baseline = 1.3 x share (the bound the issue sets, before a fixed overhead)
  ratio    = baseline / value (>= 1: within 1.3x of the share; target 1.0)
A second row per rank compares with the full-read peer (ratio = its footprint / ours). Sliced and
full runs alternate (--repeats pairs, >= 5; benchmarks/common.py); ratios are medians of the
per-pair ratios with their spread. Each run is its own 2-rank torchrun job (1 thread per rank).

  python benchmarks/bench_load_memory.py --json OUT [--preset k2-small] [--format fp8-block128|native] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def worker(ckpt: str, out: str, mode: str) -> None:
    import torch.distributed as dist

    from k2sys.models.hf_io import load_state_dict
    from k2sys.trainer.backend import MegatronBackend, TrainerConfig, _proc_status_bytes
    from k2sys.trainer.parallel import ParallelConfig

    train = TrainerConfig(dtype="float32")
    par = ParallelConfig(tp=2)
    if mode == "sliced":
        be = MegatronBackend.from_hf(ckpt, par, train)
        stats = dict(be.load_stats)
    else:  # the peer: every rank reads the whole checkpoint, then takes its slices
        from k2sys.models.checkpoint import HFCheckpoint
        from k2sys.trainer.backend import _reset_peak_rss

        before = _proc_status_bytes("VmRSS")
        _reset_peak_rss()
        cfg = HFCheckpoint(ckpt).config
        be = MegatronBackend(cfg, par, train, hf_state=load_state_dict(ckpt, "float32"))
        stats = {"rss_before_model": before, "rss_peak_load": _proc_status_bytes("VmHWM"),
                 "share_bytes": be.load_stats["share_bytes"]}
    rank = dist.get_rank()
    Path(f"{out}.{mode}.{rank}").write_text(json.dumps(stats))
    dist.barrier()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--preset", default="k2-small")
    p.add_argument("--format", default="fp8-block128", choices=["native", "bf16", "fp8-block128"])
    p.add_argument("--worker", nargs=3, metavar=("CKPT", "OUT", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=5, help="sliced/full pairs (>= 5)")
    p.add_argument("--note", default=None, help="free text recorded in env['note']")
    args = p.parse_args()
    if args.worker:
        return worker(*args.worker)

    from common import env_info, print_results, result, summarize, write_results

    from k2sys.models import build_model, preset, save_hf

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        model = build_model(preset(args.preset), seed=0)
        save_hf(model, ckpt, format=args.format, max_shard_bytes=64 << 20)
        disk = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        del model
        runs: dict[tuple[str, int], list[dict]] = {}
        for i in range(args.repeats):  # interleaved pairs, the order alternating
            for mode in (("sliced", "full") if i % 2 == 0 else ("full", "sliced")):
                out = Path(tmp) / "stats"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       str(Path(__file__).resolve()), "--json", "-", "--worker", str(ckpt), str(out), mode]
                env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
                subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
                for r in range(2):
                    s = json.loads(Path(f"{out}.{mode}.{r}").read_text())
                    runs.setdefault((mode, r), []).append({**s, "footprint": s["rss_peak_load"] - s["rss_before_model"]})
    results = []
    MiB = 2**20
    for r in range(2):
        ours, full = runs[("sliced", r)], runs[("full", r)]
        share = ours[0]["share_bytes"]
        foot = [o["footprint"] for o in ours]
        ffoot = [f["footprint"] for f in full]
        sp = summarize([1.3 * share / f for f in foot])
        fs = summarize(foot)
        common = dict(kind="bound", threads=1, system_threads=1, reps=len(foot), ranks=2, share_mib=share / MiB,
                      footprint_mib=summarize([f / MiB for f in foot]))
        results.append(result(f"load footprint tp2 rank{r} ({args.preset}, {args.format})", fs["median"] / MiB, "MiB",
                              1.3 * share / MiB, target=1.0, ratio=sp["median"],
                              bound="1.3 x the rank's share (params + buffers), the issue's bound",
                              spread={k: sp[k] for k in ("min", "q1", "q3", "max")},
                              overhead_mib=(fs["median"] - share) / MiB, **common))
        pr = summarize([f / o for f, o in zip(ffoot, foot)])
        results.append(result(f"load footprint tp2 rank{r} ({args.preset}, {args.format}) vs full read",
                              fs["median"] / MiB, "MiB", summarize(ffoot)["median"] / MiB, ratio=pr["median"],
                              bound="the read-everything peer (full HF state dict, then sliced), same checkpoint and "
                                    "ranks, runs alternating", spread={k: pr[k] for k in ("min", "q1", "q3", "max")},
                              **{**common, "kind": "peer"}))
    print_results(results, f"checkpoint load, peak host memory per rank ({disk / 2**20:.0f} MiB on disk)")
    write_results(args.json, results, env_info(preset=args.preset, format=args.format, checkpoint_bytes=disk,
                                               repeats=args.repeats, note=args.note))


if __name__ == "__main__":
    main()
