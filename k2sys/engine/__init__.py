"""Inference engines: the native engine (embedded default) and its SGLang-compatible server.

`NativeEngine` implements the `InferenceEngine` protocol (protocol.py) in process; `k2sys serve`
(server.py) puts it behind SGLang's HTTP routes plus OpenAI's /v1 routes.
"""

from k2sys.engine.config import EngineConfig, EngineError, RequestError, SamplingParams
from k2sys.engine.engine import NativeEngine, RequestHandle
from k2sys.engine.kv_cache import BlockAllocator, OutOfBlocks, PagedLatentCache

__all__ = ["BlockAllocator", "EngineConfig", "EngineError", "NativeEngine", "OutOfBlocks", "PagedLatentCache",
           "RequestError", "RequestHandle", "SamplingParams"]
