"""The Triton MoE kernels inside the engine and the Megatron trainer (the `moe_kernels` switch).

Runs the kernels in triton's CPU interpreter (TRITON_INTERPRET=1, ~9 ms per program instance):
- grouped_experts (Megatron's expert-grouped rows, per-expert weight lists) vs its torch reference,
  forward and every gradient, with in-place stacked weights, reversed order and copied fallback;
- MegatronBackend with moe_kernels=triton (K2FusedExperts) vs megatron's SequentialMLP on the
  same weights: logits, losses, grad norms and updated weights over 3 AdamW steps; weights read
  in place before and after offload/onload; same state-dict keys;
- NativeEngine with moe_kernels=triton (Triton router + fused MoE) vs the torch path: same greedy
  tokens and log-probs;
- the switch's errors name the field.
"""

import dataclasses
import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytestmark = pytest.mark.slow  # file total > 30 s on a 2-core CPU: scheduled first (conftest)

warnings.filterwarnings("ignore")

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def kern():
    import k2sys.kernels as kern

    if not (kern.KERNELS_INTERPRETED or CUDA):
        pytest.fail("k2sys_triton was imported before TRITON_INTERPRET=1 was set; run with TRITON_INTERPRET=1")
    return kern


def _experts(E, H, I, seed, layout):
    """Per-expert (w13, w2) lists laid out 'block' (views of one block), 'reversed' or 'separate'."""
    g = torch.Generator().manual_seed(seed)
    b13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    b2 = torch.randn(E, H, I, generator=g) / I**0.5
    w13 = [torch.nn.Parameter(torch.empty(0)) for _ in range(E)]
    w2 = [torch.nn.Parameter(torch.empty(0)) for _ in range(E)]
    for e in range(E):
        src = E - 1 - e if layout == "reversed" else e
        w13[e].data = b13[src].clone() if layout == "separate" else b13[src]
        w2[e].data = b2[src].clone() if layout == "separate" else b2[src]
    return w13, w2


@pytest.mark.parametrize("layout", ["block", "reversed", "separate"])
@pytest.mark.parametrize("counts", [[5, 0, 7], [1], [0, 3, 0, 2, 9]])
def test_grouped_experts_matches_reference(kern, layout, counts):
    E, H, I = len(counts), 24, 16
    w13, w2 = _experts(E, H, I, seed=E, layout=layout)
    stacked = kern.stack_views(w13)
    if layout == "separate" and E > 1:
        assert stacked is None
    else:
        assert stacked is not None and stacked[1] == (layout == "reversed" and E > 1)
        assert stacked[0].untyped_storage().data_ptr() == w13[0].untyped_storage().data_ptr()  # no copy
    P = sum(counts)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(P, H, generator=g).requires_grad_()
    p = (torch.rand(P, generator=g) + 0.1).requires_grad_()
    dout = torch.randn(P, H, generator=g)
    params = [x, p, *w13, *w2]
    got = kern.grouped_experts(x, p, torch.tensor(counts), w13, w2)
    got.backward(dout)
    got_grads = [t.grad.clone() for t in params]
    for t in params:
        t.grad = None
    want = kern.grouped_experts_torch(x, p, counts, w13, w2)
    want.backward(dout)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for t, g_ in zip(params, got_grads):  # the reference skips experts without rows: no grad = zero grad
        torch.testing.assert_close(g_, torch.zeros_like(t) if t.grad is None else t.grad, rtol=1e-4, atol=1e-5)


def test_grouped_experts_argument_errors(kern):
    w13, w2 = _experts(2, 16, 8, 0, "block")
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="probs must be"):
        kern.grouped_experts(x, torch.ones(3), [2, 2], w13, w2)
    with pytest.raises(ValueError, match="one count per local expert"):
        kern.grouped_experts(x, torch.ones(4), [4], w13, w2)
    with pytest.raises(ValueError, match="sums to 3"):
        kern.grouped_experts(x, torch.ones(4), [1, 2], w13, w2)
    with pytest.raises(ValueError, match="one tensor per local expert"):
        kern.grouped_experts(x, torch.ones(4), [2, 2], w13, w2[:1])


def test_stack_views_refuses_irregular_layouts(kern):
    block = torch.zeros(4, 3, 5)
    assert kern.stack_views([block[0], block[1], block[3]]) is None  # uneven spacing
    assert kern.stack_views([block[0], block[0]]) is None  # same tensor twice
    assert kern.stack_views([block[0], block[1, :2]]) is None  # shape differs
    flat = torch.zeros(100)
    overlapping = [flat[i * 5:i * 5 + 15].view(3, 5) for i in range(3)]
    assert kern.stack_views(overlapping) is None
    spaced = [flat[i * 20:i * 20 + 15].view(3, 5) for i in range(4)]  # gaps between experts are fine
    s, rev = kern.stack_views(spaced)
    assert not rev and s.stride() == (20, 5, 1) and s.data_ptr() == flat.data_ptr()


