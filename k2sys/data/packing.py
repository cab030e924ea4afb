"""Sequence packing and collation into the SFT batch the trainer consumes.

Batch format (a dict of CPU tensors; B rows, S = seq_len tokens per row):

    key           shape        dtype    meaning
    tokens        [B, S]       int64    token ids; rows hold whole conversations back to back, then pad_id
    labels        [B, S]       int64    next-token target: tokens[b, t+1] when t+1 is in the same
                                        conversation, else pad_id (always a valid id, never -100,
                                        so a vocab-parallel cross entropy can index with it)
    loss_mask     [B, S]       float32  1.0 where labels[b, t] is an assistant token of the same
                                        conversation; 0.0 on prompt/tool/system targets, on padding,
                                        and at the last token of every conversation (no target
                                        crosses a document boundary)
    position_ids  [B, S]       int64    0, 1, 2, ... restarting at every conversation (and at the
                                        padding tail)
    segment_ids   [B, S]       int32    1..n_b for the conversations of row b in order, 0 on padding;
                                        attention connects equal ids of a row only (the padding
                                        tail attends to itself; it carries no loss)
    cu_seqlens    [N+1]        int32    Megatron PackedSeqParams (qkv_format="thd") boundaries over
                                        the B*S tokens flattened row-major: 0, ..., B*S, strictly
                                        rising; every row end (multiple of S) is a boundary and a
                                        padding tail is a segment of its own. Pass as cu_seqlens_q/kv;
                                        max_seqlen = max(diff(cu_seqlens)). The trainer slices rows
                                        for data parallelism by cutting at row ends.

Loss on a batch: sum(loss_mask * ce(logits, labels)) / sum(loss_mask). The padded (unpacked)
mode uses the same format with one conversation per row (cu_seqlens then marks each row's
conversation and its padding tail); attention must honour cu_seqlens / segment_ids in both.

Packing keeps every conversation whole: `take_packed` consumes a contiguous run of the epoch
order (so a data cursor is one integer) and places it by first-fit decreasing into B bins of S.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["BATCH_KEYS", "first_fit_decreasing", "take_packed", "collate_rows"]

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids", "cu_seqlens")


def first_fit_decreasing(lengths: Sequence[int], capacity: int, max_bins: int) -> list[list[int]] | None:
    """Place items (indices into `lengths`) into at most `max_bins` bins of `capacity`.

    Longest first, each into the first bin with room (ties keep input order, so the result is
    deterministic). Returns the bins (lists of indices, in placement order) or None if FFD needs
    more than `max_bins` bins.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            return None
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            if len(bins) == max_bins:
                return None
            bins.append([i])
            free.append(capacity - n)
    return bins


def take_packed(lengths: Sequence[int], start: int, rows: int, seq_len: int) -> tuple[list[list[int]], int]:
    """Pack the longest run lengths[start:end] that fits in `rows` bins of `seq_len`.

    Returns (bins of absolute indices, end). Items are added in order; each one goes first-fit
    into the current bins, and only when it fits nowhere is the whole run re-packed by FFD (a
    better arrangement may still fit). The run stops at the first item for which neither works,
    so the batch is a pure function of (lengths, start) and resuming at `end` is exact.
    """
    if start >= len(lengths):
        return [], start
    if lengths[start] > seq_len:
        raise ValueError(f"item {start} has {lengths[start]} tokens > seq_len {seq_len}; "
                         "over-long conversations must be rejected before packing")
    bins: list[list[int]] = []
    free: list[int] = []
    end = start
    while end < len(lengths):
        n = lengths[end]
        placed = False
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(end)
                free[b] -= n
                placed = True
                break
        if not placed and len(bins) < rows and n <= seq_len:
            bins.append([end])
            free.append(seq_len - n)
            placed = True
        if not placed:
            run = list(range(start, end + 1))
            ffd = first_fit_decreasing([lengths[i] for i in run], seq_len, rows)
            if ffd is None:
                break
            bins = [[run[k] for k in b] for b in ffd]
            free = [seq_len - sum(lengths[i] for i in b) for b in bins]
        end += 1
    return bins, end


def collate_rows(rows: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], seq_len: int, pad_id: int,
                 num_rows: int | None = None) -> dict[str, torch.Tensor]:
    """Build the batch dict (module docstring) from rows of (input_ids, assistant_mask) pairs.

    `assistant_mask[t]` is 1 where input_ids[t] is an assistant token. `num_rows` pads the batch
    with all-padding rows (loss_mask 0) so every batch has the same shape, e.g. the last of an epoch.
    """
    B = len(rows) if num_rows is None else num_rows
    if B < len(rows):
        raise ValueError(f"num_rows={num_rows} is less than the {len(rows)} rows given")
    S = seq_len
    tokens = np.full((B, S), pad_id, dtype=np.int64)
    labels = np.full((B, S), pad_id, dtype=np.int64)
    loss_mask = np.zeros((B, S), dtype=np.float32)
    position_ids = np.zeros((B, S), dtype=np.int64)
    segment_ids = np.zeros((B, S), dtype=np.int32)
    cu_seqlens = [0]
    for b in range(B):
        pos = 0
        for seg, (ids, amask) in enumerate(rows[b] if b < len(rows) else (), start=1):
            n = len(ids)
            if n == 0 or len(amask) != n:
                raise ValueError(f"row {b} segment {seg}: need non-empty input_ids and a mask of the same "
                                 f"length, got {n} ids and {len(amask)} mask entries")
            if pos + n > S:
                raise ValueError(f"row {b} holds {pos + n} tokens > seq_len {S}")
            tokens[b, pos:pos + n] = ids
            # Target of position t is token t+1 of the same conversation; the last token has none.
            labels[b, pos:pos + n - 1] = ids[1:]
            loss_mask[b, pos:pos + n - 1] = np.asarray(amask[1:], dtype=np.float32)
            position_ids[b, pos:pos + n] = np.arange(n)
            segment_ids[b, pos:pos + n] = seg
            pos += n
            cu_seqlens.append(b * S + pos)
        if pos < S:
            position_ids[b, pos:] = np.arange(S - pos)
            cu_seqlens.append((b + 1) * S)
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(position_ids),
        "segment_ids": torch.from_numpy(segment_ids),
        "cu_seqlens": torch.tensor(cu_seqlens, dtype=torch.int32),
    }
