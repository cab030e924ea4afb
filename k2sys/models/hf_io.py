"""HF-format checkpoints: config.json + (sharded) safetensors + tokenizer + generation_config.json.

Writes are atomic: everything goes to a temp dir beside the target, which then replaces it
(an interrupted save leaves the previous checkpoint intact, never a half-written one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from k2sys.models.checkpoint import FP8Block, HFCheckpoint, resolve_dtype
from k2sys.models.config import ConfigError, K2Config
from k2sys.models.reference import K2ForCausalLM

# Kept in fp32 whatever the model dtype (as transformers does): routing is precision-sensitive.
_FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")
DEFAULT_SHARD_BYTES = 2 << 30


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the result is an ordinary file
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir_atomic(tmp_dir: Path, dst: Path) -> None:
    """Move a fully written tmp_dir to dst; an existing dst is swapped out and removed after.
    tmp_dir (from mkdtemp, 0700) gets ordinary directory permissions, so a shared checkpoint is readable."""
    os.chmod(tmp_dir, 0o777 & ~_umask())
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(tmp_dir, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, dst)


def _save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, with its I/O failures (a full disk, a quota) raised as the OSError they are:
    safetensors reports them as SafetensorError("... (os error N)"), which callers cannot tell from a
    format error."""
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except Exception as e:
        m = re.search(r"os error (\d+)", str(e))
        if m is None or isinstance(e, OSError):
            raise
        code = int(m.group(1))
        raise OSError(code, f"writing {path}: {os.strerror(code)}") from e


def save_state_dict(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """One model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    total = sum(t.numel() * t.element_size() for t in state.values())
    if total <= max_shard_bytes:
        _save_file(state, out_dir / "model.safetensors")
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
        _save_file(shard, out_dir / fname)
        weight_map.update({k: fname for k in shard})
    write_json_atomic(out_dir / "model.safetensors.index.json",
                      {"metadata": {"total_size": total}, "weight_map": weight_map})


def load_state_dict(path: str | os.PathLike, dtype: str | torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every model tensor of an HF checkpoint by HF name, FP8 block-scaled weights dequantized exactly
    (k2sys.models.checkpoint); MTP layers beyond num_hidden_layers are dropped, anything else the config
    does not account for is an error."""
    ckpt = HFCheckpoint(path, resolve_dtype(dtype))
    try:
        return ckpt.state_dict()
    finally:
        ckpt.close()


def load_config(path: str | os.PathLike) -> K2Config:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{path}: missing config.json (not an HF checkpoint directory)")
    return K2Config.from_hf_dict(json.loads(cfg_path.read_text()))


# Files a checkpoint directory carries besides config.json and the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tiktoken.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")


def _auto_map_files(auto_map: Any) -> set[str]:
    """Python files an auto_map names ("module.Class" or "repo--module.Class"; lists for tokenizers)."""
    files = set()
    values = auto_map.values() if isinstance(auto_map, dict) else []
    for v in values:
        for ref in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(ref, str) and "." in ref:
                files.add(ref.split("--")[-1].rsplit(".", 1)[0] + ".py")
    return files


def copy_checkpoint_extras(src: str | os.PathLike | None, dst: str | os.PathLike,
                           raw_config: dict | None = None) -> dict | None:
    """Copy the tokenizer files and remote-code files of checkpoint `src` into `dst`.

    Returns `raw_config` with its `auto_map` kept only when every file it names was copied (an export
    never points transformers at code it does not carry); the tokenizer config's auto_map files
    (e.g. tokenization_kimi.py) are copied with it."""
    dst = Path(dst)
    src = Path(src) if src is not None else None
    if src is not None and src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, dst / name)
        if (src / "additional_chat_templates").is_dir():  # transformers 5.x: named templates, one file each
            shutil.copytree(src / "additional_chat_templates", dst / "additional_chat_templates", dirs_exist_ok=True)
        tok_cfg = src / "tokenizer_config.json"
        if tok_cfg.is_file():
            for f in _auto_map_files(json.loads(tok_cfg.read_text()).get("auto_map")):
                if (src / f).is_file():
                    shutil.copy2(src / f, dst / f)
    if raw_config is None:
        return None
    out = dict(raw_config)
    wanted = _auto_map_files(out.get("auto_map"))
    if wanted:
        for f in wanted:
            if src is not None and (src / f).is_file():
                shutil.copy2(src / f, dst / f)
        if not all((dst / f).is_file() for f in wanted):
            out.pop("auto_map")
    return out


