"""Real tools over MCP (stdio), with the `mcp` Python SDK.

    MCPServerSpec     how to start a server: a name and a command (plus env, cwd). Parsed from the
                      command line as "NAME=COMMAND ARGS..." or "COMMAND ARGS...", or a reference
                      server by name ("calculator", "notes", "files", "calendar").
    import_mcp_tools  start the server, list_tools (all pages) -> LibraryTool rows (source "mcp",
                      provenance: server, original tool name, import time); the server's own
                      schemas are kept as they are (validated, not rewritten).
    MCPToolbox        per-trajectory sessions: a server is started on the first call to one of its
                      tools and stopped when the toolbox closes, so every trajectory has its own
                      world (notes, files, events). A call returns a `ToolOutcome`; a refused call
                      (is_error) is a normal outcome shown to the agent, never an exception.
    SyncToolbox       the same for synchronous callers (RL environments): the sessions live in one
                      task on a background event loop.

Servers' stderr goes to a temporary file whose tail is quoted when a server fails to start.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import shlex
import sys
import tempfile
import threading
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .library import LibraryTool, sanitize_name, validate_tool

__all__ = ["MCPServerSpec", "MCPError", "ToolOutcome", "MCPToolbox", "SyncToolbox", "import_mcp_tools",
           "reference_spec", "background_loop"]

SERVERS_DIR = Path(__file__).resolve().parent / "mcp_servers"


class MCPError(RuntimeError):
    """A server could not be started or listed; the message quotes its stderr."""


@dataclass
class MCPServerSpec:
    name: str
    command: list[str]
    env: dict[str, str] | None = None
    cwd: str | None = None
    category: str | None = None

    @classmethod
    def parse(cls, text: str) -> "MCPServerSpec":
        """"NAME=CMD ARGS", "CMD ARGS" (name from the program), or a reference server's name."""
        from .mcp_servers import REFERENCE_SERVERS

        text = text.strip()
        if text in REFERENCE_SERVERS:
            return reference_spec(text)
        name = None
        head = text.split(None, 1)[0] if text else ""
        if "=" in head and not head.startswith(("/", ".")):
            name, text = text.split("=", 1)
        argv = shlex.split(text)
        if not argv:
            raise ValueError(f"MCP server {text!r}: no command")
        if name is None:
            launcher = argv[0] in ("npx", "uvx")   # the package is the last argument
            prog = next((a for a in reversed(argv) if a.endswith(".py")), argv[-1] if launcher else argv[0])
            name = Path(prog).stem
        return cls(sanitize_name(name.strip()), argv)

    def resolved_command(self) -> list[str]:
        return [a.replace("{python}", sys.executable).replace("{servers}", str(SERVERS_DIR)) for a in self.command]

    def to_json(self) -> dict:
        d: dict[str, Any] = {"name": self.name, "command": list(self.command)}
        if self.env:
            d["env"] = dict(self.env)
        if self.cwd:
            d["cwd"] = self.cwd
        if self.category:
            d["category"] = self.category
        return d

    @classmethod
    def from_json(cls, d: dict) -> "MCPServerSpec":
        return cls(d["name"], list(d["command"]), d.get("env"), d.get("cwd"), d.get("category"))


def reference_spec(name: str) -> MCPServerSpec:
    from .mcp_servers import REFERENCE_SERVERS

    if name not in REFERENCE_SERVERS:
        raise ValueError(f"no reference MCP server {name!r}; have {sorted(REFERENCE_SERVERS)}")
    d = REFERENCE_SERVERS[name]
    return MCPServerSpec(d["name"], list(d["command"]), category=d["category"])


@dataclass
class ToolOutcome:
    content: str                 # what the agent sees as the tool message (JSON text where possible)
    is_error: bool = False
    kind: str = "ok"             # ok | error (the tool refused) | injected (simulated outage) | invalid (bad args)
    meta: dict = field(default_factory=dict)


def _compact(text: str) -> str:
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except (json.JSONDecodeError, TypeError):
        return text


def outcome_from_result(res: Any) -> ToolOutcome:
    """CallToolResult -> ToolOutcome: structured content as JSON, else the text parts (JSON compacted)."""
    is_error = bool(getattr(res, "is_error", False))
    structured = getattr(res, "structured_content", None)
    if structured is not None and not is_error:
        text = json.dumps(structured, ensure_ascii=False)
    else:
        parts = []
        for c in getattr(res, "content", None) or []:
            t = getattr(c, "text", None)
            parts.append(t if isinstance(t, str) else f"[{getattr(c, 'type', 'content')} content]")
        text = _compact("\n".join(parts))
    if is_error:
        return ToolOutcome(json.dumps({"error": text}, ensure_ascii=False), True, "error")
    return ToolOutcome(text, False, "ok")


def _params(spec: MCPServerSpec) -> Any:
    from mcp import StdioServerParameters

    cmd = spec.resolved_command()
    env = dict(spec.env or {})
    return StdioServerParameters(command=cmd[0], args=cmd[1:], env=env or None, cwd=spec.cwd)


def _tail(f: Any, n: int = 1500) -> str:
    try:
        f.flush()
        f.seek(0)
        return f.read().decode("utf-8", "replace")[-n:].strip()
    except (OSError, ValueError):
        return ""


