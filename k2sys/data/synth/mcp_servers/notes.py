"""Reference MCP server: a key-value notebook whose state lives as long as the process."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

try:
    from ._common import ToolError, new_server
except ImportError:  # run as a script
    from _common import ToolError, new_server

app = new_server("notes", "A personal notebook: store, read, list, search and delete notes by key.")
MAX_KEYS, MAX_VALUE = 1000, 20000
_store: dict[str, dict] = {}   # key -> {"value", "tags", "version"}


@app.tool(description="Save a note under a key (creates it, or overwrites it and bumps its version). "
                      "Optional tags help searching later.")
def note_set(key: Annotated[str, Field(description="the note's key, e.g. 'trip/oslo'")],
             value: Annotated[str, Field(description="the note's text")],
             tags: Annotated[list[str] | None, Field(description="optional labels for note_list")] = None) -> dict:
    if not key.strip():
        raise ToolError("key must not be empty")
    if len(value) > MAX_VALUE:
        raise ToolError(f"value longer than {MAX_VALUE} characters")
    if key not in _store and len(_store) >= MAX_KEYS:
        raise ToolError(f"notebook full ({MAX_KEYS} notes); delete some first")
    version = _store.get(key, {}).get("version", 0) + 1
    _store[key] = {"value": value, "tags": sorted(set(tags or [])), "version": version}
    return {"key": key, "version": version, "notes": len(_store)}


@app.tool(description="Read the note stored under a key.")
def note_get(key: Annotated[str, Field(description="the key of the note to read")]) -> dict:
    if key not in _store:
        near = [k for k in _store if key.casefold() in k.casefold()][:5]
        raise ToolError(f"no note with key {key!r}" + (f"; similar keys: {', '.join(near)}" if near else ""))
    return {"key": key, **_store[key]}


@app.tool(description="List the keys of all notes, optionally only those starting with a prefix or carrying a tag.")
def note_list(prefix: Annotated[str, Field(description="only keys starting with this")] = "",
              tag: Annotated[str | None, Field(description="only notes with this tag")] = None) -> dict:
    keys = sorted(k for k, v in _store.items() if k.startswith(prefix) and (tag is None or tag in v["tags"]))
    return {"keys": keys, "count": len(keys)}


@app.tool(description="Find notes whose key or text contains a query (case-insensitive).")
def note_search(query: Annotated[str, Field(description="text to look for in keys and notes")]) -> dict:
    q = query.casefold()
    hits = [{"key": k, "value": v["value"][:200]} for k, v in sorted(_store.items())
            if q in k.casefold() or q in v["value"].casefold()]
    return {"query": query, "matches": hits}


@app.tool(description="Delete the note stored under a key.")
def note_delete(key: Annotated[str, Field(description="the key of the note to delete")]) -> dict:
    if _store.pop(key, None) is None:
        raise ToolError(f"no note with key {key!r}")
    return {"deleted": key, "notes": len(_store)}


if __name__ == "__main__":
    app.run("stdio")
