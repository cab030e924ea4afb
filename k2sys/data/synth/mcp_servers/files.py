"""Reference MCP server: files in a private temporary root (paths cannot leave it).

The root is $K2SYS_MCP_FILES_ROOT when set (it must exist), else a fresh temporary directory
removed when the server exits. Absolute paths, '..' escapes and symlinks out of the root are
refused; file size and count are capped.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

import atexit
import os
import shutil
import tempfile
from pathlib import Path

try:
    from ._common import ToolError, new_server
except ImportError:  # run as a script
    from _common import ToolError, new_server

app = new_server("files", "A private folder of text files: write, read, list, search and delete them.")
MAX_BYTES, MAX_FILES = 1 << 20, 500

if os.environ.get("K2SYS_MCP_FILES_ROOT"):
    ROOT = Path(os.environ["K2SYS_MCP_FILES_ROOT"]).resolve(strict=True)
else:
    ROOT = Path(tempfile.mkdtemp(prefix="k2sys-mcp-files-")).resolve()
    atexit.register(shutil.rmtree, ROOT, True)


def _path(rel: str, *, must_exist: bool = False) -> Path:
    if not isinstance(rel, str) or not rel.strip():
        raise ToolError("path must be a non-empty relative path like 'notes/todo.txt'")
    if os.path.isabs(rel) or rel.startswith("~"):
        raise ToolError(f"path {rel!r} is absolute; use a path relative to the folder")
    p = (ROOT / rel).resolve()
    if p != ROOT and ROOT not in p.parents:
        raise ToolError(f"path {rel!r} leaves the folder")
    if must_exist and not p.exists():
        raise ToolError(f"no such file or directory: {rel}")
    return p


def _rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix() or "."


@app.tool(description="Write text to a file (creating folders as needed); append=true adds to the end instead "
                      "of replacing the file.")
def write_file(path: Annotated[str, Field(description="relative path, e.g. 'reports/q1.txt'")],
               content: Annotated[str, Field(description="the text to write")],
               append: Annotated[bool, Field(description="add to the end instead of replacing")] = False) -> dict:
    p = _path(path)
    if p == ROOT or p.is_dir():
        raise ToolError(f"{path!r} is a directory")
    if not p.exists() and sum(1 for q in ROOT.rglob("*") if q.is_file()) >= MAX_FILES:
        raise ToolError(f"too many files (limit {MAX_FILES})")
    old = p.read_text(encoding="utf-8") if append and p.exists() else ""
    data = old + content
    if len(data.encode("utf-8")) > MAX_BYTES:
        raise ToolError(f"file would exceed {MAX_BYTES} bytes")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(data, encoding="utf-8")
    return {"path": _rel(p), "bytes": len(data.encode("utf-8")), "appended": append}


@app.tool(description="Read a text file.")
def read_file(path: Annotated[str, Field(description="relative path of the file")]) -> dict:
    p = _path(path, must_exist=True)
    if p.is_dir():
        raise ToolError(f"{path!r} is a directory; use list_files")
    return {"path": _rel(p), "content": p.read_text(encoding="utf-8", errors="replace")}


@app.tool(description="List the files and folders in a folder ('.' is the top), recursively if asked.")
def list_files(directory: Annotated[str, Field(description="relative folder; '.' is the top")] = ".",
               recursive: Annotated[bool, Field(description="include subfolders")] = False) -> dict:
    d = ROOT if directory in (".", "", "/") else _path(directory, must_exist=True)
    if not d.is_dir():
        raise ToolError(f"{directory!r} is a file, not a folder")
    items = sorted(d.rglob("*") if recursive else d.iterdir())
    return {"directory": _rel(d), "entries": [{"path": _rel(q), "type": "dir" if q.is_dir() else "file",
                                               "bytes": q.stat().st_size if q.is_file() else None} for q in items]}


@app.tool(description="Delete a file (or an empty folder).")
def delete_file(path: Annotated[str, Field(description="relative path of the file or empty folder")]) -> dict:
    p = _path(path, must_exist=True)
    if p == ROOT:
        raise ToolError("cannot delete the top folder")
    if p.is_dir():
        if any(p.iterdir()):
            raise ToolError(f"folder {path!r} is not empty")
        p.rmdir()
    else:
        p.unlink()
    return {"deleted": _rel(p)}


@app.tool(description="Find the files whose text contains a string (case-insensitive); returns matching lines.")
def search_files(text: Annotated[str, Field(description="text to find (case-insensitive)")]) -> dict:
    if not text:
        raise ToolError("text must not be empty")
    q, hits = text.casefold(), []
    for p in sorted(ROOT.rglob("*")):
        if p.is_file():
            for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if q in line.casefold():
                    hits.append({"path": _rel(p), "line": n, "text": line[:200]})
    return {"query": text, "matches": hits[:100]}


if __name__ == "__main__":
    app.run("stdio")
