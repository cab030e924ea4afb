"""Transport: bucket broadcast over torch.distributed with a crc32c trailer, and the final vote.

Each broadcast message is the packed bucket followed by an 8-byte trailer holding the owner's
crc32c of the payload, so integrity costs no extra collective. Failures never leave ranks
waiting on each other: a local problem (bad checksum, an exception while staging or applying)
is recorded and the rank keeps taking part in the broadcasts; a failed collective (dead peer,
timeout) ends the update at once. `agree()` then tells every rank what failed where.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from k2sys import ext
from k2sys.ckpt.types import UpdateError

log = logging.getLogger("k2sys.ckpt")

TRAILER_BYTES = 8


@dataclass
class Failure:
    """The first thing that went wrong on this rank."""

    bucket: int
    rank: int
    reason: str


def payload_crc(buf: torch.Tensor, nbytes: int, threads: int = 0) -> int:
    if not nbytes:
        return 0
    if buf.device.type == "cpu":
        return ext.crc32c_many([buf[:nbytes]], threads)[0]
    return ext.crc32c(buf[:nbytes])


def write_trailer(buf: torch.Tensor, nbytes: int, crc: int) -> None:
    word = torch.tensor([crc], dtype=torch.int64).view(torch.uint8)
    buf[nbytes:nbytes + TRAILER_BYTES].copy_(word)


def read_trailer(buf: torch.Tensor, nbytes: int) -> int:
    return int(buf[nbytes:nbytes + TRAILER_BYTES].cpu().view(torch.int64)[0])


class BucketTransport:
    """Broadcasts of bucket buffers within `group` (None = the default group)."""

    def __init__(self, group: Optional[dist.ProcessGroup], timeout_s: float):
        if not dist.is_initialized():
            raise UpdateError("weight update: torch.distributed is not initialized (call init_process_group first)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.timeout = datetime.timedelta(seconds=timeout_s)

    def global_rank(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def broadcast_async(self, buf: torch.Tensor, owner: int):
        return dist.broadcast(buf, src=self.global_rank(owner), group=self.group, async_op=True)

    def wait(self, work, bucket: int, owner: int) -> None:
        try:
            work.wait(self.timeout)
        except Exception as e:  # gloo/NCCL raise RuntimeError subclasses with the peer in the text
            raise UpdateError(
                f"weight update aborted: broadcast of bucket {bucket} from rank {owner} failed on rank "
                f"{self.rank} ({type(e).__name__}: {str(e).strip()[:300]}); a peer rank died or timed out after "
                f"{self.timeout.total_seconds():.0f} s", bucket=bucket, rank=owner) from e

    def gather_objects(self, obj) -> list:
        out = [None] * self.world
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except Exception as e:
            raise UpdateError(f"weight update aborted: exchanging layouts failed on rank {self.rank} ({e}); "
                              f"a peer rank died or timed out") from e
        return out

    def agree(self, failure: Optional[Failure]) -> None:
        """Every rank learns every rank's first failure; raise the same UpdateError everywhere."""
        try:
            allf = self.gather_objects(failure)
        except UpdateError as e:
            raise UpdateError(f"weight update aborted: the final agreement failed on rank {self.rank}; "
                              f"{e}") from e
        bad = [(r, f) for r, f in enumerate(allf) if f is not None]
        if bad:
            reporter, f = bad[0]
            raise UpdateError(f"weight update aborted on every rank: bucket {f.bucket} (sent by rank {f.rank}) "
                              f"failed on rank {reporter}: {f.reason}; previous weights kept",
                              bucket=f.bucket, rank=f.rank)
