"""Start, health-check and stop an inference server subprocess (SGLang or `k2sys serve`).

    config.command() -> Popen (own session, so the server's children share one process group)
    -> poll GET /health until 200 (fail fast if the process dies, with its log tail)
    -> stop(): SIGTERM the group, wait, then SIGKILL whatever is left

Used by the coordinator; the server's stdout/stderr go to a log file so a failed start can
say why.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from k2sys.engine.core.config import EngineConfig


class LaunchError(RuntimeError):
    """The server did not come up (or did not go down) as asked; the message says why."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now (another process may still take it before the server binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_port(port: int) -> None:
    if not 0 < port < 65536:
        raise LaunchError(f"port: {port} is out of range; use 1..65535 (free_port() picks one)")


@dataclass(kw_only=True)
class SGLangLaunchConfig:
    """`python -m sglang.launch_server` for the colocated RL setup."""
    model_path: str
    tp_size: int = 1
    ep_size: int = 1
    """Expert parallel size (divides tp_size: sglang's MoE runs tp/ep-way TP inside each EP group)."""
    dp_size: int = 1
    """Data-parallel replicas (each tp_size GPUs)."""
    host: str = "127.0.0.1"
    port: int = 30000
    mem_fraction_static: float | None = None
    """Fraction of GPU memory for weights + KV; leave room for the trainer when colocated."""
    enable_memory_saver: bool = True
    """Needed for release/resume_memory_occupation (colocated training)."""
    dtype: str | None = None
    context_length: int | None = None
    trust_remote_code: bool = False
    skip_tokenizer_init: bool = False
    extra_args: tuple[str, ...] = ()
    python: str = sys.executable
    module: str = "sglang.launch_server"
    """The module run with `python -m` (tests run a stand-in that takes the same arguments)."""

    def __post_init__(self) -> None:
        if not self.model_path:
            raise LaunchError("model_path: empty; pass an HF checkpoint directory or hub id")
        if self.tp_size < 1 or self.ep_size < 1 or self.dp_size < 1:
            raise LaunchError(f"tp_size/ep_size/dp_size: {self.tp_size}/{self.ep_size}/{self.dp_size} must be >= 1")
        if self.tp_size % self.ep_size:
            raise LaunchError(f"ep_size: {self.ep_size} must divide tp_size {self.tp_size} (sglang splits each expert "
                              "group tp/ep ways)")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static <= 1:
            raise LaunchError(f"mem_fraction_static: {self.mem_fraction_static} must be in (0, 1]")
        _check_port(self.port)

    def command(self) -> list[str]:
        cmd = [self.python, "-m", self.module, "--model-path", str(self.model_path),
               "--tp-size", str(self.tp_size), "--host", self.host, "--port", str(self.port)]
        if self.ep_size > 1:
            cmd += ["--ep-size", str(self.ep_size)]
        if self.dp_size > 1:
            cmd += ["--dp-size", str(self.dp_size)]
        if self.mem_fraction_static is not None:
            cmd += ["--mem-fraction-static", str(self.mem_fraction_static)]
        if self.enable_memory_saver:
            cmd.append("--enable-memory-saver")
        if self.dtype:
            cmd += ["--dtype", self.dtype]
        if self.context_length:
            cmd += ["--context-length", str(self.context_length)]
        if self.trust_remote_code:
            cmd.append("--trust-remote-code")
        if self.skip_tokenizer_init:
            cmd.append("--skip-tokenizer-init")
        return cmd + list(self.extra_args)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def gpus(self) -> int:
        """GPUs the server occupies (its ranks in an NCCL weight-update group)."""
        return self.tp_size * self.dp_size


@dataclass(kw_only=True)
class NativeLaunchConfig:
    """`k2sys serve --model PATH --port P --config JSON` (run as `python -m k2sys.cli serve` so no PATH
    lookup): the engine's whole EngineConfig (and ServerOptions fields) travel as that one JSON."""
    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000
    engine: EngineConfig | None = None
    """The server's EngineConfig (device=auto is decided here, in the launching process); None = its defaults."""
    server: dict[str, Any] | None = None
    """ServerOptions fields (k2sys.engine.api.server), checked by the server; None = its defaults."""
    extra_args: tuple[str, ...] = ()
    """Flags after --config (they override its fields)."""
    module: tuple[str, ...] = ("k2sys.cli", "serve")
    """The module to run and its leading args; ("k2sys.engine.api.server",) runs the server directly."""
    python: str = sys.executable

    def __post_init__(self) -> None:
        if not self.model_path:
            raise LaunchError("model_path: empty; pass a checkpoint directory written by save_hf")
        _check_port(self.port)

    def config_json(self) -> str | None:
        """The --config argument: {"engine": EngineConfig fields, "server": ServerOptions fields}."""
        data: dict[str, Any] = {}
        if self.engine is not None:
            data["engine"] = self.engine.resolved().to_dict()
        if self.server:
            data["server"] = dict(self.server)
        return json.dumps(data, separators=(",", ":")) if data else None

    def command(self) -> list[str]:
        config = self.config_json()
        return [self.python, "-m", *self.module, "--model", str(self.model_path), "--host", self.host,
                "--port", str(self.port), *(("--config", config) if config else ()), *self.extra_args]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the launching process dies (even by kill -9), so a
    crashed coordinator leaves no orphan engine holding the device (Linux prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class ServerProcess:
    """A started server: `wait_healthy()`, then `stop()` (also on context exit)."""
    command: list[str]
    base_url: str
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = field(default=None, init=False)

    def start(self) -> ServerProcess:
        if self.proc is not None:
            raise LaunchError(f"already started (pid {self.proc.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            # a new session puts the server and its workers (sglang spawns schedulers) in one group
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            log.close()
        return self

    def log_tail(self, n_bytes: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-n_bytes:].decode("utf-8", "replace")

    def wait_healthy(self, timeout: float = 600.0, poll_s: float = 0.5) -> ServerProcess:
        if self.proc is None:
            raise LaunchError("not started; call start() first")
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise LaunchError(f"server exited with code {code} before it was healthy: {self.command}\n"
                                      f"--- {self.log_path} (tail) ---\n{self.log_tail()}")
                try:
                    if client.get(self.base_url + "/health").status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise LaunchError(f"{self.base_url}/health not 200 within {timeout:.0f} s; stopped it\n"
                                      f"--- {self.log_path} (tail) ---\n{self.log_tail()}")
                time.sleep(poll_s)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM the server's process group, then SIGKILL after `grace_s`; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout=30)
        # workers that outlived the leader (or ignored SIGTERM) would hold GPU memory: kill them too
        self._signal_group(signal.SIGKILL)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def launch_server(config: SGLangLaunchConfig | NativeLaunchConfig, *, log_path: str | os.PathLike,
                  timeout: float = 600.0, env: dict[str, str] | None = None) -> ServerProcess:
    """Start the server described by `config` and return once /health answers 200."""
    server = ServerProcess(command=config.command(), base_url=config.base_url, log_path=Path(log_path), env=env)
    return server.start().wait_healthy(timeout=timeout)