def test_switch_errors_name_the_field(kern, monkeypatch):
    with pytest.raises(ValueError, match="EngineConfig.moe_kernels"):
        kern.resolve_moe_kernels("fast", "cpu", "EngineConfig.moe_kernels")
    assert kern.resolve_moe_kernels("torch", "cpu") is False
    assert kern.resolve_moe_kernels("auto", "cpu") is False  # auto never picks the interpreter
    assert kern.resolve_moe_kernels("triton", "cpu") is True  # interpreter: tests only
    monkeypatch.setattr(kern, "KERNELS_INTERPRETED", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kern.resolve_moe_kernels("triton", "cpu", "TrainerConfig.moe_kernels")
    from k2sys.engine.core.config import EngineConfig, RequestError

    with pytest.raises(RequestError, match="moe_kernels"):
        EngineConfig(moe_kernels="cuda")
    from k2sys.trainer.backend import TrainerConfig

    with pytest.raises(ValueError, match="TrainerConfig.moe_kernels"):
        TrainerConfig(moe_kernels="torch").validate()  # the trainer's name for it is 'megatron'
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        TrainerConfig(moe_kernels="triton").validate()


# ------------------------------------------------------------------ Megatron trainer

VOCAB = 512


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, VOCAB, (2, 17), generator=g)
    return {"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": (torch.rand(2, 16, generator=g) > 0.2).float()}


def _run_trainer(ref, mode):
    from k2sys.trainer.backend import MegatronBackend, TrainerConfig
    from k2sys.trainer.optim import OptimConfig

    be = MegatronBackend.from_model(ref, train=TrainerConfig(optim=OptimConfig(lr=3e-3), moe_kernels=mode))
    out = {"backend": be, "logits": be.logits(_batch(0)["tokens"]).detach(), "losses": [], "norms": []}
    for i in range(3):
        r = be.train_step(_batch(i))
        out["losses"].append(r.loss)
        out["norms"].append(r.grad_norm)
    out["hf"] = be.hf_state_dict()
    return out


@pytest.fixture(scope="module")
def trainers(kern):
    from k2sys.models import build_model, k2_tiny

    ref = build_model(k2_tiny(VOCAB), seed=0)
    return {mode: _run_trainer(ref, mode) for mode in ("megatron", "triton")}


def test_trainer_fused_experts_equal_megatron(kern, trainers):
    from megatron.core.transformer.moe.experts import SequentialMLP

    from k2sys.trainer.fused_experts import K2FusedExperts

    meg, tri = trainers["megatron"], trainers["triton"]
    moe = [m for m in tri["backend"].model.modules() if isinstance(m, K2FusedExperts)]
    assert len(moe) == 3  # k2-tiny: layers 1..3 are MoE
    assert not any(isinstance(m, K2FusedExperts) for m in meg["backend"].model.modules())
    assert any(type(m) is SequentialMLP for m in meg["backend"].model.modules())
    assert tri["backend"].local_state().keys() == meg["backend"].local_state().keys()  # same checkpoints
    torch.testing.assert_close(tri["logits"], meg["logits"], rtol=1e-5, atol=1e-5)
    for a, b in zip(tri["losses"], meg["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b), (tri["losses"], meg["losses"])
    # Gradient norms: fp32 sums in another order than torch's matmuls (the tiles' BLOCK_K), grown
    # by two AdamW steps: measured 1.5e-5 relative at the third step.
    for a, b in zip(tri["norms"], meg["norms"]):
        assert abs(a - b) <= 5e-5 * abs(b), (tri["norms"], meg["norms"])
    assert meg["losses"][0] != meg["losses"][2]  # the weights did move
    for k, v in meg["hf"].items():
        torch.testing.assert_close(tri["hf"][k], v, rtol=1e-4, atol=1e-4, msg=k)


def test_trainer_reads_expert_weights_in_place(kern, trainers):
    from k2sys.trainer.fused_experts import K2FusedExperts

    be = trainers["triton"]["backend"]
    experts = [m for m in be.model.modules() if isinstance(m, K2FusedExperts)]

    def in_place():
        for m in experts:
            for ws in m.expert_weights():
                s = kern.stack_views(ws)
                if s is None or s[0].untyped_storage().data_ptr() != ws[0].untyped_storage().data_ptr():
                    return False
        return True

    assert in_place()
    before = be.logits(_batch(5)["tokens"]).detach()
    be.offload()
    be.onload()
    assert in_place()  # same storages after the round trip
    torch.testing.assert_close(be.logits(_batch(5)["tokens"]).detach(), before, rtol=0, atol=0)


# ------------------------------------------------------------------ native engine


def test_engine_triton_moe_equals_torch_path(kern, tmp_path):
    from k2sys.engine.core.config import EngineConfig, SamplingParams
    from k2sys.engine.core.engine import NativeEngine
    from k2sys.models import build_model, k2_tiny, save_hf

    cfg = dataclasses.replace(k2_tiny(vocab_size=VOCAB), initializer_range=0.05, eos_token_id=None,
                              n_group=4, topk_group=2, num_experts_per_tok=4)  # group-limited routing too
    ckpt = save_hf(build_model(cfg, seed=3), tmp_path / "tiny")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 9)]
    sp = SamplingParams(max_new_tokens=6, temperature=0.0)
    outs = {}
    for mode in ("torch", "triton"):
        with NativeEngine.from_pretrained(ckpt, EngineConfig(max_total_tokens=512, moe_kernels=mode)) as eng:
            assert eng.runner.triton_moe == (mode == "triton")
            outs[mode] = eng.generate_sglang(prompts, sp, return_logprob=True)
    for a, b in zip(outs["triton"], outs["torch"]):
        assert a["output_ids"] == b["output_ids"]
        la = [r[0] for r in a["meta_info"]["output_token_logprobs"]]
        lb = [r[0] for r in b["meta_info"]["output_token_logprobs"]]
        assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-4


