"""Kimi-K2 parameter-update projection: what one full update would cost on the anchor hardware.

A projection, not a measurement: no GPU takes part, so nothing here is a ratio or has a target
(rows are "kind": "projection"). Every cost is priced from a figure measured in this run (CPU-side
latencies: per-tensor engine overhead, control round trip, barrier) or a cited one (SOURCES);
hardware rates are the cited peak figures, so each transfer line is a floor for that line.

The update of a colocated RL step (Kimi-K2 paper, section on the checkpoint engine), per GPU:
  metadata exchange  -> gather/reshard (Megatron layout -> HF names, on the GPU) -> bf16->FP8
  quantization of this GPU's shard -> [H2D of the shard || broadcast of every FP8 byte to every
  GPU || engine reload of its TP shard] per bucket -> per-bucket synchronisation -> per-tensor
  engine overhead
The trainer holds its bf16 params whole-tensor over PP x EP (no TP; paper sec. 2.4), offloaded to
host DRAM during rollout, so each GPU brings back 1/N of the bf16 bytes (H2D moves bf16, 2 B/param).
Across nodes H2D and the NIC traffic of the broadcast share the PCIe switches (checkpoint-engine
README: its 3-stage pipeline is not implemented for that reason), so past one node they are
priced in series.
"""

from __future__ import annotations

import math

from k2sys.ckpt import hf_param_shapes
from k2sys.quant.fp8 import is_fp8_weight_name

GiB = 1 << 30
BLOCK = 128  # FP8 block-128 scales (one fp32 per 128x128 block)

# Cited sources (docs/benchmarks.md repeats them with the numbers used).
SOURCES = {
    "ckpt_engine": "MoonshotAI/checkpoint-engine README (v0.1.3 sdist on PyPI), Benchmark table: Kimi-K2-Instruct "
                   "(FP8), vLLM v0.10.2rc1: 16xH20 TP16 GatherMetas 1.81 s, Update (Broadcast) 15.45 s, IPC bucket "
                   "2.93 GiB; 256xH20 TP16 1.88 s, 21.50 s, 2.99 GiB. Limitations: the paper's 3-stage pipeline "
                   "is not implemented (H2D and broadcast conflict in PCIe).",
    "k2_deploy": "moonshotai/Kimi-K2-Instruct docs/deploy_guidance.md: the smallest deployment unit for Kimi-K2 "
                 "FP8 weights (128k seqlen) on H200 or H20 is 16 GPUs, TP16 or DP+EP.",
    "k2_paper": "Kimi K2 technical report, arXiv:2507.20534, sec. 2.4: PP with virtual stages, 16-way EP, "
                "ZeRO-1 DP; BF16 params over a model-parallel group of 256 GPUs (no tensor parallelism).",
    "h20": "NVIDIA H20 (HGX) specifications: 96 GB HBM3, 4.0 TB/s; NVLink 900 GB/s; PCIe Gen5 x16.",
    "h200": "NVIDIA H200 SXM datasheet: 141 GB HBM3e, 4.8 TB/s; NVLink 900 GB/s; PCIe Gen5 x16 (128 GB/s both "
            "directions).",
    "pcie": "PCIe 5.0 x16: 32 GT/s x 16 lanes x 128/130 = 63 GB/s per direction; pinned cudaMemcpy H2D "
            "measures 50-56 GB/s on such links (NVIDIA NVbandwidth, host_to_device_memcpy_ce); 50 GB/s used.",
    "nic": "8 x ConnectX-7 400 Gb/s (50 GB/s raw, ~48 GB/s NDR data rate) per 8-GPU node (NVIDIA DGX H200 "
           "datasheet); the H20 nodes of the anchor are assumed to be built the same (not published).",
    "nvlink_bcast": "NCCL broadcast over NVLink4 (900 GB/s bidirectional, 450 GB/s per direction) reaches "
                    "~370 GB/s bus bandwidth per GPU (nccl-tests class figure, docs/FACTS.md).",
}

