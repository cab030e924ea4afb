"""The coordinator's handle on its engine server: start, health-check, restart, and the weight sink.

    start(checkpoint) -> client (HTTPEngine for `k2sys serve`, SGLangEngine for sglang.launch_server)
                      -> sink  (the engine side of every weight push, k2sys.ckpt.engine_sinks):
                           engine.kind=native                  NativeServerSink (shm / CUDA IPC)
                           engine.kind=sglang, weight_sync=tensor       SGLangTensorSink (colocated)
                           engine.kind=sglang, weight_sync=distributed  SGLangDistributedSink (NCCL)
    alive() via /health;  restart() after a crash: a new server on the last exported checkpoint, whose
    weights the caller then brings to the trainer's current ones with a push.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from k2sys.coordinator.sections import EngineSection
from k2sys.engine.client import EngineHTTPError, HTTPEngine
from k2sys.engine.launch import NativeLaunchConfig, ServerProcess, SGLangLaunchConfig, free_port

log = logging.getLogger("k2sys.coordinator")

GB = 1 << 30


class EngineHandle:
    def __init__(self, section: EngineSection, run_dir: Path):
        self.section, self.kind, self.run_dir = section, section.kind, run_dir
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
        if self.kind == "native":
            return NativeLaunchConfig(model_path=str(checkpoint), port=self.port,
                                      extra_args=(*s.native_args(), "--dtype", dt))
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
        self.server.wait_healthy(timeout=self.section.startup_timeout_s)
        if self.kind == "native":
            self.client = HTTPEngine(cfg.base_url, max_concurrency=self.section.max_running_requests)
        else:
            from k2sys.engine.sglang_adapter import SGLangEngine

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