# ------------------------------------------------------------------ GPU (compiled Triton)

GPU = CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs CUDA and compiled triton")
def test_gpu_grouped_experts_bf16(kern):
    E, H, I = 8, 1024, 256
    g = torch.Generator(device="cuda").manual_seed(0)
    counts = torch.randint(0, 200, (E,), generator=g, device="cuda")
    counts[3] = 0
    P = int(counts.sum())
    b13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) / H**0.5).bfloat16()
    b2 = (torch.randn(E, H, I, device="cuda", generator=g) / I**0.5).bfloat16()
    x = torch.randn(P, H, device="cuda", generator=g).bfloat16()
    p = torch.rand(P, device="cuda", generator=g) + 0.1
    ours = [x.clone().requires_grad_(), p.clone().requires_grad_()]
    w13 = [torch.nn.Parameter(b13[e]) for e in range(E)]
    w2 = [torch.nn.Parameter(b2[e]) for e in range(E)]
    ref_in = [x.float().requires_grad_(), p.clone().requires_grad_()]
    r13 = [b13[e].float().requires_grad_() for e in range(E)]
    r2 = [b2[e].float().requires_grad_() for e in range(E)]
    out = kern.grouped_experts(ours[0], ours[1], counts, w13, w2)
    ref = kern.grouped_experts_torch(ref_in[0], ref_in[1], counts.cpu(), r13, r2)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    dout = torch.randn(P, H, device="cuda", generator=g)
    out.float().backward(dout)
    ref.backward(dout)
    for a, b in zip(ours + w13 + w2, ref_in + r13 + r2):
        torch.testing.assert_close(a.grad.float(), torch.zeros_like(b) if b.grad is None else b.grad, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs CUDA and compiled triton")
def test_gpu_engine_triton_moe_equals_torch_path(kern, tmp_path):
    from k2sys.engine.core.config import EngineConfig, SamplingParams
    from k2sys.engine.core.engine import NativeEngine
    from k2sys.models import build_model, k2_tiny, save_hf

    cfg = dataclasses.replace(k2_tiny(vocab_size=VOCAB), initializer_range=0.05, eos_token_id=None)
    ckpt = save_hf(build_model(cfg, seed=3), tmp_path / "tiny")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 9, 30)]
    sp = SamplingParams(max_new_tokens=16, temperature=0.0)
    outs = {}
    for mode in ("torch", "auto"):
        conf = EngineConfig(max_total_tokens=1024, moe_kernels=mode, device="cuda", dtype="float32")
        with NativeEngine.from_pretrained(ckpt, conf) as eng:
            assert eng.runner.triton_moe == (mode == "auto")
            outs[mode] = eng.generate_sglang(prompts, sp, return_logprob=True)
    for a, b in zip(outs["auto"], outs["torch"]):
        assert a["output_ids"] == b["output_ids"]
