"""Megatron backend training throughput and offload/onload bandwidth.

  python benchmarks/bench_train.py --json OUT [--steps 3] [--repeats 5] [--threads N] [--no-tp2]

Figures (each against a peer or a bound measured in the same run, round by round; benchmarks/common.py):
  train tokens/s, k2-tiny / k2-small, TP=1   vs the reference model (k2sys.models, eager fwd+bwd+AdamW),
                                             same process, same --threads, rounds interleaved
  train tokens/s, k2-tiny, TP=2 on gloo      vs the TP=1 backend (2 ranks of 1 thread on the same cores; the
                                             TP=1 peer runs between the TP=2 launches, one pair per round)
  offload / onload GB/s of the trainer state vs a plain copy of the same bytes between the trainer's own
                                             host buffers and live storages, 1 thread and all cores (the
                                             system copies with the k2sys C++ pool, all cores)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import k2sys  # noqa: E402,F401  (before torch: its host-allocation settings, k2sys/__init__.py)
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (MIN_REPS, CopyBound, add_common_args, copy_bound_rows, env_info, interleaved,  # noqa: E402
                    paired_row, print_results, thread_counts, write_results)


def _batch(vocab: int, B: int, T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, vocab, (B, T + 1), generator=g)
    return {"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": torch.ones(B, T)}


def megatron_step(preset: str, B: int, T: int, steps: int, tp: int = 1):
    """A callable running `steps` Megatron train steps (warmed up once)."""
    from k2sys.models import build_model, preset as make
    from k2sys.trainer.backend import MegatronBackend
    from k2sys.trainer.parallel import ParallelConfig

    cfg = make(preset)
    be = MegatronBackend.from_model(build_model(cfg, seed=0), ParallelConfig(tp=tp))
    be.train_step(_batch(cfg.vocab_size, B, T, 0))  # warm-up (lazy init, compiled helpers)
    k = [0]

    def run() -> None:
        for _ in range(steps):
            k[0] += 1
            be.train_step(_batch(cfg.vocab_size, B, T, k[0]))
    return run


def reference_step(preset: str, B: int, T: int, steps: int):
    from k2sys.models import build_model, preset as make

    cfg = make(preset)
    model = build_model(cfg, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    k = [0]

    def step(s: int) -> None:
        b = _batch(cfg.vocab_size, B, T, s)
        logits = model(b["tokens"])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), b["labels"].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()

    step(0)

    def run() -> None:
        for _ in range(steps):
            k[0] += 1
            step(k[0])
    return run


def offload_rows(preset: str, repeats: int) -> list[dict]:
    """Offload and onload of the whole trainer state vs the copy bound on the same buffers."""
    from k2sys import ext
    from k2sys.models import build_model, preset as make
    from k2sys.trainer.backend import MegatronBackend

    cfg = make(preset)
    be = MegatronBackend.from_model(build_model(cfg, seed=0))
    be.train_step(_batch(cfg.vocab_size, 2, 32, 0))  # optimizer state exists
    be.offload()
    be.onload()  # warm: host buffers exist, and live storages hold the same bytes as they
    off = be._offloader  # the system's own buffers (read only; the bound copies host -> live, same values)
    live = [torch.empty(0, dtype=torch.uint8).set_(s) for s in off._storages]
    system_threads = ext.summary()["cpp_threads"] or 1
    with CopyBound(live, list(off._host), threads=thread_counts(system_threads),
                   where="the trainer's host buffers onto its live storages (what onload copies)") as cb:
        tm = interleaved({"offload": be.offload, "onload": be.onload, **cb.fns()}, repeats, rotate=False)
    rows = []
    for kind in ("offload", "onload"):
        rows += copy_bound_rows(f"{kind}_GBps/{preset}", tm[kind], cb, tm, system_threads=system_threads,
                                what=f"system: MegatronBackend.{kind}() wall time"
                                     + (" (re-allocates the storages: fresh pages)" if kind == "onload" else ""))
    return rows


def _tp2_child(out: str, preset: str, B: int, T: int, steps: int) -> None:
    import torch.distributed as dist

    run = megatron_step(preset, B, T, steps, tp=2)
    dist.barrier()
    t0 = time.perf_counter()
    run()
    dist.barrier()
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"seconds": time.perf_counter() - t0}))


def tp2_seconds(preset: str, B: int, T: int, steps: int) -> float | None:
    """Seconds of `steps` TP=2 steps (timed inside the 2-rank job, after its warm-up)."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "tp2.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--tp2-child", str(out), preset, str(B), str(T), str(steps)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        if p.returncode != 0:
            print(p.stderr[-2000:], file=sys.stderr)
            return None
        return json.loads(out.read_text())["seconds"]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--tp2-child":
        _tp2_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--steps", type=int, default=3, help="train steps per round")
    ap.add_argument("--repeats", type=int, default=MIN_REPS, help=f"interleaved rounds (>= {MIN_REPS})")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads of both training peers")
    ap.add_argument("--models", default="k2-tiny,k2-small")
    ap.add_argument("--no-tp2", action="store_true", help="skip the 2-rank gloo run")
    add_common_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = []
    shapes = {"k2-tiny": (4, 128), "k2-small": (2, 128)}
    peer_kw = dict(threads=args.threads, system_threads=args.threads, kind="peer", unit="tok/s", scale=1.0)
    tm1 = {}
    for preset in [m for m in args.models.split(",") if m]:
        B, T = shapes[preset]
        tm = interleaved({"megatron": megatron_step(preset, B, T, args.steps),
                          "reference": reference_step(preset, B, T, args.steps)}, args.repeats, warmup=0)
        tm1[preset] = tm
        results.append(paired_row(f"train_tokens_per_s/{preset}/tp1", tm["megatron"], tm["reference"],
                                  work=B * T * args.steps, bound="reference model (eager HF-layout, fwd+bwd+AdamW), "
                                  f"same process and threads, {args.steps} steps per round", **peer_kw))
    if not args.no_tp2 and "k2-tiny" in tm1:
        B, T = shapes["k2-tiny"]
        run1 = megatron_step("k2-tiny", B, T, args.steps)
        tp1, tp2 = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run1()
            tp1.append(time.perf_counter() - t0)
            v = tp2_seconds("k2-tiny", B, T, args.steps)
            if v is None:
                break
            tp2.append(v)
        if len(tp2) == len(tp1):
            results.append(paired_row("train_tokens_per_s/k2-tiny/tp2_gloo", tp2, tp1, work=B * T * args.steps,
                                      bound=f"TP=1 backend ({args.threads} thread) in this process, run between the "
                                            "TP=2 jobs (2 ranks x 1 thread share the same cores)", ranks=2,
                                      **{**peer_kw, "threads": args.threads, "system_threads": 2}))
    results += offload_rows("k2-small", args.repeats)
    env = env_info(steps=args.steps, shapes=shapes, repeats=args.repeats, threads=args.threads, note=args.note,
                   load_avg_before=load_before, load_avg_after=os.getloadavg())
    try:
        import megatron.core

        env["megatron_core"] = megatron.core.__version__
    except Exception:
        pass
    print_results(results, "# Megatron backend training throughput and offload/onload")
    write_results(args.json, results, env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
