"""Checkpoints in the exact release formats (DeepSeek-V3 / Kimi-K2): FP8 block-128 weights with
weight_scale_inv, partial edge blocks, sharded index, kimi_k2 config with auto_map, an MTP layer.

The FP8 files are written here with a quantizer of this test (not the package's); every loader
(load_hf, NativeEngine.from_pretrained, MegatronBackend.from_hf, the startup reader) is checked against
transformers' DeepseekV3 on the dequantized weights, and every way of loading fails loudly on a tensor
it cannot place exactly.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import save_file

from k2sys.models import K2Config, build_model, load_hf, save_hf
from k2sys.models.checkpoint import CheckpointError, HFCheckpoint
from k2sys.models.config import ConfigError

warnings.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")

B = 128
# hidden 160, q_lora 144, kv 96+16, experts 72/136 wide: every linear has partial edge blocks.
CFG = dict(vocab_size=211, hidden_size=160, intermediate_size=200, moe_intermediate_size=72, num_hidden_layers=3,
           num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
           first_k_dense_replace=1, q_lora_rank=144, kv_lora_rank=96, qk_nope_head_dim=24, qk_rope_head_dim=16,
           v_head_dim=24, routed_scaling_factor=2.5, max_position_embeddings=256)
QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
            "AutoModel": "modeling_deepseek.DeepseekV3Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
LINEARS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
           "down_proj")


# ---- the test's own FP8 block quantizer (release semantics) -------------------------------------------
def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.float()
    rows, cols = w.shape
    sr, sc = math.ceil(rows / B), math.ceil(cols / B)
    scale = torch.empty(sr, sc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(sr):
        for j in range(sc):
            blk = w[i * B:(i + 1) * B, j * B:(j + 1) * B]
            amax = blk.abs().max().item()
            s = amax / 448.0 if amax > 0 else 1.0
            scale[i, j] = s
            q[i * B:(i + 1) * B, j * B:(j + 1) * B] = (blk / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = q.float().clone()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * B:(i + 1) * B, j * B:(j + 1) * B] *= scale[i, j]
    return out


def _quantized(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEARS


def write_release(path, model, *, n_shards=3, mtp=True, model_type="kimi_k2"):
    """An FP8 release directory: returns the dequantized fp32 state (what the model really is)."""
    path.mkdir(parents=True)
    cfg = model.config
    stored, deq = {}, {}
    for name, w in model.state_dict().items():
        if _quantized(name):
            q, s = quantize_blocks(w)
            stored[name], stored[name + "_scale_inv"] = q, s
            deq[name] = dequantize_blocks(q, s)
        else:
            keep = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
            stored[name] = w.to(keep)
            deq[name] = stored[name].float()
    if mtp:  # DeepSeek-V3 ships its MTP module as layer num_hidden_layers; loaders skip it
        n = cfg.num_hidden_layers
        stored[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
        stored[f"model.layers.{n}.enorm.weight"] = torch.ones(4, dtype=torch.bfloat16)
    names = sorted(stored)
    weight_map = {}
    for k in range(n_shards):
        part = {n: stored[n].contiguous() for n in names[k::n_shards]}
        fname = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hf = cfg.to_hf_dict()
    hf.update(model_type=model_type, auto_map=AUTO_MAP, quantization_config=QUANT, torch_dtype="bfloat16",
              num_nextn_predict_layers=1 if mtp else 0, scoring_func="sigmoid", topk_method="noaux_tc",
              moe_layer_freq=1, aux_loss_alpha=0.001, seq_aux=True, custom_release_field={"kept": [1, 2]})
    hf.pop("rope_parameters")
    (path / "config.json").write_text(json.dumps(hf))
    (path / "configuration_deepseek.py").write_text("# remote code stand-in: k2sys never imports it\n")
    (path / "modeling_deepseek.py").write_text("# remote code stand-in: k2sys never imports it\n")
    return deq


def reference(deq: dict, cfg: K2Config):
    """transformers' DeepseekV3 holding the dequantized weights."""
    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in cfg.to_hf_dict().items()
                                               if k not in ("architectures", "model_type", "auto_map")})
    m = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    experts = {}
    for name, t in deq.items():  # HF 5.x fuses experts in memory; load per-expert names through its converter
        experts[name] = t
    missing, unexpected = m.load_state_dict(_fuse_experts(experts, cfg), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return m


def _fuse_experts(state: dict, cfg: K2Config) -> dict:
    out = {k: v for k, v in state.items() if ".mlp.experts." not in k}
    for i in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts"
        E = cfg.n_routed_experts
        gate_up = torch.stack([torch.cat([state[f"{p}.{e}.gate_proj.weight"], state[f"{p}.{e}.up_proj.weight"]])
                               for e in range(E)])
        down = torch.stack([state[f"{p}.{e}.down_proj.weight"] for e in range(E)])
        out[f"{p}.gate_up_proj"], out[f"{p}.down_proj"] = gate_up, down
    return out


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    cfg = K2Config(**CFG)
    model = build_model(cfg, seed=3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(4.0)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.uniform_(0, 0.2, generator=torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("rel") / "Kimi-K2-tiny"
    deq = write_release(path, model)
    ref = reference(deq, cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_logits = ref(ids).logits
    return path, deq, ref, ids, ref_logits


# ---- loaders vs transformers on the dequantized weights -------------------------------------------------
def test_load_hf_dequantizes_exactly(release):
    path, deq, _, ids, ref_logits = release
    model = load_hf(path, dtype="float32")
    for name, t in model.state_dict().items():
        if name in deq:
            assert torch.equal(t, deq[name]), name
    with torch.no_grad():
        diff = (model(ids) - ref_logits).abs().max().item()
    assert diff <= 1e-4
    # dtype None: FP8 weights become the config's torch_dtype (bf16), not float8 and not fp32
    assert load_hf(path).model.layers[0].self_attn.q_a_proj.weight.dtype == torch.bfloat16


def test_config_keeps_release_fields(release):
    path = release[0]
    ckpt = HFCheckpoint(path)
    assert ckpt.config.model_type == "kimi_k2" and ckpt.quant.block == (128, 128) and ckpt.has_fp8
    back = ckpt.config.to_hf_dict()
    assert back["model_type"] == "kimi_k2" and back["custom_release_field"] == {"kept": [1, 2]}
    assert back["auto_map"] == AUTO_MAP and back["num_nextn_predict_layers"] == 1


def test_box_reads_are_slices_of_the_dequantized_tensor(release):
    path, deq, *_ = release
    ckpt = HFCheckpoint(path, torch.float32)
    name = "model.layers.1.self_attn.q_b_proj.weight"  # [2*40, 144]: partial column block
    full = deq[name]
    for off, size in [((0, 0), full.shape), ((7, 100), (30, 44)), ((40, 0), (40, 144)), ((0, 127), (80, 2))]:
        got = ckpt.read(name, off, size)
        assert torch.equal(got, full[off[0]:off[0] + size[0], off[1]:off[1] + size[1]])


def test_engine_from_pretrained_matches_reference(release):
    from k2sys.engine import EngineConfig, NativeEngine
    from k2sys.engine.core.config import SamplingParams

    path, deq, ref, ids, _ = release
    prompt = ids[0, :6].tolist()
    with torch.no_grad():
        seq = list(prompt)
        want_lp = []
        for _ in range(5):
            lp = torch.log_softmax(ref(torch.tensor([seq])).logits[0, -1].float(), -1)
            t = int(lp.argmax())
            want_lp.append(lp[t].item())
            seq.append(t)
    with NativeEngine.from_pretrained(path, EngineConfig(dtype="float32", max_total_tokens=4096)) as eng:
        (out,) = eng.generate_sglang([prompt], SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True),
                                     return_logprob=True)
    assert out["output_ids"] == seq[len(prompt):]
    got_lp = [x[0] for x in out["meta_info"]["output_token_logprobs"]]
    assert max(abs(a - b) for a, b in zip(got_lp, want_lp)) <= 1e-4


def test_trainer_from_hf_matches_reference(release):
    from k2sys.trainer.backend import MegatronBackend, TrainerConfig

    path, _, _, ids, ref_logits = release
    be = MegatronBackend.from_hf(path, train=TrainerConfig(dtype="float32"))
    assert (be.logits(ids) - ref_logits).abs().max().item() <= 1e-4


# ---- exports ---------------------------------------------------------------------------------------------
def test_fp8_export_is_the_release_format_and_reloads_bitwise(release, tmp_path):
    from k2sys.quant.fp8 import quantize_fp8_blocks

    path, deq, _, ids, ref_logits = release
    model = load_hf(path, dtype="float32")
    out = save_hf(model, tmp_path / "fp8", tokenizer=path, format="fp8-block128", max_shard_bytes=200_000)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == QUANT and cfg["model_type"] == "kimi_k2"
    assert cfg["auto_map"] == AUTO_MAP and (out / "modeling_deepseek.py").exists()
    assert (out / "model.safetensors.index.json").exists()
    back = HFCheckpoint(out)
    names = [n for n in back if back.is_fp8(n)]
    assert sorted(names) == sorted(n for n in deq if _quantized(n))
    expect = dict(zip(names, quantize_fp8_blocks([model.state_dict()[n] for n in names])))
    for n in names:
        q, s = expect[n]
        assert torch.equal(back.read_raw(n).view(torch.uint8), q.view(torch.uint8)), n
        assert torch.equal(back.read_raw(n + "_scale_inv"), s), n
    # The weights came from FP8 with the same block grid, so re-quantizing is exact: a lossless round trip.
    again = load_hf(out, dtype="float32")
    for n, t in again.state_dict().items():
        if n in names:
            assert torch.equal(t, deq[n]), n
    # ... and it is loadable by the test's own dequantizer, i.e. the release format.
    for n in names[:3]:
        assert torch.equal(dequantize_blocks(back.read_raw(n), back.read_raw(n + "_scale_inv")), deq[n])


def test_bf16_export_has_a_clean_config(release, tmp_path):
    path = release[0]
    model = load_hf(path, dtype="float32")
    out = save_hf(model, tmp_path / "bf16", format="bf16")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and "auto_map" not in cfg  # remote code not carried -> no auto_map
    assert cfg["model_type"] == "kimi_k2" and cfg["torch_dtype"] == "bfloat16"
    back = HFCheckpoint(out)
    assert not back.has_fp8
    assert back.tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert back.tensors["model.layers.1.self_attn.o_proj.weight"].dtype == torch.bfloat16
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32)  # transformers reads it
    assert hf.config.num_hidden_layers == CFG["num_hidden_layers"]


# ---- loud failures ---------------------------------------------------------------------------------------
def _edit(src, dst, *, drop=(), change=None, config=None):
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    idx = json.loads((dst / "model.safetensors.index.json").read_text())
    for f in sorted(set(idx["weight_map"].values())):
        t = load_file(str(dst / f))
        for k in drop:
            t.pop(k, None)
        for k, v in (change or {}).items():
            if idx["weight_map"].setdefault(k, f) == f:
                t[k] = v
        save_file(t, str(dst / f))
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if k not in drop}
    (dst / "model.safetensors.index.json").write_text(json.dumps(idx))
    if config:
        c = json.loads((dst / "config.json").read_text())
        for k, v in config.items():
            if v is None:
                c.pop(k, None)
            else:
                c[k] = v
        (dst / "config.json").write_text(json.dumps(c))
    return dst


def _all_loaders_refuse(path, match):
    from k2sys.engine import NativeEngine
    from k2sys.trainer.backend import MegatronBackend

    from k2sys.trainer.backend import TrainerConfig

    for load in (lambda: load_hf(path), lambda: NativeEngine.from_pretrained(path),
                 lambda: MegatronBackend.from_hf(path, train=TrainerConfig(dtype="float32"))):
        with pytest.raises((CheckpointError, ConfigError), match=match):
            load()


def test_fp8_weight_without_scale_is_refused_everywhere(release, tmp_path):
    name = "model.layers.2.mlp.experts.1.down_proj.weight"
    p = _edit(release[0], tmp_path / "noscale", drop=[name + "_scale_inv"])
    _all_loaders_refuse(p, "without .*scale_inv")


def test_wrong_scale_shape_is_refused(release, tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"
    p = _edit(release[0], tmp_path / "badscale", change={name + "_scale_inv": torch.ones(1, 1)})
    _all_loaders_refuse(p, "must be a float tensor of shape")


def test_fp8_without_quantization_config_is_refused(release, tmp_path):
    p = _edit(release[0], tmp_path / "noqc", config={"quantization_config": None})
    _all_loaders_refuse(p, "no quantization_config")


@pytest.mark.parametrize("qc,match", [
    ({**QUANT, "quant_method": "compressed-tensors"}, "quant_method"),
    ({**QUANT, "fmt": "e5m2"}, "fmt"),
    ({**QUANT, "weight_block_size": None}, "weight_block_size"),
    ({**QUANT, "activation_scheme": "static"}, "activation_scheme"),
    ({**QUANT, "new_knob": 1}, "unknown keys"),
])
def test_unknown_quantization_is_refused(release, tmp_path, qc, match):
    p = _edit(release[0], tmp_path / "qc", config={"quantization_config": qc})
    _all_loaders_refuse(p, match)


@pytest.mark.parametrize("field,value", [("scoring_func", "softmax"), ("topk_method", "group_limited_greedy"),
                                         ("rope_scaling", {"type": "dynamic", "factor": 2.0}),
                                         ("rope_scaling", {"type": "yarn", "factor": 2.0,
                                                           "original_max_position_embeddings": 64, "new": 1}),
                                         ("model_type", "deepseek_v2")])
def test_unrepresentable_config_is_refused(release, tmp_path, field, value):
    p = _edit(release[0], tmp_path / "cfg", config={field: value})
    _all_loaders_refuse(p, field.split("_")[0])


def test_unexpected_and_missing_tensors_are_refused(release, tmp_path):
    p = _edit(release[0], tmp_path / "extra", change={"model.layers.0.self_attn.q_a_proj.bias": torch.zeros(144)})
    _all_loaders_refuse(p, "unexpected")
    p2 = _edit(release[0], tmp_path / "missing", drop=["model.norm.weight"])
    _all_loaders_refuse(p2, "missing")


def test_startup_reader_dequantizes_into_an_engine_layout(release):
    """k2sys.ckpt.load_checkpoint on a release directory (1 gloo rank): FP8 weights arrive dequantized."""
    import datetime
    import socket

    import torch.distributed as dist

    from k2sys.ckpt import TensorSink, UpdateConfig, engine_tp_layout, load_checkpoint

    path, deq, *_ = release
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    owned = not dist.is_initialized()  # another test of this process may have set up a 1-rank group
    if owned:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=30))
    assert dist.get_world_size() == 1
    try:
        recv = TensorSink(engine_tp_layout(K2Config(**CFG), 1, 0, torch.float32))
        load_checkpoint(str(path), recv, config=UpdateConfig(bucket_bytes=1 << 16))
        name = "model.layers.1.self_attn.q_b_proj.weight"
        assert torch.equal(recv.weights[name], deq[name])
        assert torch.equal(recv.weights["model.norm.weight"], deq["model.norm.weight"])
    finally:
        if owned:
            dist.destroy_process_group()
