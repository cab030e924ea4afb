"""Group-limited routing in the Megatron trainer equals DeepSeek-V3 / HF transformers for every valid config.

megatron's TopKRouter scores an expert group by the sum of its top (k / topk_group) experts; DeepSeek-V3
scores by the top 2. The trainer's K2TopKRouter uses HF's scoring, so configs with
num_experts_per_tok != 2 * topk_group train with the routing they were released with:
- the routing function vs transformers' DeepseekV3TopkRouter (sets of experts and weights), and a
  check that megatron's own scoring picks other experts on the same inputs (the case is not vacuous);
- MegatronBackend logits vs transformers' DeepseekV3ForCausalLM (fp32, max |diff| <= 1e-4) for
  16 experts in 4 groups, topk_group 2, k 3 and 6; the same with megatron's stock router differs;
- the same with trainer.moe_kernels=triton (Triton grouped experts under the CPU interpreter);
- one train step: loss and gradient norm equal transformers' (the backward through the router);
- 2 ranks (TP=2 and EP=2, torchrun on gloo): logits equal transformers'.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any k2sys_triton import (moe_kernels=triton case)

import pytest  # noqa: E402
import torch  # noqa: E402

pytestmark = pytest.mark.slow  # file total > 30 s on a 2-core CPU: scheduled first (conftest)

warnings.filterwarnings("ignore")

VOCAB = 512


def _cfg(k: int, n_group: int = 4, topk_group: int = 2, experts: int = 16):
    from k2sys.models import k2_tiny

    return dataclasses.replace(k2_tiny(VOCAB), n_routed_experts=experts, n_group=n_group, topk_group=topk_group,
                               num_experts_per_tok=k, norm_topk_prob=k > 1, routed_scaling_factor=2.5)


def _model(cfg, seed: int = 3):
    """A reference model whose routing is decided by the groups: large router weights, a real bias."""
    from k2sys.models import build_model

    m = build_model(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
            gate = m.model.layers[i].mlp.gate
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 0.5)
            gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=g) * 0.05)
    return m


def _hf_model(model, path: Path):
    import transformers

    from k2sys.models import save_hf

    save_hf(model, path)
    return transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _tokens(seed: int = 1, B: int = 2, T: int = 24):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _hf_router(E, k, n_group, topk_group, seed, H=32):
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    r = DeepseekV3TopkRouter(DeepseekV3Config(hidden_size=H, n_routed_experts=E, num_experts_per_tok=k,
                                              n_group=n_group, topk_group=topk_group, norm_topk_prob=k > 1,
                                              routed_scaling_factor=2.5))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        r.weight.copy_(torch.randn(E, H, generator=g))
        r.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.3)
    return r


# ---- the routing function ------------------------------------------------------------------
@pytest.mark.parametrize("E,k,n_group,topk_group", [(16, 3, 4, 2), (16, 6, 4, 2), (16, 1, 4, 2), (16, 4, 4, 2),
                                                    (12, 5, 4, 3), (24, 7, 8, 3), (20, 2, 4, 1)])
def test_routing_function_matches_hf_router(E, k, n_group, topk_group):
    from megatron.core.transformer.moe.moe_utils import group_limited_topk

    from k2sys.trainer.spec import k2_group_limited_routing

    r = _hf_router(E, k, n_group, topk_group, seed=E * 10 + k)
    x = torch.randn(200, r.hidden_dim, generator=torch.Generator().manual_seed(k))
    with torch.no_grad():
        logits, hf_w, hf_ids = r(x)
    probs, rmap = k2_group_limited_routing(logits, k, n_group, topk_group, 2.5, r.e_score_correction_bias)
    want_map = torch.zeros_like(rmap).scatter(1, hf_ids, True)
    assert torch.equal(rmap, want_map)
    assert torch.equal(probs.gather(1, hf_ids), hf_w) or torch.allclose(probs.gather(1, hf_ids), hf_w, atol=1e-6)
    assert int((probs != 0).sum()) == 200 * k
    if k // topk_group != 2:
        # megatron's scoring (top-(k // topk_group) per group) routes some tokens elsewhere.
        choice = logits.sigmoid() + r.e_score_correction_bias
        _, mg_ids = group_limited_topk(choice, k, 200, E, n_group, topk_group)
        mg_map = torch.zeros_like(rmap).scatter(1, mg_ids, True)
        assert not torch.equal(mg_map, want_map)


# ---- the trainer vs transformers -----------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for k in (3, 6):
        ref = _model(_cfg(k))
        out[k] = (ref, _hf_model(ref, tmp_path_factory.mktemp(f"hf{k}")))
    return out


@pytest.mark.parametrize("k", [3, 6])
def test_megatron_logits_match_transformers(models, k):
    from k2sys.trainer.backend import MegatronBackend, TrainerConfig
    from k2sys.trainer.spec import K2TopKRouter

    ref, hf = models[k]
    be = MegatronBackend.from_model(ref, train=TrainerConfig(moe_kernels="megatron"))
    routers = [m for m in be.model.modules() if isinstance(m, K2TopKRouter)]
    assert len(routers) == ref.config.num_hidden_layers - ref.config.first_k_dense_replace
    assert all(r.hf_groups for r in routers)
    keys = be.local_state()
    assert "decoder.layers.1.mlp.router.weight" in keys and "decoder.layers.1.mlp.router.expert_bias" in keys
    ids = _tokens()
    with torch.no_grad():
        want = hf(ids).logits
    assert (be.logits(ids) - want).abs().max().item() <= 1e-4


def test_stock_megatron_router_would_differ(models, monkeypatch):
    """The comparison above can fail: with megatron's own group scoring the logits move."""
    from k2sys.trainer import spec
    from k2sys.trainer.backend import MegatronBackend, TrainerConfig

    ref, hf = models[6]
    monkeypatch.setattr(spec, "_use_k2_router", lambda layer_spec: None)
    be = MegatronBackend.from_model(ref, train=TrainerConfig(moe_kernels="megatron"))
    assert not any(isinstance(m, spec.K2TopKRouter) for m in be.model.modules())
    ids = _tokens()
    with torch.no_grad():
        want = hf(ids).logits
    assert (be.logits(ids) - want).abs().max().item() > 1e-3


