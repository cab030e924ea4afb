"""How far FP8 block-128 inference weights move a model's outputs (issue 11: "the engine's logits stay
within FP8 tolerance of the bf16 model").

The FP8 engine computes with dequantize(quantize_fp8_block(W)) (tests/test_engine_fp8.py checks it equals
an fp32 engine on those weights to 1e-4), so the figure is measured on the reference model: logits of a
checkpoint with every attention/MLP linear replaced by its FP8 round trip vs the original, both fp32, on
random prompts. The peer is bf16 weights (the trainer's usual dtype) measured the same way in the same run.

  value    = FP8 mean KL(p_orig || p_fp8) per token (nats)   baseline = bf16 mean KL
  ratio    = baseline / value (how FP8's perturbation compares with bf16's; < 1: larger)
Rows also give the max |logit diff| and greedy top-1 agreement.

  python benchmarks/bench_fp8_tolerance.py --json OUT --model HF_DIR [--prompts 16 --len 64]
  (without --model: a k2-small model with random weights)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _perturbed(model, fn):
    import copy

    from k2sys.quant.fp8 import is_fp8_weight_name

    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if is_fp8_weight_name(name):
                p.copy_(fn(p))
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--len", type=int, default=64)
    from common import add_common_args, env_info, print_results, result, write_results

    add_common_args(p)
    args = p.parse_args()

    from k2sys.models import build_model, k2_small, load_hf
    from k2sys.quant.fp8 import dequantize_fp8_block, quantize_fp8_block

    model = load_hf(args.model, dtype="float32") if args.model else build_model(k2_small(), seed=0)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (args.prompts, args.len), generator=torch.Generator().manual_seed(0))
    fp8 = _perturbed(model, lambda w: dequantize_fp8_block(*quantize_fp8_block(w), dtype=torch.float32))
    bf16 = _perturbed(model, lambda w: w.to(torch.bfloat16).float())
    with torch.no_grad():
        ref = model(ids).float()
        lp_ref = torch.log_softmax(ref, -1)
        stats = {}
        for name, m in (("fp8", fp8), ("bf16", bf16)):
            out = m(ids).float()
            lp = torch.log_softmax(out, -1)
            kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1).mean().item()
            stats[name] = {"kl": kl, "max_abs": (out - ref).abs().max().item(),
                           "top1": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                           "rel": ((out - ref).norm() / ref.norm()).item()}
    f, b = stats["fp8"], stats["bf16"]
    what = args.model or "k2-small (random weights)"
    results = [result(f"FP8 weights: mean KL per token ({what})", f["kl"], "nats", b["kl"], ratio=b["kl"] / max(f["kl"], 1e-30),
                      kind="peer", bound="bf16 round trip of the same weights, same prompts, same fp32 model",
                      threads=torch.get_num_threads(), system_threads=torch.get_num_threads(), reps=1,
                      deterministic=True, fp8_max_abs_logit=f["max_abs"],
                      bf16_max_abs_logit=b["max_abs"], fp8_top1_agree=f["top1"], bf16_top1_agree=b["top1"],
                      fp8_rel_logit=f["rel"], bf16_rel_logit=b["rel"])]
    print_results(results, "FP8 block-128 weights vs the fp32 model (bf16 as the peer)")
    print({k: {kk: round(vv, 6) for kk, vv in v.items()} for k, v in stats.items()})
    write_results(args.json, results, env_info(model=what, prompts=args.prompts, len=args.len, note=args.note,
                                               reps_note="deterministic: the same weights and prompts give the same "
                                                         "KL, so one run is the measurement"))


if __name__ == "__main__":
    main()