async def _open(stack: AsyncExitStack, spec: MCPServerSpec, timeout_s: float) -> Any:
    try:
        from mcp import Client
        from mcp.client.stdio import stdio_client
    except ImportError:
        raise MCPError("real MCP tools need the MCP Python SDK 2.x: pip install 'mcp==2.3.0'") from None

    errlog = stack.enter_context(tempfile.TemporaryFile())
    try:
        client = await stack.enter_async_context(
            Client(stdio_client(_params(spec), errlog=errlog), read_timeout_seconds=timeout_s, cache=None))
    except Exception as e:  # noqa: BLE001 - any start failure is reported with the server's stderr
        raise MCPError(f"MCP server {spec.name!r} ({' '.join(spec.resolved_command())}) did not start: "
                       f"{type(e).__name__}: {e}; stderr: {_tail(errlog) or '(empty)'}") from None
    return client


async def _list_all(client: Any) -> list:
    tools, cursor = [], None
    for _ in range(1000):
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            break
    return tools


async def import_mcp_tools(spec: MCPServerSpec, *, timeout_s: float = 60.0, category: str | None = None,
                           toolbox: "MCPToolbox | None" = None) -> list[LibraryTool]:
    """The server's tools as library rows (invalid schemas raise ToolSchemaError naming the tool).
    With `toolbox`, its session to the server is used (and kept for calls)."""
    if toolbox is not None:
        client = await toolbox._client(spec.to_json())
        tools, info = await _list_all(client), getattr(client, "server_info", None)
    else:
        async with AsyncExitStack() as stack:
            client = await _open(stack, spec, timeout_s)
            tools, info = await _list_all(client), getattr(client, "server_info", None)
    out = []
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for t in tools:
        schema = t.input_schema if isinstance(t.input_schema, dict) else dict(t.input_schema)
        schema = {k: v for k, v in schema.items() if k != "title"} if "title" in schema else schema
        out.append(validate_tool({
            "name": sanitize_name(t.name), "description": (t.description or t.title or t.name).strip(),
            "parameters": schema, "source": "mcp", "category": category or spec.category or f"mcp/{spec.name}",
            "domain": spec.name, "server": spec.to_json(),
            "provenance": {"server": spec.name, "mcp_name": t.name, "imported": now,
                           "server_info": {"name": getattr(info, "name", None), "version": getattr(info, "version", None)}},
        }, strict=False))
    return out


class MCPToolbox:
    """Sessions to the real servers of one trajectory (async context manager; see the module doc)."""

    def __init__(self, *, call_timeout_s: float = 30.0, start_timeout_s: float = 60.0):
        self.call_timeout_s, self.start_timeout_s = call_timeout_s, start_timeout_s
        self._stack: AsyncExitStack | None = None
        self._clients: dict[str, Any] = {}
        self._lock = asyncio.Lock()
        self.started: list[str] = []

    async def __aenter__(self) -> "MCPToolbox":
        self._stack = AsyncExitStack()
        await self._stack.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        stack, self._stack = self._stack, None
        self._clients.clear()
        if stack is not None:
            await stack.__aexit__(*exc)

    async def _client(self, server: dict) -> Any:
        spec = MCPServerSpec.from_json(server)
        key = json.dumps(spec.to_json(), sort_keys=True)
        async with self._lock:
            if key not in self._clients:
                if self._stack is None:
                    raise RuntimeError("MCPToolbox: use it as `async with MCPToolbox() as tb:`")
                self._clients[key] = await _open(self._stack, spec, self.start_timeout_s)
                self.started.append(spec.name)
            return self._clients[key]

    async def call(self, tool: LibraryTool, args: dict) -> ToolOutcome:
        if not tool.real:
            raise ValueError(f"{tool.name} is not an MCP tool")
        client = await self._client(tool.server)
        name = tool.provenance.get("mcp_name", tool.name)
        try:
            res = await client.call_tool(name, args, read_timeout_seconds=self.call_timeout_s)
        except Exception as e:  # noqa: BLE001 - a protocol error or timeout is the tool failing, shown to the agent
            msg = f"{type(e).__name__}: {e}"
            return ToolOutcome(json.dumps({"error": f"{tool.name} failed: {msg[:500]}"}), True, "error",
                               {"exception": msg[:500]})
        return outcome_from_result(res)


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def background_loop() -> asyncio.AbstractEventLoop:
    """One daemon thread running an event loop, shared by synchronous callers of async code."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None or _LOOP.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="k2sys-synth-loop", daemon=True).start()
            _LOOP = loop
        return _LOOP


class SyncToolbox:
    """MCPToolbox for synchronous code: one owner task on the background loop holds the sessions
    (they must be opened and closed in one task) and serves calls in order."""

    def __init__(self, **kw: Any):
        self._loop = background_loop()
        self._queue: asyncio.Queue | None = None
        self._ready = concurrent.futures.Future()
        self._done = asyncio.run_coroutine_threadsafe(self._owner(kw), self._loop)
        self._ready.result(timeout=30)

    async def _owner(self, kw: dict) -> None:
        self._queue = asyncio.Queue()
        async with MCPToolbox(**kw) as tb:
            self._ready.set_result(True)
            while True:
                item = await self._queue.get()
                if item is None:
                    break
                tool, args, fut = item
                try:
                    fut.set_result(await tb.call(tool, args))
                except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                    fut.set_exception(e)

    def call(self, tool: LibraryTool, args: dict, timeout_s: float = 120.0) -> ToolOutcome:
        if self._done.done():
            raise RuntimeError("SyncToolbox is closed")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (tool, args, fut))
        return fut.result(timeout=timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        if not self._done.done():
            self._loop.call_soon_threadsafe(self._queue.put_nowait, None)
            try:
                self._done.result(timeout=timeout_s)
            except Exception:  # noqa: BLE001 - closing is best effort; the servers die with their stdin
                pass

    def __del__(self) -> None:
        try:
            if not self._done.done() and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._queue.put_nowait, None)
        except Exception:  # noqa: BLE001
            pass
