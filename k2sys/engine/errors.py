"""The engine's two error types, below every other engine module (protocol, wire and the checkpoint
engine's buckets raise them too, so they cannot live in a module that imports those).

RequestError: what was asked is malformed; the message names the field and the fix (HTTP 400).
EngineError: the engine cannot do it in its current state (shutting down, memory released).
"""

from __future__ import annotations

__all__ = ["EngineError", "ProtocolError", "RequestError"]


class EngineError(RuntimeError):
    """The engine cannot do what was asked in its current state (e.g. weights released)."""


class RequestError(ValueError):
    """A request or payload at the engine edge is malformed; the message names the field and the fix (HTTP 400)."""


# The name the protocol layer (payload checks, clients, the weight wire) has used: the same type.
ProtocolError = RequestError
