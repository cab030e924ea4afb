"""The coordinator's handle on its colocated engine server: start, health-check, restart, weights in.

    start(checkpoint) -> HTTPEngine client;  alive() via /health;  restart(weights) after a crash:
    a new server on the last exported checkpoint, then the trainer's current weights pushed in.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import torch

from k2sys.ckpt import hf_layout
from k2sys.engine.client import HTTPEngine
from k2sys.engine.launch import NativeLaunchConfig, ServerProcess, SGLangLaunchConfig, free_port
from k2sys.models.reference import param_shapes

log = logging.getLogger("k2sys.coordinator")


class WeightTarget:
    """Adapts HTTPEngine to the checkpoint engine's receiver API (HF-named full tensors)."""

    def __init__(self, engine: HTTPEngine, model_config: Any, dtype: torch.dtype):
        self.engine = engine
        self._layout = hf_layout(param_shapes(model_config), dtype)

    def weight_layout(self):
        return self._layout

    def begin_weight_update(self) -> None:
        self.engine.begin_weight_update()

    def update_weights_from_tensor(self, named: list[tuple[str, torch.Tensor]]) -> None:
        self.engine.update_weights(named)

    def end_weight_update(self) -> None:
        self.engine.end_weight_update()


class EngineHandle:
    def __init__(self, kind: str, run_dir: Path, port: int, max_running_requests: int, startup_timeout_s: float,
                 restarts: int, native_args: tuple[str, ...] = ()):
        self.kind, self.run_dir = kind, run_dir
        self.port = port or free_port()
        self.max_running_requests = max_running_requests
        self.startup_timeout_s = startup_timeout_s
        self.restarts_left = restarts
        self.native_args = tuple(native_args) or ("--max-running-requests", str(max_running_requests))
        self.server: ServerProcess | None = None
        self.client: HTTPEngine | None = None
        self.target: WeightTarget | None = None
        self.checkpoint: Path | None = None

    def start(self, checkpoint: Path, model_config: Any, dtype: torch.dtype) -> HTTPEngine:
        self.checkpoint = checkpoint
        # The engine computes in the trainer's dtype (not the checkpoint's torch_dtype): pushed weights
        # land without a cast and the train/inference log-prob probe compares like with like.
        dt = str(dtype).replace("torch.", "")
        if self.kind == "native":
            cfg = NativeLaunchConfig(model_path=str(checkpoint), port=self.port, extra_args=(*self.native_args,
                                                                                              "--dtype", dt))
        else:
            cfg = SGLangLaunchConfig(model_path=str(checkpoint), port=self.port, dtype=dt)
        self.server = ServerProcess(command=cfg.command(), base_url=cfg.base_url,
                                    log_path=self.run_dir / "logs" / "engine.log")
        self.server.start()
        (self.run_dir / "engine.pid").write_text(f"{self.server.proc.pid}\n")  # for operators and fault drills
        self.server.wait_healthy(timeout=self.startup_timeout_s)
        self.client = HTTPEngine(cfg.base_url, max_concurrency=self.max_running_requests)
        self.target = WeightTarget(self.client, model_config, dtype)
        log.info("engine %s up at %s on %s", self.kind, cfg.base_url, checkpoint)
        return self.client

    def alive(self) -> bool:
        return bool(self.server and self.server.running and self.client and self.client.health(timeout=5.0))

    def memory_bytes(self) -> int | None:
        try:
            info = httpx.get(self.client.base_url + "/get_server_info", timeout=5.0).json()
            return int(sum(info.get("memory_bytes", {}).values()))
        except (httpx.HTTPError, ValueError, AttributeError):
            return None

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
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.server is not None:
            self.server.stop(grace_s=10.0)
            self.server = None
