"""HF-format checkpoints: config.json + (sharded) safetensors + tokenizer + generation_config.json.

Writes are atomic: everything goes to a temp dir beside the target, which then replaces it
(an interrupted save leaves the previous checkpoint intact, never a half-written one).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from k2sys.models.config import ConfigError, K2Config
from k2sys.models.reference import K2ForCausalLM

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Kept in fp32 whatever the model dtype (as transformers does): routing is precision-sensitive.
_FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")
DEFAULT_SHARD_BYTES = 2 << 30


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir_atomic(tmp_dir: Path, dst: Path) -> None:
    """Move a fully written tmp_dir to dst; an existing dst is swapped out and removed after."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(tmp_dir, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, dst)


def save_state_dict(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """One model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    total = sum(t.numel() * t.element_size() for t in state.values())
    if total <= max_shard_bytes:
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        t = state[name]
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    write_json_atomic(out_dir / "model.safetensors.index.json",
                      {"metadata": {"total_size": total}, "weight_map": weight_map})


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json (not an HF checkpoint)")
    return [single]


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(Path(path)):
        state.update(load_file(str(f)))
    return state


def load_config(path: str | os.PathLike) -> K2Config:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{path}: missing config.json (not an HF checkpoint directory)")
    return K2Config.from_hf_dict(json.loads(cfg_path.read_text()))


def _save_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    if isinstance(tokenizer, (str, os.PathLike)):
        src = Path(tokenizer)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (src / f).exists():
                shutil.copy2(src / f, out_dir / f)
    elif hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out_dir))
    else:
        raise TypeError("tokenizer: pass a directory path or an object with save_pretrained()")


def save_hf(model: K2ForCausalLM, path: str | os.PathLike, tokenizer: Any = None,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write `model` as an HF DeepseekV3 checkpoint directory at `path` (atomically)."""
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
    try:
        cfg = model.config
        state = model.state_dict()
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        some = next(iter(state.values()))
        hf = cfg.to_hf_dict()
        hf["torch_dtype"] = str(some.dtype).replace("torch.", "") if some.dtype != torch.float32 else "float32"
        write_json_atomic(tmp / "config.json", hf)
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
        if cfg.pad_token_id is not None:
            gen["pad_token_id"] = cfg.pad_token_id
        write_json_atomic(tmp / "generation_config.json", gen)
        save_state_dict(state, tmp, max_shard_bytes)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)
        replace_dir_atomic(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def load_hf(path: str | os.PathLike, device: str | torch.device = "cpu",
            dtype: str | torch.dtype | None = None) -> K2ForCausalLM:
    """Load an HF DeepseekV3/Kimi-K2 checkpoint into the reference model.

    dtype None keeps the checkpoint's dtype. Missing or unexpected tensors are an error that
    names them (MTP layers beyond num_hidden_layers are ignored, as transformers does).
    """
    cfg = load_config(path)
    state = load_state_dict(path)
    n = cfg.num_hidden_layers
    state = {k: v for k, v in state.items() if not _is_extra_layer(k, n)}
    with torch.device("meta"):
        model = K2ForCausalLM(cfg)
    expected = set(model.state_dict().keys())
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match config.json: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    want = resolve_dtype(dtype)
    for k, v in state.items():
        if want is not None and v.is_floating_point():
            state[k] = v.to(torch.float32 if k.endswith(_FP32_SUFFIXES) else want)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary_emb = type(model.rotary_emb)(cfg)  # recompute non-persistent buffers off meta
    return model.to(device).eval()


def _is_extra_layer(name: str, n_layers: int) -> bool:
    parts = name.split(".")
    return len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and int(parts[2]) >= n_layers


def build_model(cfg: K2Config, seed: int = 0, dtype: str | torch.dtype | None = None) -> K2ForCausalLM:
    """A freshly initialised reference model (deterministic for a seed)."""
    model = K2ForCausalLM(cfg).init_weights(seed)
    want = resolve_dtype(dtype)
    if want is not None:
        model = model.to(want)
        for mod in model.modules():
            if mod.__class__.__name__ == "Router":
                mod.float()
    return model.eval()
