"""Megatron <-> HF checkpoints, offline (`k2sys convert ...`) and in-process.

Two Megatron formats are read:
  per-rank  `hf-to-megatron` output: DST/k2sys_megatron.json (config, tp, ep) and one
            DST/mp_rank_TT[_EEE]/model_optim_rng.pt per (tp_rank, ep_rank) holding {"model": state}
            (Megatron-LM's directory naming). Written here by copies along naming.RULES.
  dist      a `MegatronBackend.save` directory (megatron dist_checkpointing, any TP/EP); read by
            building a TP=1/EP=1 model in this process and letting dist_checkpointing reshard.

  python -m k2sys.trainer.convert hf-to-megatron HF_DIR OUT --tp 2 --ep 2
  python -m k2sys.trainer.convert megatron-to-hf MEGATRON_DIR HF_OUT
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from k2sys.models.config import K2Config
from k2sys.models.hf_io import load_config, load_state_dict, replace_dir_atomic, save_state_dict, write_json_atomic
from k2sys.trainer.naming import hf_to_megatron, megatron_to_hf

META = "k2sys_megatron.json"
FORMAT_PER_RANK = "k2sys-megatron-per-rank-v1"
FORMAT_DIST = "k2sys-megatron-dist-v1"


def rank_dir(tp_rank: int, ep_rank: int, ep_size: int) -> str:
    return f"mp_rank_{tp_rank:02d}" + (f"_{ep_rank:03d}" if ep_size > 1 else "")


def hf_dir_to_megatron(src: str | Path, dst: str | Path, tp: int = 1, ep: int = 1) -> Path:
    """Write an HF checkpoint as per-rank Megatron state dicts for a (tp, ep) layout (atomically)."""
    from k2sys.trainer.spec import check_supported

    src, dst = Path(src), Path(dst)
    cfg = load_config(src)
    check_supported(cfg, tp, ep)
    state = load_state_dict(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
    try:
        for t in range(tp):
            for e in range(ep):
                local = hf_to_megatron(state, cfg, tp, ep, t, e)
                d = tmp / rank_dir(t, e, ep)
                d.mkdir()
                torch.save({"model": local, "tp_rank": t, "ep_rank": e}, d / "model_optim_rng.pt")
        write_json_atomic(tmp / META, {"format": FORMAT_PER_RANK, "tp": tp, "ep": ep, "config": cfg.to_hf_dict()})
        for extra in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            if (src / extra).exists():
                shutil.copy2(src / extra, tmp / extra)
        replace_dir_atomic(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def read_meta(path: str | Path) -> dict[str, Any]:
    meta = Path(path) / META
    if not meta.exists():
        raise FileNotFoundError(f"{path}: no {META}; not a k2sys Megatron checkpoint (per-rank or dist)")
    return json.loads(meta.read_text())


def load_per_rank(path: str | Path) -> tuple[K2Config, int, int, dict[tuple[int, int], dict[str, torch.Tensor]]]:
    """(config, tp, ep, {(tp_rank, ep_rank): local state}) of a per-rank checkpoint."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("format") != FORMAT_PER_RANK:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT_PER_RANK!r}")
    cfg = K2Config.from_hf_dict(meta["config"])
    tp, ep = int(meta["tp"]), int(meta["ep"])
    shards = {}
    for t in range(tp):
        for e in range(ep):
            f = path / rank_dir(t, e, ep) / "model_optim_rng.pt"
            if not f.exists():
                raise FileNotFoundError(f"{path}: missing {f.relative_to(path)} for tp_rank={t} ep_rank={e}")
            shards[(t, e)] = torch.load(f, map_location="cpu", weights_only=True)["model"]
    return cfg, tp, ep, shards


def write_hf(state: Mapping[str, torch.Tensor], cfg: K2Config, dst: str | Path, extras_from: Path | None = None) -> Path:
    """An HF checkpoint directory (config.json + safetensors) from a full HF state dict, atomically."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
    try:
        hf = cfg.to_hf_dict()
        some = next(v for k, v in state.items() if not k.endswith("e_score_correction_bias"))
        hf["torch_dtype"] = str(some.dtype).replace("torch.", "")
        write_json_atomic(tmp / "config.json", hf)
        save_state_dict(dict(state), tmp)
        if extras_from is not None:
            for extra in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
                if (extras_from / extra).exists():
                    shutil.copy2(extras_from / extra, tmp / extra)
        replace_dir_atomic(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def megatron_dir_to_hf(src: str | Path, dst: str | Path) -> Path:
    """Convert a per-rank or dist Megatron checkpoint directory to an HF checkpoint directory."""
    src = Path(src)
    meta = read_meta(src)
    if meta.get("format") == FORMAT_PER_RANK:
        cfg, tp, ep, shards = load_per_rank(src)
        state = megatron_to_hf(shards, cfg, tp, ep)
    elif meta.get("format") == FORMAT_DIST:
        from k2sys.trainer.backend import MegatronBackend

        backend = MegatronBackend.from_checkpoint(src)  # TP=1/EP=1 here; dist_checkpointing reshards
        cfg, state = backend.config, backend.hf_state_dict()
    else:
        raise ValueError(f"{src}: unknown checkpoint format {meta.get('format')!r}")
    return write_hf(state, cfg, dst, extras_from=src)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="k2sys convert", description="Megatron <-> HF DeepseekV3 checkpoints")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-megatron", help="HF dir -> per-rank Megatron checkpoint for a TP/EP layout")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--ep", type=int, default=1)
    b = sub.add_parser("megatron-to-hf", help="Megatron checkpoint (per-rank or dist) -> HF dir")
    b.add_argument("src")
    b.add_argument("dst")
    args = p.parse_args(argv)
    if args.cmd == "hf-to-megatron":
        if args.tp < 1 or args.ep < 1:
            p.error("--tp and --ep must be >= 1")
        out = hf_dir_to_megatron(args.src, args.dst, args.tp, args.ep)
    else:
        out = megatron_dir_to_hf(args.src, args.dst)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
