"""Packing: whole sequences only, nothing lost, boundaries masked, positions restart; the packed
batch gives the same loss as running each conversation alone (a toy attention model as reference)."""

import random

import numpy as np
import pytest
import torch

from k2sys.data import BATCH_KEYS, collate_rows, first_fit_decreasing, take_packed

PAD = 0


def _rand_samples(n, seed, lo=2, hi=30, vocab=50):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        L = rng.randint(lo, hi)
        ids = np.array([rng.randint(1, vocab - 1) for _ in range(L)], dtype=np.int32)
        mask = np.array([rng.random() < 0.5 for _ in range(L)], dtype=np.uint8)
        out.append((ids, mask))
    return out


def test_ffd_known_case_and_capacity():
    assert first_fit_decreasing([5, 4, 3, 3, 2, 2, 1], 10, 3) == [[0, 1, 6], [2, 3, 4, 5]]
    assert first_fit_decreasing([6, 6, 6], 10, 2) is None
    assert first_fit_decreasing([11], 10, 5) is None


@pytest.mark.parametrize("rows,seq_len", [(1, 32), (3, 40), (4, 64)])
def test_take_packed_covers_stream_in_contiguous_runs(rows, seq_len):
    lengths = [random.Random(7 + i).randint(1, 30) for i in range(200)]
    start, seen = 0, []
    while start < len(lengths):
        bins, end = take_packed(lengths, start, rows, seq_len)
        assert end > start, "every call makes progress"
        flat = sorted(i for b in bins for i in b)
        assert flat == list(range(start, end)), "a batch is exactly the contiguous run, each item once"
        assert len(bins) <= rows and all(sum(lengths[i] for i in b) <= seq_len for b in bins)
        if end < len(lengths):
            # Maximal: the run stops only where FFD cannot fit the next item either.
            assert first_fit_decreasing(lengths[start:end + 1], seq_len, rows) is None
        seen += flat
        start = end
    assert seen == list(range(len(lengths)))


def test_take_packed_rejects_over_long():
    with pytest.raises(ValueError, match="over-long"):
        take_packed([5, 50], 1, 2, 40)


def _reference_row(segs, S):
    """Straightforward per-sequence construction of one row's tensors."""
    tok, lab, lm, pos, seg, cu = [], [], [], [], [], [0]
    for k, (ids, m) in enumerate(segs, start=1):
        ids, m = list(map(int, ids)), list(map(int, m))
        tok += ids
        lab += ids[1:] + [PAD]
        lm += m[1:] + [0]
        pos += list(range(len(ids)))
        seg += [k] * len(ids)
        cu.append(len(tok))
    n_pad = S - len(tok)
    tok += [PAD] * n_pad
    lab += [PAD] * n_pad
    lm += [0] * n_pad
    pos += list(range(n_pad))
    seg += [0] * n_pad
    if n_pad:
        cu.append(S)
    return tok, lab, lm, pos, seg, cu


def test_collate_matches_per_sequence_reference():
    samples = _rand_samples(60, seed=1)
    S, B = 48, 3
    lengths = [len(s[0]) for s in samples]
    start = 0
    while start < len(samples):
        bins, end = take_packed(lengths, start, B, S)
        rows = [[samples[i] for i in b] for b in bins]
        batch = collate_rows(rows, S, PAD, num_rows=B)
        assert tuple(sorted(batch)) == tuple(sorted(BATCH_KEYS))
        assert batch["tokens"].shape == (B, S) and batch["cu_seqlens"].dtype == torch.int32
        ref_cu = [0]
        assert batch["loss_mask"].dtype == torch.float32 and batch["segment_ids"].dtype == torch.int32
        for b in range(B):
            tok, lab, lm, pos, seg, cu = _reference_row(rows[b] if b < len(rows) else [], S)
            assert batch["tokens"][b].tolist() == tok
            assert batch["labels"][b].tolist() == lab
            assert batch["loss_mask"][b].tolist() == lm
            assert batch["position_ids"][b].tolist() == pos
            assert batch["segment_ids"][b].tolist() == seg
            ref_cu += [b * S + x for x in cu[1:]]
            # No target crosses a document: wherever loss counts, the next token is in the same segment.
            nz = batch["loss_mask"][b].nonzero().flatten()
            if nz.numel():
                assert (batch["segment_ids"][b][nz] == batch["segment_ids"][b][nz + 1]).all()
                assert (batch["segment_ids"][b][nz] > 0).all()
        assert batch["cu_seqlens"].tolist() == ref_cu
        # Nothing lost: the batch holds exactly its samples' tokens and assistant targets.
        n_tok = sum(len(samples[i][0]) for b in bins for i in b)
        assert int((batch["segment_ids"] > 0).sum()) == n_tok
        assert int(batch["loss_mask"].sum()) == sum(int(samples[i][1][1:].sum()) for b in bins for i in b)
        start = end


