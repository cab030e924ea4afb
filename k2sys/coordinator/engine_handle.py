"""The coordinator's handle on its engine server: start, health-check, restart, and the weight sink.

    start(checkpoint) -> client (HTTPEngine for `k2sys serve`, SGLangEngine for sglang.launch_server)
                      -> sink  (the engine side of every weight push, k2sys.ckpt.engine_sinks):
                           engine.kind=native                  NativeServerSink (shm / CUDA IPC)
                           engine.kind=sglang, weight_sync=tensor       SGLangTensorSink (colocated)
                           engine.kind=sglang, weight_sync=distributed  SGLangDistributedSink (NCCL)
    alive() via /health;  restart() after a crash: a new server on the last exported checkpoint, whose
    weights the caller then brings to the trainer's current ones with a push.

Process ownership (a coordinator killed with -9 leaves nothing running):
    claim_run(run_dir)   on start: lock the run directory (one coordinator per run), reap what a dead
                         previous coordinator left (pids.json: its engine's session; and every process
                         whose environment carries K2SYS_OWNER=<run dir>|<dead pid>|...), then tag this
                         process so that everything it starts with exec carries the tag.
    The engine server gets PR_SET_PDEATHSIG at launch (k2sys.engine.launch), megatron's forked checkpoint
    writers theirs in MegatronBackend.save (which also keeps megatron from starting its Manager process);
    the reaper is the backstop for what still slips through.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from k2sys.coordinator.sections import EngineSection
from k2sys.engine.api.client import EngineHTTPError, HTTPEngine
from k2sys.engine.launch import NativeLaunchConfig, ServerProcess, SGLangLaunchConfig, free_port

log = logging.getLogger("k2sys.coordinator")

GB = 1 << 30


class EngineHandle:
    def __init__(self, section: EngineSection, run_dir: Path, claim: "RunClaim | None" = None):
        self.section, self.kind, self.run_dir = section, section.kind, run_dir
        self.claim = claim  # records the engine's pid for the next coordinator's reaper
        self.port = section.port or free_port()
        self.restarts_left = section.restarts
        self.server: ServerProcess | None = None
        self.client: HTTPEngine | None = None
        self.sink: Any = None
        self.checkpoint: Path | None = None

    def launch_config(self, checkpoint: Path, dtype: torch.dtype) -> NativeLaunchConfig | SGLangLaunchConfig:
        s = self.section
        # The engine computes in the trainer's dtype (not the checkpoint's torch_dtype): pushed weights
        # land without a cast and the train/inference log-prob probe compares like with like.
        dt = str(dtype).replace("torch.", "")
        if self.kind == "native":  # the section's EngineConfig travels whole as `k2sys serve --config`
            return NativeLaunchConfig(model_path=str(checkpoint), port=self.port,
                                      engine=dataclasses.replace(s.resolved(), dtype=dt))
        return SGLangLaunchConfig(model_path=str(checkpoint), port=self.port, tp_size=s.tp, ep_size=s.ep,
                                  dp_size=s.dp, mem_fraction_static=s.mem_fraction_static,
                                  enable_memory_saver=s.memory_saver, dtype=dt, module=s.sglang_module,
                                  extra_args=("--max-running-requests", str(s.max_running_requests)))

    def start(self, checkpoint: Path, model_config: Any, dtype: torch.dtype) -> HTTPEngine:
        self.checkpoint = checkpoint
        cfg = self.launch_config(checkpoint, dtype)
        self.server = ServerProcess(command=cfg.command(), base_url=cfg.base_url,
                                    log_path=self.run_dir / "logs" / "engine.log")
        self.server.start()
        (self.run_dir / "engine.pid").write_text(f"{self.server.proc.pid}\n")  # for operators and fault drills
        if self.claim is not None:
            self.claim.set_engine(self.server.proc.pid)
        self.server.wait_healthy(timeout=self.section.startup_timeout_s)
        if self.kind == "native":
            self.client = HTTPEngine(cfg.base_url, max_concurrency=self.section.max_running_requests)
        else:
            from k2sys.engine.api.sglang_adapter import SGLangEngine

            self.client = SGLangEngine(cfg.base_url, max_concurrency=self.section.max_running_requests,
                                       tp_size=self.section.tp)
            self.client.check_version()
            # the pushes pickle sglang's FlattenedTensorMetadata: import sglang now, not inside the first switch
            import sglang.srt.weight_sync.tensor_bucket  # noqa: F401
        self.sink = self._make_sink(cfg)
        log.info("engine %s up at %s on %s (weights in through %s)", self.kind, cfg.base_url, checkpoint,
                 type(self.sink).__name__)
        return self.client

    def _make_sink(self, cfg: NativeLaunchConfig | SGLangLaunchConfig) -> Any:
        from k2sys.ckpt.engine_sinks import NativeServerSink, SGLangDistributedSink, SGLangTensorSink

        s, bucket = self.section, self.section.update_bucket_mb << 20
        if self.kind == "native":
            return NativeServerSink(self.client, bucket_bytes=bucket)
        if s.weight_sync == "tensor":
            return SGLangTensorSink(self.client, tp_size=s.tp, bucket_bytes=bucket)
        return SGLangDistributedSink(self.client, master_address="127.0.0.1", master_port=s.sync_port or free_port(),
                                     world_size=1 + cfg.gpus, backend="nccl" if torch.cuda.is_available() else "gloo",
                                     bucket_bytes=bucket)

    def alive(self) -> bool:
        return bool(self.server and self.server.running and self.client and self.client.health(timeout=5.0))

    def memory_bytes(self) -> int | None:
        """Device memory the engine reports holding: `k2sys serve` its weights + KV bytes; SGLang the
        weight and KV-cache sizes of its /server_info memory_usage (per scheduler, summed)."""
        if self.client is None:
            return None
        try:
            info = self.client.server_info()
        except (EngineHTTPError, ValueError):
            return None
        if "memory_bytes" in info:
            return int(sum(info["memory_bytes"].values()))
        states = info.get("internal_states") or []
        usage = [st.get("memory_usage") or {} for st in states if isinstance(st, dict)]
        if not usage:
            return None
        return int(sum((u.get("weight", 0) + u.get("kvcache", 0)) * GB for u in usage))

    def restart(self, model_config: Any, dtype: torch.dtype) -> HTTPEngine:
        """Replace a dead engine with a new server on the last served checkpoint. Its weights are
        stale until the caller pushes the trainer's current ones (no trainer restart)."""
        if self.restarts_left <= 0:
            raise RuntimeError("engine died and the restart budget (engine.restarts) is used up; see "
                               f"{self.run_dir / 'logs' / 'engine.log'}")
        self.restarts_left -= 1
        log.warning("engine is not answering; restarting it (%d restarts left)", self.restarts_left)
        self.stop()
        self.port = free_port()
        return self.start(self.checkpoint, model_config, dtype)

    def stop(self) -> None:
        if self.sink is not None and callable(getattr(self.sink, "close", None)):
            self.sink.close()
        self.sink = None
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.server is not None:
            self.server.stop(grace_s=10.0)
            self.server = None
            if self.claim is not None:
                self.claim.set_engine(None)


