"""Megatron backend training throughput and offload/onload bandwidth.

  python benchmarks/bench_train.py --json OUT [--steps 3] [--no-tp2]

Figures (each a ratio against a peer measured in the same run):
  train tokens/s, k2-tiny / k2-small, TP=1   vs the reference model (k2sys.models, eager fwd+bwd+AdamW)
  train tokens/s, k2-tiny, TP=2 on gloo      vs the TP=1 backend (2 ranks on the same cores)
  offload / onload GB/s of the trainer state vs a plain torch copy_ of the same bytes into touched memory
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

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import env_info, print_results, result, write_json  # noqa: E402


def _batch(vocab: int, B: int, T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, vocab, (B, T + 1), generator=g)
    return {"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": torch.ones(B, T)}


def megatron_tps(preset: str, B: int, T: int, steps: int, tp: int = 1) -> float:
    from k2sys.models import build_model, preset as make
    from k2sys.trainer.backend import MegatronBackend
    from k2sys.trainer.parallel import ParallelConfig

    cfg = make(preset)
    be = MegatronBackend.from_model(build_model(cfg, seed=0), ParallelConfig(tp=tp))
    be.train_step(_batch(cfg.vocab_size, B, T, 0))  # warm-up (lazy init, compiled helpers)
    t0 = time.perf_counter()
    for s in range(steps):
        be.train_step(_batch(cfg.vocab_size, B, T, s + 1))
    return B * T * steps / (time.perf_counter() - t0)


def reference_tps(preset: str, B: int, T: int, steps: int) -> float:
    from k2sys.models import build_model, preset as make

    cfg = make(preset)
    model = build_model(cfg, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(s: int) -> None:
        b = _batch(cfg.vocab_size, B, T, s)
        logits = model(b["tokens"])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), b["labels"].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()

    step(0)
    t0 = time.perf_counter()
    for s in range(steps):
        step(s + 1)
    return B * T * steps / (time.perf_counter() - t0)


def offload_figures(preset: str, reps: int = 3) -> dict[str, float]:
    from k2sys.models import build_model, preset as make
    from k2sys.trainer.backend import MegatronBackend

    cfg = make(preset)
    be = MegatronBackend.from_model(build_model(cfg, seed=0))
    be.train_step(_batch(cfg.vocab_size, 2, 32, 0))  # optimizer state exists
    off, on = [], []
    for _ in range(reps):
        o = be.offload()
        i = be.onload()
        off.append(o["GBps"])
        on.append(i["GBps"])
    nbytes = int(o["bytes"])
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8).fill_(0)
    plain = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        plain.append(nbytes / (time.perf_counter() - t0) / 1e9)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"bytes": nbytes, "offload": med(off), "onload": med(on), "plain": med(plain)}


def _tp2_child(out: str, preset: str, B: int, T: int, steps: int) -> None:
    import torch.distributed as dist

    tps = megatron_tps(preset, B, T, steps, tp=2)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"tps": tps}))


def tp2_tps(preset: str, B: int, T: int, steps: int) -> float | None:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "tp2.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--tp2-child", str(out), preset, str(B), str(T), str(steps)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        if p.returncode != 0:
            print(p.stderr[-2000:], file=sys.stderr)
            return None
        return json.loads(out.read_text())["tps"]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--tp2-child":
        _tp2_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-tp2", action="store_true", help="skip the 2-rank gloo run")
    args = ap.parse_args()
    results = []
    shapes = {"k2-tiny": (4, 128), "k2-small": (2, 128)}
    tps1 = {}
    for preset, (B, T) in shapes.items():
        ref = reference_tps(preset, B, T, args.steps)
        tps1[preset] = megatron_tps(preset, B, T, args.steps)
        results.append(result(f"train_tokens_per_s/{preset}/tp1", tps1[preset], "tok/s", ref,
                              baseline_is="reference model (eager HF-layout, fwd+bwd+AdamW) in this run"))
    if not args.no_tp2:
        B, T = shapes["k2-tiny"]
        v = tp2_tps("k2-tiny", B, T, args.steps)
        if v is not None:
            results.append(result("train_tokens_per_s/k2-tiny/tp2_gloo", v, "tok/s", tps1["k2-tiny"],
                                  baseline_is="TP=1 backend in this run (2 ranks share the same CPU cores)"))
    off = offload_figures("k2-small")
    for kind in ("offload", "onload"):
        results.append(result(f"{kind}_GBps/k2-small", off[kind], "GB/s", off["plain"],
                              baseline_is=f"plain torch copy_ of the same {off['bytes'] / 1e6:.0f} MB into touched memory"))
    env = env_info(steps=args.steps, shapes=shapes)
    try:
        import megatron.core

        env["megatron_core"] = megatron.core.__version__
    except Exception:
        pass
    print_results(results, "# Megatron backend training throughput and offload/onload")
    if args.json:
        write_json(args.json, {"results": results, "env": env})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