def test_triton_experts_logits_match_transformers(models):
    import k2sys.kernels as kern
    from k2sys.trainer.backend import MegatronBackend, TrainerConfig

    if not (kern.KERNELS_INTERPRETED or torch.cuda.is_available()):
        pytest.fail("k2sys_triton was imported before TRITON_INTERPRET=1 was set")
    ref, hf = models[3]
    be = MegatronBackend.from_model(ref, train=TrainerConfig(moe_kernels="triton"))
    assert be.fused_experts
    ids = _tokens(B=1, T=12)
    with torch.no_grad():
        want = hf(ids).logits
    assert (be.logits(ids) - want).abs().max().item() <= 1e-4


def test_train_step_loss_and_grad_norm_match_transformers(models):
    from k2sys.trainer.backend import MegatronBackend, TrainerConfig

    ref, hf = models[3]
    be = MegatronBackend.from_model(ref, train=TrainerConfig(moe_kernels="megatron"))
    g = torch.Generator().manual_seed(5)
    tok = torch.randint(0, VOCAB, (2, 17), generator=g)
    mask = (torch.rand(2, 16, generator=g) > 0.2).float()
    batch = {"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": mask}
    res = be.train_step(batch)
    hf.zero_grad()
    lp = torch.log_softmax(hf(batch["tokens"]).logits.float(), -1).gather(-1, batch["labels"][..., None])[..., 0]
    loss = -(lp * mask).sum() / mask.sum()
    loss.backward()
    norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in hf.parameters() if p.grad is not None)).item()
    router_grads = [hf.model.layers[i].mlp.gate.weight.grad for i in range(1, ref.config.num_hidden_layers)]
    assert all(gr is not None and gr.abs().max() > 0 for gr in router_grads)  # the router is trained
    assert abs(res.loss - loss.item()) <= 1e-5 * abs(loss.item())
    assert abs(res.grad_norm - norm) <= 1e-4 * norm, (res.grad_norm, norm)


def test_convert_accepts_k_not_twice_topk_group(models, tmp_path):
    from k2sys.models import save_hf
    from k2sys.trainer import convert

    ref, _ = models[3]
    save_hf(ref, tmp_path / "hf")
    # `k2sys convert` used to stop here with "Choose num_experts_per_tok = 2 * topk_group".
    assert convert.main(["hf-to-megatron", str(tmp_path / "hf"), str(tmp_path / "mg"), "--tp", "1", "--ep", "1"]) == 0
    assert convert.main(["megatron-to-hf", str(tmp_path / "mg"), str(tmp_path / "hf2")]) == 0
    from k2sys.models import load_hf

    back = load_hf(tmp_path / "hf2").state_dict()
    for name, t in ref.state_dict().items():
        assert torch.equal(back[name], t), name


def test_router_refuses_what_it_cannot_reproduce():
    from k2sys.trainer.parallel import ParallelConfig, init_parallel
    from k2sys.trainer.spec import K2TopKRouter, transformer_config

    init_parallel(ParallelConfig())
    tc = transformer_config(_cfg(3))
    tc.moe_router_score_function = "softmax"
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    with pytest.raises(ValueError, match="moe_router_score_function"):
        K2TopKRouter(tc, pg_collection=get_default_pg_collection())


# ---- 2 ranks ----------------------------------------------------------------------------------
LAYOUTS = {"tp2": (2, 1), "ep2": (1, 2)}


def _worker(out_path: str, hf_dir: str) -> None:
    import torch.distributed as dist

    from k2sys.trainer.backend import MegatronBackend, TrainerConfig
    from k2sys.trainer.parallel import ParallelConfig, shutdown

    results = {}
    for name, (tp, ep) in LAYOUTS.items():
        be = MegatronBackend.from_hf(hf_dir, ParallelConfig(tp=tp, ep=ep), TrainerConfig(moe_kernels="megatron"))
        results[name] = be.logits(_tokens()).tolist()
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))
    shutdown()


def test_two_ranks_tp2_ep2_logits_match_transformers(models, tmp_path):
    from k2sys.models import save_hf

    ref, hf = models[3]
    save_hf(ref, tmp_path / "hf")
    out = tmp_path / "logits.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).resolve()), str(out), str(tmp_path / "hf")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TRITON_INTERPRET": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    got = json.loads(out.read_text())
    with torch.no_grad():
        want = hf(_tokens()).logits
    for name in LAYOUTS:
        assert (torch.tensor(got[name]) - want).abs().max().item() <= 1e-4, name


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