# ---- process ownership ---------------------------------------------------------------------------
OWNER_ENV = "K2SYS_OWNER"
PIDS_FILE = "pids.json"
LOCK_FILE = "coordinator.lock"


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), None if it is gone
    or a zombie: (pid, start_ticks) names one process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _alive(rec: dict | None) -> bool:
    return bool(rec) and start_ticks(int(rec["pid"])) == rec.get("start")


def _owner_tag(run_dir: Path) -> str:
    return f"{run_dir.resolve()}|"


def _tagged(run_dir: Path) -> list[tuple[int, str]]:
    """(pid, K2SYS_OWNER value) of this user's processes tagged with this run directory."""
    prefix = f"{OWNER_ENV}={_owner_tag(run_dir)}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        for var in env.split(b"\0"):
            if var.startswith(prefix):
                out.append((int(d.name), var.decode(errors="replace").split("=", 1)[1]))
                break
    return out


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "?"


def reap_leftovers(run_dir: Path) -> list[dict]:
    """SIGKILL what a previous, dead coordinator of run_dir left running; returns what was killed."""
    if not Path("/proc").is_dir():
        return []
    me = os.getpid()
    victims: dict[int, str] = {}
    try:
        prev = json.loads((run_dir / PIDS_FILE).read_text())
    except (OSError, ValueError):
        prev = {}
    coord = prev.get("coordinator")
    if coord and not _alive(coord) and _alive(prev.get("engine")):
        victims[int(prev["engine"]["pid"])] = "engine of the dead coordinator"
    for pid, tag in _tagged(run_dir):
        _, owner_pid, owner_start = tag.rsplit("|", 2) if tag.count("|") >= 2 else ("", "", "")
        if pid == me or not owner_pid.isdigit():
            continue
        if not _alive({"pid": int(owner_pid), "start": int(owner_start) if owner_start.isdigit() else None}):
            victims.setdefault(pid, f"started by dead coordinator {owner_pid}")
    killed = []
    for pid, why in sorted(victims.items()):
        cmd = _cmd(pid)
        try:
            if pid == (prev.get("engine") or {}).get("pid"):
                os.killpg(pid, signal.SIGKILL)  # the engine leads its own session (its workers too)
            else:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
        killed.append({"pid": pid, "why": why, "cmd": cmd})
        log.warning("reaped pid %d (%s): %s", pid, why, cmd)
    return killed


class RunClaim:
    """This coordinator's hold on its run directory (see claim_run)."""

    def __init__(self, run_dir: Path, lock_fd: int, reaped: list[dict]):
        self.run_dir, self._fd, self.reaped = run_dir, lock_fd, reaped
        me = os.getpid()
        self.me = {"pid": me, "start": start_ticks(me), "pgid": os.getpgid(me)}
        self.engine: dict | None = None
        self.write()

    def write(self) -> None:
        from k2sys.coordinator.state import write_json_durable

        write_json_durable(self.run_dir / PIDS_FILE, {"coordinator": self.me, "engine": self.engine})

    def set_engine(self, pid: int | None) -> None:
        self.engine = None if pid is None else {"pid": pid, "start": start_ticks(pid)}
        self.write()

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # the lock goes with it (the kernel drops it on a kill -9 as well)
            self._fd = -1


def claim_run(run_dir: Path) -> RunClaim:
    """Lock run_dir for this coordinator (RuntimeError if a live one holds it), reap a dead one's
    leftovers, tag this process's environment so that its exec'd children can be found later."""
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            other = json.loads((run_dir / PIDS_FILE).read_text())["coordinator"]["pid"]
        except (OSError, ValueError, KeyError, TypeError):
            other = "?"
        raise RuntimeError(f"another coordinator (pid {other}) is running on {run_dir}; "
                           "wait for it or stop it") from None
    t0 = time.perf_counter()
    reaped = reap_leftovers(run_dir)
    if reaped:
        log.warning("reaped %d leftover process(es) of a previous coordinator in %.1f s", len(reaped),
                    time.perf_counter() - t0)
    me = os.getpid()
    os.environ[OWNER_ENV] = f"{_owner_tag(run_dir)}{me}|{start_ticks(me)}"
    return RunClaim(run_dir, fd, reaped)