def _save_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    if isinstance(tokenizer, (str, os.PathLike)):
        copy_checkpoint_extras(tokenizer, out_dir)
    elif hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out_dir))
    else:
        raise TypeError("tokenizer: pass a directory path or an object with save_pretrained()")


EXPORT_FORMATS = ("native", "bf16", "fp8-block128")


def export_state(state: dict[str, torch.Tensor], format: str = "native") -> tuple[dict[str, torch.Tensor], dict | None]:
    """(tensors to write, quantization_config) of an HF state dict in an export format:
    native keeps dtypes; bf16 casts floats to bfloat16; fp8-block128 writes the release format (every
    attention/MLP linear as float8_e4m3fn + weight_scale_inv, quantized once for the whole model; the
    rest bf16). The router's e_score_correction_bias stays float32 in both, as released."""
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"save_hf format: {format!r} is not one of {EXPORT_FORMATS}")
    if format == "native":
        return state, None
    out = {k: (v.to(torch.float32) if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16))
           if v.is_floating_point() else v for k, v in state.items()}
    if format == "bf16":
        return out, None
    from k2sys.quant.fp8 import is_fp8_weight_name, quantize_fp8_blocks

    names = [k for k in state if is_fp8_weight_name(k)]
    for name, (q, s) in zip(names, quantize_fp8_blocks([state[k] for k in names])):
        out[name] = q
        out[name + "_scale_inv"] = s
    return out, FP8Block().to_config()


def save_hf(model: K2ForCausalLM, path: str | os.PathLike, tokenizer: Any = None,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES, format: str = "native") -> Path:
    """Write `model` as an HF DeepseekV3 checkpoint directory at `path` (atomically).

    format: native (the model's dtypes), bf16, or fp8-block128 (the DeepSeek-V3/Kimi-K2 release format,
    servable by SGLang/vLLM as the original). `tokenizer`: a directory whose tokenizer and remote-code
    files are carried over, or an object with save_pretrained()."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return write_hf_dir(state, model.config, path, format=format, extras_from=tokenizer, max_shard_bytes=max_shard_bytes)


def write_hf_dir(state: dict[str, torch.Tensor], cfg: K2Config, path: str | os.PathLike, *, format: str = "native",
                 extras_from: Any = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """An HF checkpoint directory from a full HF state dict: config.json (model_type kept, quantization_config
    set by the format, auto_map only with its files), generation_config.json, safetensors, extras."""
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
    try:
        tensors, qconfig = export_state(state, format)
        hf = cfg.to_hf_dict()
        hf.pop("quantization_config", None)
        if qconfig is not None:
            hf["quantization_config"] = qconfig
        some = next(v for k, v in tensors.items() if v.is_floating_point() and not k.endswith(("_scale_inv", "bias"))
                    and v.dtype not in (torch.float8_e4m3fn,))
        hf["torch_dtype"] = str(some.dtype).replace("torch.", "")
        if extras_from is not None and not isinstance(extras_from, (str, os.PathLike)):
            _save_tokenizer(extras_from, tmp)
            extras_from = None
        hf = copy_checkpoint_extras(extras_from, tmp, hf)
        write_json_atomic(tmp / "config.json", hf)
        if not (tmp / "generation_config.json").exists():
            gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
            if cfg.pad_token_id is not None:
                gen["pad_token_id"] = cfg.pad_token_id
            write_json_atomic(tmp / "generation_config.json", gen)
        save_state_dict(tensors, tmp, max_shard_bytes)
        replace_dir_atomic(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def load_hf(path: str | os.PathLike, device: str | torch.device = "cpu",
            dtype: str | torch.dtype | None = None) -> K2ForCausalLM:
    """Load an HF DeepseekV3/Kimi-K2 checkpoint into the reference model.

    dtype None keeps the checkpoint's dtype (FP8 weights become the config's torch_dtype); FP8
    block-scaled weights are dequantized exactly. Missing, unexpected or unplaceable tensors are an
    error that names them (MTP layers beyond num_hidden_layers are ignored, as transformers does).
    """

    ckpt = HFCheckpoint(path)
    cfg = ckpt.config
    want = resolve_dtype(dtype)
    try:
        state = {k: ckpt.read(k, dtype=(torch.float32 if k.endswith(_FP32_SUFFIXES) else want) if want else None)
                 for k in ckpt}
    finally:
        ckpt.close()
    with torch.device("meta"):
        model = K2ForCausalLM(cfg)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary_emb = type(model.rotary_emb)(cfg)  # recompute non-persistent buffers off meta
    return model.to(device).eval()


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