HARDWARE = {
    "H20": dict(memory_gb=96, hbm=4.0e12, h2d=50e9, nvlink_bcast=370e9, nic=48e9, nics_per_node=8,
                gpus_per_node=8, tp=16, sources=["h20", "pcie", "nic", "nvlink_bcast", "k2_deploy"]),
    "H200": dict(memory_gb=141, hbm=4.8e12, h2d=50e9, nvlink_bcast=370e9, nic=48e9, nics_per_node=8,
                 gpus_per_node=8, tp=16, sources=["h200", "pcie", "nic", "nvlink_bcast", "k2_deploy"]),
}
# checkpoint-engine's measured Kimi-K2 update on H20 (cited; shown next to the projection, no ratio)
ANCHORS = {("H20", 16): dict(gather_metas_s=1.81, update_s=15.45, bucket_bytes=2.93 * GiB),
           ("H20", 256): dict(gather_metas_s=1.88, update_s=21.50, bucket_bytes=2.99 * GiB)}


def k2_sizes(config: dict) -> dict:
    """Params, bf16 bytes, FP8 checkpoint bytes (block-128 weights + fp32 scales, bf16 rest) and
    tensor count (FP8 weights count twice: weight + weight_scale_inv) from the real shapes."""
    params = fp8_bytes = tensors = 0
    for name, shape in hf_param_shapes(config).items():
        n = 1
        for d in shape:
            n *= d
        params += n
        tensors += 1
        if is_fp8_weight_name(name) and len(shape) == 2:
            blocks = -(-shape[0] // BLOCK) * -(-shape[1] // BLOCK)
            fp8_bytes += n + 4 * blocks
            tensors += 1
        else:
            fp8_bytes += 2 * n
    return {"params": params, "bf16_bytes": 2 * params, "fp8_bytes": fp8_bytes, "tensors": tensors}


def project(hw: str, n_gpus: int, sizes: dict, measured: dict) -> dict:
    """Seconds per component for one update of Kimi-K2 on `n_gpus` GPUs of `hw`, engines at TP16.

    measured: per_tensor_s (engine overhead per destination tensor), control_rtt_s (one control
    round trip to the engine), barrier_s (one barrier), each measured in this run on this CPU,
    or None when not measured (the component is then left out and named in `missing`).
    """
    h = HARDWARE[hw]
    tp = h["tp"]
    anchor = ANCHORS.get((hw, n_gpus)) or ANCHORS[("H20", 256 if n_gpus > 16 else 16)]
    bucket = anchor["bucket_bytes"]
    shard_params = sizes["params"] / n_gpus
    c: dict[str, dict] = {}

    def add(key, seconds, how, source):
        c[key] = {"s": seconds, "how": how, "source": source}

    add("metadata_exchange", anchor["gather_metas_s"],
        "checkpoint-engine GatherMetas on H20 at this scale (cited; no H200 figure, the same used)", "ckpt_engine")
    add("gather_reshard", 2 * 2 * shard_params / h["hbm"],
        "Megatron layout -> HF names on each GPU: read + write its bf16 shard (1/N) at peak HBM; no TP in the "
        "trainer (PP x EP, whole tensors) so no cross-GPU gather", f"k2_paper, {hw.lower()}")
    add("quantize_fp8", 3 * shard_params / h["hbm"],
        "bf16 -> FP8 block-128 of its shard: read 2 B + write 1 B per param at peak HBM", hw.lower())
    t_h2d = sizes["bf16_bytes"] / n_gpus / h["h2d"]
    add("h2d", t_h2d, "its 1/N of the offloaded bf16 params, pinned H2D", "pcie")
    if n_gpus <= h["gpus_per_node"]:
        link, where = h["nvlink_bcast"], "NVLink broadcast"
    else:
        link = min(h["nvlink_bcast"], h["nics_per_node"] * h["nic"])
        where = f"min(NVLink broadcast, {h['nics_per_node']} NICs per node)"
    t_b = sizes["fp8_bytes"] / link
    add("broadcast", t_b, f"every FP8 byte to every GPU at {where} = {link / 1e9:.0f} GB/s", "nvlink_bcast, nic")
    t_r = 2 * sizes["fp8_bytes"] / tp / h["hbm"]
    add("reload", t_r, f"engine copies its TP{tp} shard out of the broadcast buffer (read + write, peak HBM)",
        f"k2_deploy, {hw.lower()}")
    n_buckets = int(math.ceil(sizes["fp8_bytes"] / bucket))
    missing = []
    if measured.get("per_tensor_s") is not None:
        add("per_tensor_engine", sizes["tensors"] * measured["per_tensor_s"],
            f"{sizes['tensors']} HF tensors (FP8 weights + scales; TP slicing does not reduce the count) x "
            f"{measured['per_tensor_s'] * 1e6:.1f} us per tensor (k2sys apply per destination tensor, measured in "
            "this run on this CPU; the CPU engine's oneDNN repack is left out)", "measured")
    else:
        missing.append("per_tensor_engine")
    per_bucket = [measured.get("control_rtt_s"), measured.get("barrier_s")]
    if None not in per_bucket:
        add("per_bucket_sync", n_buckets * sum(per_bucket),
            f"{n_buckets} buckets of {bucket / GiB:.2f} GiB (checkpoint-engine's size) x (control round trip "
            f"{per_bucket[0] * 1e3:.2f} ms + barrier {per_bucket[1] * 1e3:.2f} ms, measured in this run)",
            "ckpt_engine, measured")
    else:
        missing.append("per_bucket_sync")
    s = {k: v["s"] for k, v in c.items()}
    serial = sum(s.values())
    transfer = ["h2d", "broadcast", "reload"]
    if n_gpus > h["gpus_per_node"]:  # H2D and NIC traffic share PCIe: one stage
        stages = [s["h2d"] + s["broadcast"], s["reload"]]
    else:
        stages = [s["h2d"], s["broadcast"], s["reload"]]
    piped_transfer = max(stages) + (sum(stages) - max(stages)) / n_buckets
    pipelined = serial - sum(s[k] for k in transfer) + piped_transfer
    floor = max(sizes["fp8_bytes"] / n_gpus / h["h2d"], t_b, t_r)
    notes = []
    if n_gpus < 256:
        notes.append(f"a trainer on {n_gpus} x {h['memory_gb']} GB cannot hold K2's ~6 TB of bf16 params + fp32 "
                     "grads (paper sec. 2.4: 256-GPU model-parallel group); its lines are priced as if it could, "
                     "to sit beside checkpoint-engine's 16-GPU figure")
    return {"hardware": hw, "gpus": n_gpus, "engine_tp": tp, "components": c, "serial_s": serial, "notes": notes,
            "pipelined_s": pipelined, "bandwidth_floor_s": floor, "n_buckets": n_buckets, "missing": missing,
            "anchor": ANCHORS.get((hw, n_gpus))}


def table(p: dict) -> list[str]:
    lines = [f"Kimi-K2 update on {p['gpus']} x {p['hardware']} (engines TP{p['engine_tp']}):"]
    for k, v in p["components"].items():
        lines.append(f"  {k:18s} {v['s']:8.3f} s  {v['how']} [{v['source']}]")
    for k in p["missing"]:
        lines.append(f"  {k:18s}      n/a  not measured in this run (a skipped section)")
    lines.append(f"  {'total, serial':18s} {p['serial_s']:8.3f} s")
    lines.append(f"  {'total, pipelined':18s} {p['pipelined_s']:8.3f} s  (transfers overlapped per bucket; H2D and "
                 "broadcast in series past one node)")
    lines.append(f"  {'bandwidth floor':18s} {p['bandwidth_floor_s']:8.3f} s  (the old projection: max(FP8 H2D, "
                 "broadcast, reload) only)")
    lines += [f"  note: {n}" for n in p["notes"]]
    a = p["anchor"]
    if a:
        lines.append(f"  checkpoint-engine measured (cited, not comparable line by line): GatherMetas "
                     f"{a['gather_metas_s']} s + Update {a['update_s']} s")
    return lines
