"""Rank 0 drives the trainer; every other rank of the torchrun job mirrors each call.

    rank 0:  tg.call("train_step", batch, loss)  -> broadcast (name, args) -> run locally
    rank k:  tg.follow()                         -> receive (name, args)   -> run locally, until "stop"

The trainer's methods are collectives (the same global batch on every rank), so the coordinator
(rank 0, which also owns the engine and the data) only has to tell the others what to run. With
one rank nothing is broadcast. Weight pushes are collective too (k2sys.ckpt.update_weights, the
one push path): rank 0 hands its engine's sink, the others none (they only send their shards).
"""

from __future__ import annotations

from typing import Any, Callable

import torch.distributed as dist

from k2sys.ckpt import UpdateConfig, update_weights
from k2sys.ckpt.pipeline import TrainerShards

METHODS = ("train_step", "logprobs", "offload", "onload", "save", "save_hf", "push")


class TrainerGroup:
    def __init__(self, backend: Any, rank: int, world: int, sink: Callable[[], Any] | None = None,
                 update_config: UpdateConfig | None = None):
        """sink(): the engine's weight sink (rank 0), called at each push; update_config: the push's knobs
        (equal on every rank)."""
        self.backend, self.rank, self.world = backend, rank, world
        self._sink = sink
        self.update_config = update_config or UpdateConfig()

    def _run(self, name: str, *args: Any) -> Any:
        if name == "push":
            tensors, layout = self.backend.export_shards()
            sink = self._sink() if self._sink is not None else None
            if sink is not None and args and args[0] is not None:
                sink.next_version = str(args[0])  # the policy version the engine serves after this push
            rep = update_weights(TrainerShards(layout=layout, tensors=tensors), sink, config=self.update_config)
            return {"bytes": rep.model_bytes, "bytes_copied": rep.bytes_copied, "copy_ratio": rep.copy_ratio,
                    "buckets": rep.n_buckets, "mode": rep.mode, "version": rep.version, "seconds": rep.wall_s}
        if name not in METHODS:
            raise ValueError(f"TrainerGroup: {name!r} is not a mirrored trainer method ({METHODS})")
        return getattr(self.backend, name)(*args)

    def call(self, name: str, *args: Any) -> Any:
        if self.rank != 0:
            raise RuntimeError("TrainerGroup.call: only rank 0 drives; other ranks run follow()")
        if self.world > 1:
            dist.broadcast_object_list([(name, args)], src=0)
        return self._run(name, *args)

    def stop(self) -> None:
        if self.world > 1 and self.rank == 0:
            dist.broadcast_object_list([("stop", ())], src=0)

    def follow(self) -> None:
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            name, args = box[0]
            if name == "stop":
                return
            self._run(name, *args)


def broadcast_value(value: Any, rank: int, world: int) -> Any:
    """Rank 0's `value` on every rank (decisions the followers must share, e.g. the resume point)."""
    if world == 1:
        return value
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
