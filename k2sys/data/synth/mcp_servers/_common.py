"""Shared by the reference servers; imports nothing from k2sys (the servers must start light)."""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

__all__ = ["ToolError", "new_server"]


def new_server(name: str, instructions: str) -> MCPServer:
    # WARNING: the SDK logs every refused call at INFO on stderr; a refusal is normal tool behaviour here.
    return MCPServer(name, instructions=instructions, version="1", log_level="WARNING")
