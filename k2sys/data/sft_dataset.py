"""SFT dataset: chat JSONL -> tokenized conversations -> train/held-out split -> resumable batches.

    read_chat_jsonl (validate, report) -> tokenize with the chat template (loss mask on assistant
    tokens) -> reject over-long into the same report -> split by content hash -> per-epoch seeded
    permutation -> take_packed / one-per-row -> collate_rows (batch format: k2sys.data.packing)

Resume contract: `train_batches(start)` yields (batch, next_cursor). A batch is a pure function of
(data, config, cursor), so saving `next_cursor` with the checkpoint of the step that consumed the
batch and restarting from it reproduces exactly the batches an uninterrupted run would have seen.
The cursor carries the data fingerprint; resuming on different data or settings is refused.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .jsonl import DEFAULT_MAX_BAD_FRACTION, ChatRow, LoadReport, load_chat_jsonl
from .packing import collate_rows, take_packed

log = logging.getLogger("k2sys.data")

__all__ = ["TokenizeFn", "chat_tokenize_fn", "Sample", "Cursor", "SFTDataConfig", "SFTData", "heldout_score",
           "build_sft_data", "load_sft_data"]

# (messages, tools) -> (input_ids, assistant_mask), mask 1 on tokens the model is trained to produce.
TokenizeFn = Callable[[list[dict], "list[dict] | None"], "tuple[Sequence[int], Sequence[int]]"]


def chat_tokenize_fn(tokenizer: Any) -> TokenizeFn:
    """The K2 chat template (k2sys.tokenizer.tokenize_chat) bound to `tokenizer`."""
    from k2sys.tokenizer import tokenize_chat

    def fn(messages: list[dict], tools: list[dict] | None) -> tuple[list[int], list[int]]:
        return tokenize_chat(tokenizer, messages, tools)
    return fn


def _pad_id(tokenizer: Any) -> int:
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    pid = backend.token_to_id("[PAD]") if hasattr(backend, "token_to_id") else None
    return 0 if pid is None else int(pid)


@dataclass(frozen=True)
class Sample:
    input_ids: np.ndarray      # [L] int32
    loss_mask: np.ndarray      # [L] uint8, 1 on assistant tokens
    line: int                  # source line, for error messages and audits
    key: str                   # content hash (ChatRow.key)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Cursor:
    """Position in the training stream: the next batch starts at `index` of epoch `epoch`'s order."""

    epoch: int = 0
    index: int = 0
    fingerprint: str = ""     # SFTData.fingerprint when saved; "" skips the check

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: dict) -> "Cursor":
        return cls(int(d["epoch"]), int(d["index"]), str(d.get("fingerprint", "")))


@dataclass(kw_only=True)
class SFTDataConfig:
    path: str
    """Chat JSONL file (one {"messages", "tools"?} object per line)."""
    seq_len: int = 2048
    """Tokens per batch row; a conversation longer than this is rejected (reported, not truncated)."""
    rows_per_batch: int = 8
    """B: rows per batch (packed rows, or conversations in padded mode)."""
    pack: bool = True
    """Pack several conversations per row (segment-aware attention needed) or one per row, padded."""
    heldout_fraction: float = 0.05
    """Share of conversations, chosen by content hash, kept out of training for eval loss."""
    split_seed: int = 0
    shuffle_seed: int = 0
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION
    """Stop with an error when more than this share of rows is invalid or over-long."""

    def __post_init__(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len!r} must be an int >= 2")
        if not isinstance(self.rows_per_batch, int) or self.rows_per_batch < 1:
            raise ValueError(f"rows_per_batch={self.rows_per_batch!r} must be an int >= 1")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction={self.heldout_fraction} must be in [0, 1)")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")


def heldout_score(key: str, seed: int) -> float:
    """Uniform in [0, 1) from (seed, content hash); rows scoring below the fraction are held out.

    sha256 rather than hash(): Python's str hash is salted per process, the split must not be.
    """
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


