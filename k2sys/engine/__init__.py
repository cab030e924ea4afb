"""Inference engines: the native engine (embedded default) and its SGLang-compatible server.

    api/        what crosses the process edge: request/response types (protocol.py; the one
                SamplingParams and LogprobOptions in params.py; the pydantic request bodies in
                bodies.py and openai_bodies.py), the SGLang routes (server.py), the OpenAI routes and
                chat rendering (openai_api.py), the field tables (api_fields.py), the HTTP client
                (client.py) and the SGLang adapter
    core/       the engine itself, typed objects only: NativeEngine (engine.py; its weight-update
                sessions in weight_update.py), the continuous-batching scheduler, the model runner,
                the paged KV cache, sampling, grammars
    transport/  weight payloads: pickle-free encodings (wire.py) and shared memory / CUDA IPC (shm.py)
    errors.py   the two error types every layer raises; launch.py starts and stops a server process

`NativeEngine` implements the `InferenceEngine` protocol (api/protocol.py) in process; `k2sys serve`
(api/server.py) puts it behind SGLang's HTTP routes plus OpenAI's /v1 routes.

The modules lived directly in k2sys.engine before the split; `import k2sys.engine.server` (and the
other old paths in `_MOVED`) still works and gives the same module object as the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

from k2sys.engine.core.config import EngineConfig, EngineError, RequestError, SamplingParams
from k2sys.engine.core.engine import NativeEngine, RequestHandle
from k2sys.engine.core.kv_cache import BlockAllocator, OutOfBlocks, PagedLatentCache

__all__ = ["BlockAllocator", "EngineConfig", "EngineError", "NativeEngine", "OutOfBlocks", "PagedLatentCache",
           "RequestError", "RequestHandle", "SamplingParams"]

_MOVED = {**{m: "core" for m in ("engine", "scheduler", "model_runner", "kv_cache", "sampling", "moe", "grammar",
                                  "config")},
          **{m: "api" for m in ("server", "openai_api", "api_fields", "protocol", "client", "sglang_adapter")},
          **{m: "transport" for m in ("wire", "shm")}}


class _MovedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Old path k2sys.engine.X -> the module at k2sys.engine.<pkg>.X (one module object, two names)."""

    def find_spec(self, fullname, path=None, target=None):
        pkg, _, leaf = fullname.rpartition(".")
        if pkg != __name__ or leaf not in _MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        leaf = spec.name.rpartition(".")[2]
        real = importlib.import_module(f"{__name__}.{_MOVED[leaf]}.{leaf}")
        spec.loader_state = real.__spec__
        return real

    def exec_module(self, module):
        # The real module already ran; the import system stamped the old name's spec on it: put
        # the real one back so reload() and pickling by module name keep working.
        module.__spec__ = module.__spec__.loader_state

if not any(isinstance(f, _MovedModule) for f in sys.meta_path):
    sys.meta_path.append(_MovedModule())
