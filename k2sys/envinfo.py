"""`k2sys env`: versions, built extensions, and which backends are usable on this machine."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import platform
import shutil


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _importable(mod: str) -> tuple[bool, str | None]:
    try:
        importlib.import_module(mod)
        return True, None
    except Exception as e:  # noqa: BLE001 - we report any import failure as "unusable"
        return False, f"{type(e).__name__}: {e}"[:200]


def collect() -> dict:
    import torch

    from k2sys import ext

    info: dict = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {d: _version(d) for d in ("k2sys", "torch", "megatron-core", "triton", "transformers",
                                              "sglang", "transformer-engine", "tokenizers", "safetensors")},
        "torch_cuda": torch.version.cuda,
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "nvcc": shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if shutil.os.path.exists("/usr/local/cuda/bin/nvcc") else None),
        "extensions": ext.summary(),
    }
    backends = {}
    ok, err = _importable("megatron.core")
    backends["megatron-core (trainer)"] = {"usable": ok, "note": err or ("gloo/CPU" if not info["cuda_devices"] else "NCCL/GPU")}
    ok, err = _importable("triton")
    backends["triton kernels"] = {"usable": ok and bool(info["cuda_devices"]),
                                  "note": err or ("compiled on GPU" if info["cuda_devices"] else "CPU: torch reference path; tests use TRITON_INTERPRET=1")}
    ok, err = _importable("sglang")
    backends["sglang engine"] = {"usable": ok and bool(info["cuda_devices"]), "note": err or "needs a CUDA GPU"}
    backends["native engine"] = {"usable": True, "note": "embedded default (CPU or GPU)"}
    ok, err = _importable("transformer_engine")
    backends["transformer-engine spec"] = {"usable": ok, "note": err or "GPU spec for Megatron layers"}
    backends["nccl"] = {"usable": bool(info["cuda_devices"]) and torch.distributed.is_nccl_available(), "note": "gloo is used on CPU"}
    info["backends"] = backends
    return info


def format_table(info: dict) -> str:
    lines = [f"python {info['python']}  ({info['platform']})"]
    lines.append("versions:")
    for k, v in info["versions"].items():
        lines.append(f"  {k:20s} {v or '-'}")
    lines.append(f"torch CUDA: {info['torch_cuda'] or '-'}   CUDA devices: {info['cuda_devices']}   nvcc: {info['nvcc'] or '-'}")
    e = info["extensions"]
    lines.append(f"extensions: k2sys._C {'built' if e['cpp'] else 'MISSING'}"
                 f" ({e['cpp_threads']} threads)   k2sys._cuda {'built' if e['cuda_built'] else 'not built'}"
                 f"{', device visible' if e['cuda_usable'] else ', no device'}")
    lines.append("backends:")
    for k, v in info["backends"].items():
        lines.append(f"  {k:26s} {'yes' if v['usable'] else 'no ':3s}  {v['note']}")
    return "\n".join(lines)