@dataclass
class SFTData:
    config: SFTDataConfig
    train: list[Sample]
    heldout: list[Sample]
    report: LoadReport
    pad_id: int = 0
    _lengths: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError(f"{self.config.path}: no training conversations left after the held-out split; "
                             "add data or lower heldout_fraction")
        self._lengths = [len(s) for s in self.train]

    @property
    def fingerprint(self) -> str:
        """Identity of the training stream: the train rows in order plus every batching setting."""
        c = self.config
        h = hashlib.sha256(f"{c.seq_len}|{c.rows_per_batch}|{c.pack}|{c.shuffle_seed}|{self.pad_id}".encode())
        for s in self.train:
            h.update(s.key.encode())
            h.update(len(s).to_bytes(4, "little"))
        return h.hexdigest()[:16]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of train indices for `epoch` (a function of shuffle_seed and epoch only)."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.config.shuffle_seed, epoch])))
        return rng.permutation(len(self.train))

    def _batches(self, samples: list[Sample], lengths: list[int], order: np.ndarray,
                 start: int) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
        c = self.config
        ordered = [lengths[k] for k in order]
        i = start
        while i < len(order):
            if c.pack:
                bins, end = take_packed(ordered, i, c.rows_per_batch, c.seq_len)
                rows = [[(samples[order[k]].input_ids, samples[order[k]].loss_mask) for k in b] for b in bins]
            else:
                end = min(i + c.rows_per_batch, len(order))
                rows = [[(samples[order[k]].input_ids, samples[order[k]].loss_mask)] for k in range(i, end)]
            yield collate_rows(rows, c.seq_len, self.pad_id, num_rows=c.rows_per_batch), end
            i = end

    def train_batches(self, start: Cursor = Cursor(), epochs: int | None = None
                      ) -> Iterator[tuple[dict[str, torch.Tensor], Cursor]]:
        """Yield (batch, cursor of the next batch) forever, or until `epochs` epochs have ended.

        Batches never straddle epochs; the last batch of an epoch may have all-padding rows.
        """
        fp = self.fingerprint
        if start.fingerprint and start.fingerprint != fp:
            raise ValueError(f"cursor was saved for data fingerprint {start.fingerprint}, this data is {fp}: "
                             "the JSONL file, tokenizer or batching settings changed since the checkpoint")
        if start.index < 0 or start.index > len(self.train):
            raise ValueError(f"cursor index {start.index} is outside [0, {len(self.train)}]")
        epoch, index = start.epoch, start.index
        while epochs is None or epoch < epochs:
            order = self.epoch_order(epoch)
            for batch, end in self._batches(self.train, self._lengths, order, index):
                nxt = Cursor(epoch + 1, 0, fp) if end == len(order) else Cursor(epoch, end, fp)
                yield batch, nxt
            epoch, index = epoch + 1, 0

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """One pass over the held-out split in file order (same batch format)."""
        order = np.arange(len(self.heldout))
        for batch, _ in self._batches(self.heldout, [len(s) for s in self.heldout], order, 0):
            yield batch

    def batches_per_epoch(self, epoch: int = 0) -> int:
        return sum(1 for _ in self._batches(self.train, self._lengths, self.epoch_order(epoch), 0))

    def stats(self) -> dict[str, float]:
        def toks(samples: list[Sample]) -> tuple[int, int]:
            return sum(len(s) for s in samples), sum(int(s.loss_mask.sum()) for s in samples)
        t, tl = toks(self.train)
        h, hl = toks(self.heldout)
        return {"train_rows": len(self.train), "heldout_rows": len(self.heldout), "train_tokens": t,
                "train_loss_tokens": tl, "heldout_tokens": h, "heldout_loss_tokens": hl,
                "bad_rows": self.report.n_bad}


def build_sft_data(rows: list[ChatRow], report: LoadReport, config: SFTDataConfig, tokenize: TokenizeFn,
                   pad_id: int = 0) -> SFTData:
    """Tokenize validated rows, reject what the template refuses or what exceeds seq_len (into
    `report`), re-check the bad fraction, and split by content hash."""
    samples: list[tuple[float, Sample]] = []
    for row in rows:
        try:
            ids, mask = tokenize(row.messages, row.tools)
        except ValueError as e:
            report.add_bad(row.line, f"template rejected: {e}")
            continue
        if len(ids) != len(mask):
            raise RuntimeError(f"tokenize returned {len(ids)} ids but {len(mask)} mask entries (line {row.line})")
        if len(ids) > config.seq_len:
            report.add_bad(row.line, f"over-long: {len(ids)} tokens > seq_len {config.seq_len}")
            continue
        if not any(mask):
            report.add_bad(row.line, "no assistant tokens: the template marked nothing to train on")
            continue
        s = Sample(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8), row.line, row.key)
        samples.append((heldout_score(row.key, config.split_seed), s))
    report.check(config.max_bad_fraction)
    if report.n_bad:  # kept going, but never silently: the count per reason and the first lines
        log.warning("SFT data: %s", report.summary())
    train = [s for score, s in samples if score >= config.heldout_fraction]
    heldout = [s for score, s in samples if score < config.heldout_fraction]
    if config.heldout_fraction > 0 and not heldout and len(samples) >= 2:
        # Tiny files: hold out the lowest-scoring row so eval loss exists; still hash-determined.
        k = min(range(len(samples)), key=lambda j: samples[j][0])
        heldout = [samples[k][1]]
        train = [s for j, (_, s) in enumerate(samples) if j != k]
    return SFTData(config, train, heldout, report, pad_id)


def load_sft_data(config: SFTDataConfig, tokenizer: Any = None, tokenize: TokenizeFn | None = None) -> SFTData:
    """Read `config.path` and build the dataset with the K2 chat template of `tokenizer`
    (or an explicit `tokenize` function). Raises BadDataError when the file is mostly bad."""
    if (tokenizer is None) == (tokenize is None):
        raise ValueError("pass exactly one of tokenizer= (K2 chat template) or tokenize= (custom function)")
    rows, report = load_chat_jsonl(config.path)
    report.check(config.max_bad_fraction)
    fn = tokenize if tokenize is not None else chat_tokenize_fn(tokenizer)
    return build_sft_data(rows, report, config, fn, pad_id=_pad_id(tokenizer) if tokenizer is not None else 0)
