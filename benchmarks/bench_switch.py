"""Switch latency between training and rollout, per stage, against the copy bound.

  python benchmarks/bench_switch.py --json OUT [--sizes 1,2,4] [--models k2-tiny,k2-small]

One colocated switch, as the coordinator runs it (k2sys.coordinator.state):
  rollout -> train:  engine.release(kv_cache, weights) -> trainer.onload
  train -> rollout:  trainer.offload -> engine.resume(weights) -> checkpoint-engine update -> engine.resume(kv_cache)
Cases: k2-tiny / k2-small (Megatron backend with AdamW state + the native engine, in one process) and
synthetic trainer states of 1-4 GiB (params + grads + Adam m, v; the engine holds the params).
Copy bound = bytes moved by onload + offload + update at the bandwidth of a plain copy of the same
bytes measured in this run (torch copy_ into a touched buffer on CPU; pinned H2D on GPU).
Figure: copy-bound time / whole switch time (target >= 0.67, i.e. within 1.5x of the bound).
On CPU the onload lands in pages the engine just freed, so a second, fault-aware bound prices the
onload at a copy into fresh memory (measured here too); both ratios are reported.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import Table, env_info, write_json  # noqa: E402

TARGET = 0.67


def plain_copy_gbps(nbytes: int, repeats: int = 3) -> float:
    """Best-of-n bandwidth of one plain copy of `nbytes` into an already-touched buffer."""
    n = max(nbytes, 1 << 20)
    src = torch.ones(n, dtype=torch.uint8)
    if torch.cuda.is_available():
        src = src.pin_memory()
        dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    else:
        dst = torch.zeros(n, dtype=torch.uint8)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return n / best / 1e9


def fresh_copy_gbps(nbytes: int) -> float:
    """Bandwidth of one copy into freshly allocated (never touched) memory: what an onload into
    storage the engine just gave back costs on CPU, where the page faults dominate (FACTS.md)."""
    if torch.cuda.is_available():
        return plain_copy_gbps(nbytes)
    n = max(nbytes, 1 << 20)
    src = torch.ones(n, dtype=torch.uint8)
    best = float("inf")
    for _ in range(2):
        dst = torch.empty(n, dtype=torch.uint8)
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
        del dst
    return n / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def model_case(preset: str) -> dict:
    from k2sys.ckpt import update_weights
    from k2sys.ckpt.engine_sinks import NativeEngineSink
    from k2sys.ckpt.pipeline import TrainerShards
    from k2sys.engine.engine import NativeEngine
    from k2sys.models import build_model
    from k2sys.models import preset as make
    from k2sys.trainer.backend import MegatronBackend

    cfg = make(preset)
    ref = build_model(cfg, seed=0)
    trainer = MegatronBackend.from_model(ref)
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, cfg.vocab_size, (2, 17), generator=g)
    trainer.train_step({"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": torch.ones(2, 16)})  # Adam state
    engine = NativeEngine.from_model(ref)
    trainer.offload()  # start of a rollout: the engine owns the device
    st: dict[str, float] = {}
    moved = {}
    try:
        st["release_engine"] = _timed(lambda: engine.release_memory(["kv_cache", "weights"]))
        t0 = time.perf_counter()
        moved["onload"] = trainer.onload()["bytes"]
        st["onload_trainer"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        moved["offload"] = trainer.offload()["bytes"]
        st["offload_trainer"] = time.perf_counter() - t0
        st["resume_weights"] = _timed(lambda: engine.resume_memory(["weights"]))
        tensors, lay = trainer.export_shards()
        rep = {}
        # the native engine in this process: its released-and-resumed weights are written in place
        st["update_weights"] = _timed(lambda: rep.update(r=update_weights(TrainerShards(layout=lay, tensors=tensors),
                                                                           NativeEngineSink(engine))))
        moved["update"] = sum(t.numel() * t.element_size() for t in tensors.values())
        st["resume_kv"] = _timed(lambda: engine.resume_memory(["kv_cache"]))
    finally:
        engine.shutdown()
    return {"stages": st, "moved": moved}


def synthetic_case(gib: float) -> dict:
    """Trainer state of `gib` GiB (4 tensors per weight), engine weights = a quarter of it."""
    from k2sys.ckpt import TensorSink, hf_layout, update_weights
    from k2sys.ckpt.pipeline import TrainerShards
    from k2sys.trainer.offload import StateOffloader

    n_weights = 16
    per = int(gib * (1 << 30) / 4 / n_weights / 4)  # fp32 elements per weight tensor
    params = {f"w{i}": torch.randn(per) for i in range(n_weights)}
    state = [*params.values()] + [torch.zeros(per) for _ in range(3 * n_weights)]  # grads, m, v
    off = StateOffloader()
    layout = hf_layout({k: (per,) for k in params}, torch.float32)
    engine = TensorSink(layout, in_place=False)  # commit swaps staging and live: no second copy
    engine.weights = {k: v.clone() for k, v in params.items()}
    off.offload(state)
    st: dict[str, float] = {}
    moved = {}

    def release():
        for t in engine.weights.values():
            t.untyped_storage().resize_(0)

    def resume():
        for t in engine.weights.values():
            t.untyped_storage().resize_(per * 4)

    st["release_engine"] = _timed(release)
    t0 = time.perf_counter()
    moved["onload"] = off.onload()["bytes"]
    st["onload_trainer"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    moved["offload"] = off.offload(state)["bytes"]
    st["offload_trainer"] = time.perf_counter() - t0
    st["resume_weights"] = _timed(resume)
    host = {k: off.host_view(v) for k, v in params.items()}
    st["update_weights"] = _timed(lambda: update_weights(TrainerShards(layout=layout, tensors=host), engine))
    moved["update"] = sum(v.numel() * 4 for v in params.values())
    st["resume_kv"] = 0.0  # no KV cache in the synthetic case
    assert all(torch.equal(engine.weights[k], host[k]) for k in list(params)[:2]), "update landed wrong bytes"
    return {"stages": st, "moved": moved}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--sizes", default="1,2,4", help="synthetic trainer-state sizes in GiB")
    ap.add_argument("--models", default="k2-tiny,k2-small")
    args = ap.parse_args(argv)
    cases = [(m, lambda m=m: model_case(m)) for m in args.models.split(",") if m]
    cases += [(f"synthetic-{s}GiB", lambda s=s: synthetic_case(float(s))) for s in args.sizes.split(",") if s]
    results, table = [], Table(["case", "rollout->train s", "train->rollout s", "copy bound s", "bound/switch",
                                "fault-aware/switch", "copy GB/s touched|fresh", "stages (s)"])
    for name, fn in cases:
        r = fn()
        st, moved = r["stages"], r["moved"]
        total_bytes = moved["onload"] + moved["offload"] + moved["update"]
        gbps = plain_copy_gbps(max(moved.values()))
        fresh = fresh_copy_gbps(moved["onload"])
        bound = total_bytes / (gbps * 1e9)
        # fault-aware bound: onload lands in memory the engine just freed (fresh pages on CPU)
        bound_fresh = moved["onload"] / (fresh * 1e9) + (moved["offload"] + moved["update"]) / (gbps * 1e9)
        r2t = st["release_engine"] + st["onload_trainer"]
        t2r = st["offload_trainer"] + st["resume_weights"] + st["update_weights"] + st["resume_kv"]
        whole = r2t + t2r
        ratio = bound / whole
        results.append({"name": f"switch/{name}/bound_over_switch", "value": whole, "unit": "s", "baseline": bound,
                        "ratio": ratio, "target": TARGET})
        results.append({"name": f"switch/{name}/fault_aware_bound_over_switch", "value": whole, "unit": "s",
                        "baseline": bound_fresh, "ratio": bound_fresh / whole, "target": TARGET})
        results.append({"name": f"switch/{name}/rollout_to_train", "value": r2t, "unit": "s",
                        "baseline": moved["onload"] / (gbps * 1e9), "ratio": moved["onload"] / (gbps * 1e9) / r2t})
        results.append({"name": f"switch/{name}/train_to_rollout", "value": t2r, "unit": "s",
                        "baseline": (moved["offload"] + moved["update"]) / (gbps * 1e9),
                        "ratio": (moved["offload"] + moved["update"]) / (gbps * 1e9) / t2r})
        for k, v in st.items():
            results.append({"name": f"switch/{name}/{k}", "value": v, "unit": "s", "baseline": None, "ratio": None})
        table.add([name, f"{r2t:.3f}", f"{t2r:.3f}", f"{bound:.3f}", f"{ratio:.2f}", f"{bound_fresh / whole:.2f}",
                   f"{gbps:.1f}|{fresh:.1f}",
                   " ".join(f"{k}={v:.3f}" for k, v in st.items())])
    env = env_info()
    env["anchors"] = {"kimi_k1.5_train_to_infer_s": "< 60", "kimi_k1.5_infer_to_train_s": "~10",
                      "kimi_k2_full_update_s": "< 30 (paper), ~20 (blog)"}
    write_json(args.json, {"results": results, "env": env})
    print(table.render())
    print(f"target: copy-bound time / switch time >= {TARGET} (CPU); anchors: {env['anchors']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
