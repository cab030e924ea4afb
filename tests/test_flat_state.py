"""k2sys.trainer.flat_state: optimizer moments moved into one flat buffer keep their values, their
tensor objects and the optimizer's trajectory bit for bit; aliased state is left alone; the
Megatron backend's offload then moves a few storages instead of two per parameter."""

from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore")

from k2sys.trainer.flat_state import ALIGN_BYTES, flatten_state  # noqa: E402


def _model_and_opt(seed: int, opt_cls=torch.optim.AdamW, **kw):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in ((7, 5), (13,), (3, 4, 2), (1,), (64, 33))]
    return params, opt_cls(params, lr=1e-2, **kw)


def _step(params, opt, seed):
    g = torch.Generator().manual_seed(seed)
    opt.zero_grad()
    loss = sum((p * torch.randn(p.shape, generator=g)).sum() ** 2 for p in params)
    loss.backward()
    opt.step()


@pytest.mark.parametrize("opt_cls,kw", [(torch.optim.AdamW, {}), (torch.optim.AdamW, {"foreach": False}),
                                        (torch.optim.Adam, {"amsgrad": True}), (torch.optim.SGD, {"momentum": 0.9})])
def test_flat_state_keeps_values_objects_and_trajectory(opt_cls, kw):
    pa, oa = _model_and_opt(0, opt_cls, **kw)
    pb, ob = _model_and_opt(0, opt_cls, **kw)
    for s in range(2):
        _step(pa, oa, s), _step(pb, ob, s)
    objs = {(id(p), k): v for p, st in oa.state.items() for k, v in st.items() if torch.is_tensor(v)}
    values = {key: v.clone() for key, v in objs.items()}
    rep = flatten_state([oa])
    moved = [v for v in objs.values() if v.dim() > 0]
    assert rep["tensors"] == len(moved) and rep["buffers"] == 1
    assert len({v.untyped_storage().data_ptr() for v in moved}) == 1  # one storage for all of them
    assert all(v.data_ptr() % ALIGN_BYTES == 0 for v in moved)
    for p, st in oa.state.items():
        for k, v in st.items():
            if torch.is_tensor(v):
                assert v is objs[(id(p), k)] and torch.equal(v, values[(id(p), k)])
    assert flatten_state([oa])["tensors"] == 0  # nothing left to move
    for s in range(2, 5):
        _step(pa, oa, s), _step(pb, ob, s)
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)


def test_aliased_or_viewed_state_stays_where_it_is():
    params, opt = _model_and_opt(1)
    _step(params, opt, 0)
    states = list(opt.state.values())
    view = states[0]["exp_avg"][0]  # someone holds a view of this moment
    states[1]["exp_avg_sq"] = states[1]["exp_avg"]  # two entries sharing one tensor: the same object
    shared_before = states[1]["exp_avg"].untyped_storage().data_ptr()
    other = torch.empty(0).set_(states[2]["exp_avg"].untyped_storage())  # another tensor on its whole storage
    ptr0 = states[0]["exp_avg"].untyped_storage().data_ptr()
    flatten_state([opt])
    assert states[0]["exp_avg"].untyped_storage().data_ptr() == ptr0  # not moved: a view aliases it
    assert view.untyped_storage().data_ptr() == ptr0
    assert states[2]["exp_avg"].untyped_storage().data_ptr() == other.untyped_storage().data_ptr()
    # the shared entry moved once, as one object: both names still see the same tensor
    assert states[1]["exp_avg_sq"] is states[1]["exp_avg"]
    assert states[1]["exp_avg"].untyped_storage().data_ptr() != shared_before


def test_nothing_to_move_without_state():
    params, opt = _model_and_opt(2)
    assert flatten_state([opt]) == {"tensors": 0, "buffers": 0, "bytes": 0}


def test_backend_offload_moves_flat_state_and_training_is_unchanged(tmp_path):
    from k2sys.models import build_model, k2_tiny
    from k2sys.trainer.backend import MegatronBackend, TrainerConfig
    from k2sys.trainer.optim import OptimConfig

    ref = build_model(k2_tiny(vocab_size=128), seed=4)
    train = TrainerConfig(optim=OptimConfig(lr=1e-2))
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 128, (2, 17), generator=g)
    batch = {"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": torch.ones(2, 16)}
    a = MegatronBackend.from_model(ref, train=train)
    b = MegatronBackend.from_model(ref, train=train)
    a.train_step(batch), b.train_step(batch)
    n_opt = sum(len(o.state) for o in b._inner_optimizers())
    before = len({t.untyped_storage().data_ptr() for t in b._state_tensors()})
    rep = a.offload()
    assert rep["tensors"] <= before - 2 * n_opt + 1  # the moments: one storage instead of two per parameter
    a.onload()
    b._state_flat = True  # b keeps torch's per-parameter moments: the reference trajectory
    for _ in range(3):
        assert a.train_step(batch).loss == b.train_step(batch).loss
    for (k, x), (_, y) in zip(a.local_state().items(), b.local_state().items()):
        assert torch.equal(x, y), k
    # a checkpoint of the flat state holds each moment once (not the whole buffer per moment) and resumes
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())  # noqa: E731
    assert size(tmp_path / "a") < 1.1 * size(tmp_path / "b")
    c = MegatronBackend.from_checkpoint(tmp_path / "a")
    assert c.train_step(batch).loss == a.train_step(batch).loss
