"""Reference MCP servers (stdio) for the tool library: real tools with real state.

    calculator   evaluate arithmetic, convert units, summary statistics       (stateless)
    notes        a key-value notebook: set/get/delete/list/search              (state per process)
    files        files in a private temporary root: write/read/list/delete/search (sandboxed paths)
    calendar     events with conflict checks, free-slot search, cancellation   (state per process)

Each module is a complete server that imports only the `mcp` SDK (so it starts without loading
k2sys or torch): `python k2sys/data/synth/mcp_servers/notes.py` (the calendar is
calendar_server.py). One process is one world: the rollout engine starts a fresh process per
trajectory, so trajectories never see each other's notes, files or events.

`REFERENCE_SERVERS` gives their launch specs; "{python}" and "{servers}" in a command are
replaced at launch by the running interpreter and this directory (see mcp_io.MCPServerSpec).
"""

from __future__ import annotations

REFERENCE_SERVERS: dict[str, dict] = {
    name: {"name": name, "command": ["{python}", "{servers}/" + module + ".py"], "category": category}
    for name, module, category in (("calculator", "calculator", "math & science"), ("notes", "notes", "productivity"),
                                   ("files", "files", "file management"),
                                   # not calendar.py: run as a script, it would shadow the stdlib module
                                   ("calendar", "calendar_server", "scheduling"))
}

__all__ = ["REFERENCE_SERVERS"]
