"""Rank 0 drives the trainer; every other rank of the torchrun job mirrors each call.

    rank 0:  tg.call("train_step", batch, loss)  -> broadcast (name, args) -> run locally
    rank k:  tg.follow()                         -> receive (name, args)   -> run locally, until "stop"

The trainer's methods are collectives (the same global batch on every rank), so the coordinator
(rank 0, which also owns the engine and the data) only has to tell the others what to run. With
one rank nothing is broadcast. Weight pushes are collective too: rank 0 hands its engine as the
receiver, the others an empty one (they only send their shards).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from k2sys.ckpt import update_weights
from k2sys.ckpt.layout import Layout
from k2sys.ckpt.pipeline import TrainerShards
from k2sys.ckpt.receiver import InProcessReceiver

METHODS = ("train_step", "logprobs", "offload", "onload", "save", "save_hf", "push")


class TrainerGroup:
    def __init__(self, backend: Any, rank: int, world: int, receiver: Callable[[], Any] | None = None):
        """receiver(): the engine's weight target (rank 0), called at each push."""
        self.backend, self.rank, self.world = backend, rank, world
        self._receiver = receiver

    def _run(self, name: str, *args: Any) -> Any:
        if name == "push":
            tensors, layout = self.backend.export_shards()
            target = self._receiver() if self._receiver is not None else InProcessReceiver(Layout({}, (), "none"))
            rep = update_weights(TrainerShards(layout=layout, tensors=tensors), target)
            return {"bytes": rep.bytes_applied or rep.bytes_sent, "buckets": rep.n_buckets, "mode": rep.mode}
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


def to_cpu(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in batch.items()}
