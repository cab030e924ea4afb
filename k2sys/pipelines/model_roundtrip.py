"""model-roundtrip: tokenizer -> K2 model -> HF checkpoint -> reload -> logits agree.

The foundation's end-to-end job: it exercises the tokenizer training, the chat template, the
reference model and the atomic HF writer/loader, and prints a parameter table and a logits
checksum that must be identical before and after the round trip.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from k2sys.config import render
from k2sys.models import build_model, load_hf, preset, save_hf
from k2sys.recipes import RunConfig


def param_table(model: torch.nn.Module) -> list[tuple[str, int]]:
    """Parameter counts grouped by role (embeddings, attention, dense MLP, experts, router, norms, head)."""
    groups: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            g = "embeddings"
        elif "lm_head" in name:
            g = "lm_head"
        elif "self_attn" in name and "layernorm" not in name:
            g = "attention (MLA)"
        elif ".experts." in name:
            g = "routed experts"
        elif "shared_experts" in name:
            g = "shared experts"
        elif "mlp.gate." in name:
            g = "router"
        elif ".mlp." in name:
            g = "dense MLP"
        else:
            g = "norms"
        groups[g] += p.numel()
    return sorted(groups.items(), key=lambda kv: -kv[1])


def run(cfg: RunConfig) -> dict:
    from k2sys.tokenizer import default_corpus, render_chat, train_tokenizer

    out = Path(cfg.output_root) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(render(cfg) + "\n")
    t0 = time.perf_counter()
    tok_dir = train_tokenizer(default_corpus(), cfg.tokenizer.vocab_size, out / "tokenizer")
    from transformers import AutoTokenizer  # noqa: F401 - optional; plain tokenizers path below

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
    vocab = cfg.model.vocab_size or tok.get_vocab_size()
    mcfg = preset(cfg.model.preset, vocab_size=vocab)
    model = build_model(mcfg, seed=cfg.model.seed, dtype=cfg.model.dtype)
    ckpt = save_hf(model, out / "checkpoint", tokenizer=tok_dir)
    reloaded = load_hf(ckpt)

    prompt = render_chat([{"role": "user", "content": "What is 12+35?"}], add_generation_prompt=True)
    ids = torch.tensor([tok.encode(prompt).ids])
    with torch.no_grad():
        a, b = model(ids).float(), reloaded(ids).float()
    diff = (a - b).abs().max().item()
    checksum = float(a.double().sum())
    table = param_table(model)
    total = sum(n for _, n in table)
    print(f"k2sys run {cfg.name}: preset {cfg.model.preset}, vocab {vocab}, {total:,} parameters")
    print(f"  {'group':20s} {'params':>12s} {'share':>7s}")
    for g, n in table:
        print(f"  {g:20s} {n:12,d} {n / total:7.1%}")
    print(f"  checkpoint: {ckpt}  ({sum(f.stat().st_size for f in Path(ckpt).iterdir()) / 1e6:.1f} MB)")
    print(f"  prompt tokens: {ids.shape[1]}   logits checksum: {checksum:.6f}   max |diff| after reload: {diff:.3g}")
    result = {"params": total, "vocab": vocab, "logits_checksum": checksum, "reload_max_abs_diff": diff,
              "seconds": time.perf_counter() - t0, "checkpoint": str(ckpt)}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if diff != 0.0:
        raise RuntimeError(f"reloaded checkpoint gives different logits (max |diff| {diff}); the HF round trip is broken")
    return result
