"""K2 router top-k: Triton kernel (CPU interpreter) vs its torch reference vs HF DeepseekV3TopkRouter."""

import os

# triton picks interpreter or compiler when the kernel modules are imported: set it first.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def kern():
    import k2sys.kernels as kern
    import k2sys_triton

    if not (k2sys_triton.KERNELS_INTERPRETED or CUDA):
        pytest.fail("k2sys_triton was imported before TRITON_INTERPRET=1 was set; run with TRITON_INTERPRET=1")
    return kern


def _device():
    return "cpu" if os.environ.get("TRITON_INTERPRET", "0") != "0" or not CUDA else "cuda"


def _hf_router(E, top_k, n_group, topk_group, scale, norm, H=16, seed=0):
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(
        hidden_size=H, n_routed_experts=E, num_experts_per_tok=top_k, n_group=n_group, topk_group=topk_group,
        routed_scaling_factor=scale, norm_topk_prob=norm,
    )  # fmt: skip
    router = DeepseekV3TopkRouter(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, H, generator=g))
        router.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.3)
    return router


@pytest.mark.parametrize(
    "E,top_k,n_group,topk_group,norm,T",
    [(16, 4, 4, 2, True, 13), (7, 3, 1, 1, False, 5), (384, 8, 1, 1, True, 3), (12, 1, 3, 1, True, 1), (64, 8, 8, 4, True, 6)],
)
def test_matches_hf_router(kern, E, top_k, n_group, topk_group, norm, T):
    scale = 2.827
    router = _hf_router(E, top_k, n_group, topk_group, scale, norm)
    hidden = torch.randn(T, router.hidden_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, hf_w, hf_ids = router(hidden)
    bias = router.e_score_correction_bias
    dev = _device()
    for fn in (kern.k2_router_topk, kern.k2_router_topk_torch):
        w, ids = fn(logits.to(dev), bias.to(dev), top_k, n_group, topk_group, scale, norm)
        assert ids.dtype == torch.int32 and w.dtype == torch.float32
        # HF's topk(sorted=False) leaves the order open: compare per token as sets.
        order, hf_order = ids.long().cpu().sort(dim=1), hf_ids.sort(dim=1)
        assert torch.equal(order.values, hf_order.values), fn.__name__
        torch.testing.assert_close(w.cpu().gather(1, order.indices), hf_w.gather(1, hf_order.indices), rtol=1e-5, atol=1e-6)


# Experts per group that are not a power of two: the kernel pads each group's row of its
# [n_group, E/n_group] tile, and padding must never count as an expert (weights were off by up
# to 0.5 when it did).
@pytest.mark.parametrize(
    "E,top_k,n_group,topk_group",
    [(12, 3, 4, 2), (12, 6, 4, 3), (24, 5, 8, 3), (24, 6, 8, 2), (20, 4, 4, 2), (20, 7, 4, 3), (18, 4, 6, 2),
     (36, 8, 4, 3)],
)
@pytest.mark.parametrize("norm", [True, False])
def test_non_power_of_two_groups_match_hf_router(kern, E, top_k, n_group, topk_group, norm):
    assert (E // n_group) & (E // n_group - 1), "the case must have a non-power-of-two group size"
    scale = 2.5
    router = _hf_router(E, top_k, n_group, topk_group, scale, norm, seed=E + top_k)
    hidden = torch.randn(11, router.hidden_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, hf_w, hf_ids = router(hidden)
    bias = router.e_score_correction_bias
    dev = _device()
    w, ids = kern.k2_router_topk(logits.to(dev), bias.to(dev), top_k, n_group, topk_group, scale, norm)
    order, hf_order = ids.long().cpu().sort(dim=1), hf_ids.sort(dim=1)
    assert torch.equal(order.values, hf_order.values)
    got, want = w.cpu().gather(1, order.indices), hf_w.gather(1, hf_order.indices)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # The weights are the unbiased sigmoid scores of the chosen experts (a formula, not our code).
    s = torch.sigmoid(logits).gather(1, hf_order.values)
    want_formula = (s / s.sum(dim=1, keepdim=True) if norm else s) * scale
    torch.testing.assert_close(got, want_formula, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_equals_reference_exactly(kern, dtype):
    g = torch.Generator().manual_seed(3)
    # Integer-valued logits make ties common; both sides must break them towards lower indices.
    logits = torch.randint(-2, 3, (9, 24), generator=g).to(dtype)
    bias = torch.randint(0, 2, (24,), generator=g).float() * 0.25
    # (top_k, n_group, topk_group): groups of 4 (a power of two), 6 and 3 experts, no grouping, top-1.
    for args in [(4, 6, 3), (5, 4, 2), (6, 8, 3), (8, 1, 1), (1, 2, 1)]:
        w, ids = kern.k2_router_topk(logits.to(_device()), bias.to(_device()), *args, 1.5, True)
        rw, rids = kern.k2_router_topk_torch(logits, bias, *args, 1.5, True)
        assert torch.equal(ids.cpu(), rids), args
        torch.testing.assert_close(w.cpu(), rw, rtol=1e-6, atol=1e-7)


def test_ties_choose_lower_indices(kern):
    logits = torch.zeros(2, 16)
    w, ids = kern.k2_router_topk(logits.to(_device()), None, 4, 4, 2, 2.0, True)
    assert ids.cpu().tolist() == [[0, 1, 2, 3]] * 2
    torch.testing.assert_close(w.cpu(), torch.full((2, 4), 0.5))  # 2.0 * 1/4 each
    w, ids = kern.k2_router_topk(logits.to(_device()), None, 6, 4, 2, 1.0, False)
    assert ids.cpu().tolist() == [[0, 1, 2, 3, 4, 5]] * 2  # groups 0 and 1 kept on a tie
    torch.testing.assert_close(w.cpu(), torch.full((2, 6), 0.5))  # sigmoid(0), unnormalised


def test_bias_changes_selection_but_not_weights(kern):
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0]])
    bias = torch.zeros(8)
    _, ids = kern.k2_router_topk(logits.to(_device()), bias.to(_device()), 2, 1, 1, 1.0, True)
    assert sorted(ids.cpu()[0].tolist()) == [0, 1]
    bias[5] = 1.0  # sigmoid(-2) + 1 = 1.12 beats sigmoid(2) = 0.88
    w, ids = kern.k2_router_topk(logits.to(_device()), bias.to(_device()), 2, 1, 1, 1.0, True)
    assert ids.cpu()[0].tolist() == [5, 0]
    s = torch.sigmoid(torch.tensor([-2.0, 3.0]))  # weights use the unbiased scores
    torch.testing.assert_close(w.cpu()[0], s / s.sum())


def test_group_limiting_excludes_best_single_expert(kern):
    # Group 0 holds the best expert but its top-2 sum loses to the other groups' pairs.
    logits = torch.tensor([[5.0, -9, -9, -9, 2, 2, -9, -9, 1.8, 1.8, -9, -9, 1.5, 1.5, -9, -9]])
    w, ids = kern.k2_router_topk(logits.to(_device()), None, 4, 4, 2, 1.0, False)
    assert sorted(ids.cpu()[0].tolist()) == [4, 5, 8, 9]
    torch.testing.assert_close(w.cpu()[0], torch.sigmoid(torch.tensor([2.0, 2.0, 1.8, 1.8])))
    _, ids = kern.k2_router_topk(logits.to(_device()), None, 4, 1, 1, 1.0, False)  # no group limit
    assert 0 in ids.cpu()[0].tolist()
    router = _hf_router(16, 4, 4, 2, 1.0, False)
    with torch.no_grad():
        router.e_score_correction_bias.zero_()
        router.weight.copy_(torch.eye(16))
        _, _, hf_ids = router(logits)
    assert sorted(hf_ids[0].tolist()) == [4, 5, 8, 9]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(top_k=9), "top_k"),
        (dict(n_group=3), "n_group"),
        (dict(n_group=4, topk_group=5), "topk_group"),
        (dict(n_group=4, topk_group=1, top_k=3), "top_k"),
        (dict(n_group=8, topk_group=2, top_k=1), "E/n_group"),
    ],
)
def test_bad_arguments_name_the_field(kern, kwargs, field):
    args = dict(top_k=2, n_group=1, topk_group=1)
    args.update(kwargs)
    for fn in (kern.k2_router_topk, kern.k2_router_topk_torch):
        with pytest.raises(ValueError, match=field):
            fn(torch.zeros(2, 8), None, args["top_k"], args["n_group"], args["topk_group"])
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        kern.k2_router_topk_torch(torch.zeros(2, 8), torch.zeros(7), 2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or os.environ.get("TRITON_INTERPRET", "0") != "0", reason="needs CUDA, compiled triton")
def test_gpu_k2_shapes(kern):
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(4096, 384, device="cuda", generator=g, dtype=torch.bfloat16)
    bias = torch.randn(384, device="cuda", generator=g) * 0.1
    w, ids = kern.k2_router_topk(logits, bias, 8, 1, 1, 2.827, True)
    rw, rids = kern.k2_router_topk_torch(logits, bias, 8, 1, 1, 2.827, True)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw)