def test_cu_seqlens_flat_thd_layout():
    a, b, c = (np.arange(1, 6), np.ones(5)), (np.arange(1, 4), np.ones(3)), (np.arange(1, 11), np.ones(10))
    batch = collate_rows([[a, b], [c]], 10, PAD, num_rows=3)
    # row 0: 5 + 3 + padding 2; row 1: 10 exactly; row 2: all padding.
    assert batch["cu_seqlens"].tolist() == [0, 5, 8, 10, 20, 30]
    cu = batch["cu_seqlens"].long()
    assert (cu[1:] > cu[:-1]).all() and set(range(10, 31, 10)) <= set(cu.tolist())
    # Positions restart at every boundary (what megatron's THD RoPE assumes).
    want = torch.cat([torch.arange(int(y - x)) for x, y in zip(cu, cu[1:])]).view(3, 10)
    assert torch.equal(batch["position_ids"], want)


class _ToyCausalLM(torch.nn.Module):
    """Test-only tiny attention LM: token + learned position embedding, one attention layer."""

    def __init__(self, vocab=50, d=16, max_pos=64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, d, generator=g))
        self.pos = torch.nn.Parameter(torch.randn(max_pos, d, generator=g) * 0.1)
        self.qkv = torch.nn.Parameter(torch.randn(d, 3 * d, generator=g) / d ** 0.5)
        self.out = torch.nn.Parameter(torch.randn(d, vocab, generator=g) / d ** 0.5)

    def forward(self, tokens, position_ids, attn_mask):  # attn_mask [B, T, T] bool, True = may attend
        x = self.emb[tokens] + self.pos[position_ids]
        q, k, v = (x @ self.qkv).chunk(3, dim=-1)
        h = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return (x + h) @ self.out


def test_packed_loss_equals_per_sequence_loss():
    samples = _rand_samples(12, seed=3, lo=3, hi=20)
    S, B = 40, 3
    bins, end = take_packed([len(s[0]) for s in samples], 0, B, S)
    used = [samples[i] for b in bins for i in b]
    batch = collate_rows([[samples[i] for i in b] for b in bins], S, PAD, num_rows=B)
    model = _ToyCausalLM()
    seg = batch["segment_ids"]
    causal = torch.tril(torch.ones(S, S, dtype=torch.bool))
    # Block-diagonal causal mask from segment ids (padding attends to itself so rows stay finite).
    mask = (seg[:, :, None] == seg[:, None, :]) & causal
    logits = model(batch["tokens"], batch["position_ids"], mask)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                                           reduction="none").reshape(B, S)
    packed = (ce * batch["loss_mask"]).sum()
    ref = torch.zeros(())
    for ids, m in used:
        t = torch.as_tensor(ids, dtype=torch.int64)[None]
        L = t.shape[1]
        lg = model(t, torch.arange(L)[None], torch.tril(torch.ones(L, L, dtype=torch.bool))[None])
        c = torch.nn.functional.cross_entropy(lg[0, :-1], t[0, 1:], reduction="none")
        ref = ref + (c * torch.as_tensor(m[1:], dtype=torch.float32)).sum()
    torch.testing.assert_close(packed, ref, rtol=1e-5, atol=1e-5)
    # The cu_seqlens view of the same boundaries gives the same attention blocks.
    ids_from_cu = torch.bucketize(torch.arange(B * S), batch["cu_seqlens"][1:].long(), right=True).reshape(B, S)
    same_cu = ids_from_cu[:, :, None] == ids_from_cu[:, None, :]
    same_seg = seg[:, :, None] == seg[:, None, :]
    assert torch.equal(same_cu, same_seg)


def test_padded_mode_shape():
    samples = _rand_samples(3, seed=5)
    batch = collate_rows([[s] for s in samples], 32, PAD, num_rows=4)
    assert batch["tokens"].shape == (4, 32)
    assert batch["segment_ids"][3].eq(0).all() and batch["loss_mask"][3].eq(0).all()
    assert batch["cu_seqlens"].tolist()[-2:] == [96, 128]
    with pytest.raises(ValueError, match="seq_len"):
        collate_rows([[(np.arange(1, 40), np.ones(39))]], 32, PAD)
