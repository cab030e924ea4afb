"""Disk full during an export and during a checkpoint commit (issue 15): a small tmpfs, mounted in a
private user + mount namespace (`unshare -rm`, no root needed), runs out of space mid-write.

Each case must end in an OSError (ENOSPC), leave what was there before byte-for-byte, and leave
no half-written file or temp directory behind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(r"""
    import errno, json, os, subprocess, sys
    from pathlib import Path

    mnt = Path(sys.argv[1])
    size_kb = int(sys.argv[2])
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)], check=True)
    out = {}

    def snapshot(root):
        return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
                for p in sorted(root.rglob("*"))}

    # 1. An HF export over an existing checkpoint directory, too big for the disk.
    import torch
    from k2sys.models import build_model, k2_tiny
    from k2sys.models.hf_io import save_hf

    model = build_model(k2_tiny(512), seed=0)
    old = mnt / "export"
    old.mkdir()
    (old / "config.json").write_text('{"old": true}')
    before = snapshot(mnt)
    try:
        save_hf(model, old)
        out["export"] = "no error"
    except OSError as e:
        out["export"] = errno.errorcode.get(e.errno, str(e.errno))
    out["export_unchanged"] = snapshot(mnt) == before
    out["export_leftovers"] = sorted(p.name for p in mnt.iterdir() if p.name != "export")

    # 2. A committed checkpoint, then the next one cut by ENOSPC: the pointer keeps naming step 1 and
    #    the cut directory is pruned (what a resume does first).
    from k2sys.coordinator.state import CommittedCheckpoints, write_json_durable

    store = CommittedCheckpoints(mnt / "rl_ckpt")
    store.root.mkdir()
    d1 = store.dir_for(1)
    d1.mkdir()
    (d1 / "model.pt").write_bytes(b"\1" * 4096)
    store.commit(1, iteration=1)
    d2 = store.dir_for(2)
    d2.mkdir()
    try:
        with open(d2 / "model.pt", "wb") as f:
            for _ in range(size_kb * 2):
                f.write(b"\2" * 1024)
                f.flush()
        out["ckpt"] = "no error"
    except OSError as e:
        out["ckpt"] = errno.errorcode.get(e.errno, str(e.errno))
    rec = store.read()
    out["pointer_step"] = rec["step"]
    out["pruned"] = store.prune()
    out["ckpt_dirs"] = sorted(p.name for p in store.root.iterdir())

    # 3. The pointer itself written on a full disk: the old pointer survives, no temp file remains.
    try:
        write_json_durable(store.pointer, {"format": rec["format"], "step": 3, "checkpoint": "step_000003",
                                           "pad": "x" * (size_kb * 2048)})
        out["pointer_write"] = "no error"
    except OSError as e:
        out["pointer_write"] = errno.errorcode.get(e.errno, str(e.errno))
    out["pointer_after"] = json.loads(store.pointer.read_text())["step"]
    out["pointer_leftovers"] = sorted(p.name for p in store.root.iterdir() if p.name.startswith("."))
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory):
    unshare = shutil.which("unshare")
    assert unshare, "util-linux `unshare` is required (apt-get install util-linux)"
    tmp = tmp_path_factory.mktemp("diskfull")
    mnt = tmp / "mnt"
    mnt.mkdir()
    script = tmp / "drill.py"
    script.write_text(SCRIPT)
    # k2-tiny at vocab 512 is ~2.6 MB in fp32: a 1 MiB disk holds the old files but not the export.
    proc = subprocess.run([unshare, "-rm", sys.executable, str(script), str(mnt), "1024"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(line[-1][len("RESULT "):])


def test_export_on_a_full_disk_fails_and_keeps_the_old_checkpoint(disk_full):
    assert disk_full["export"] == "ENOSPC"
    assert disk_full["export_unchanged"] is True  # old config.json intact, nothing new
    assert disk_full["export_leftovers"] == []  # the temp directory was removed


def test_checkpoint_cut_by_a_full_disk_is_never_committed(disk_full):
    assert disk_full["ckpt"] == "ENOSPC"
    assert disk_full["pointer_step"] == 1
    assert disk_full["pruned"] == ["step_000002"]
    assert disk_full["ckpt_dirs"] == ["latest.json", "step_000001"]


def test_pointer_write_on_a_full_disk_keeps_the_old_pointer(disk_full):
    assert disk_full["pointer_write"] == "ENOSPC"
    assert disk_full["pointer_after"] == 1
    assert disk_full["pointer_leftovers"] == []
