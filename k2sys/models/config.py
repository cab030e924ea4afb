"""K2Config: the DeepSeek-V3 / Kimi-K2 architecture, with HF `DeepseekV3Config` field names.

HF config.json is the interchange format (DESIGN.md): `to_hf_dict()` writes one that
`transformers.DeepseekV3ForCausalLM` loads, `from_hf_dict()` reads ours, transformers' and the
released Kimi-K2/DeepSeek-V3 ones (legacy `rope_scaling` + `rope_theta`, or `rope_parameters`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

_ROPE_TYPES = ("default", "yarn")
_MODEL_TYPES = ("deepseek_v3", "kimi_k2")
# Keys to_hf_dict writes by default: read back as defaults, not as extras.
_WRITTEN: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"], "num_nextn_predict_layers": 0}
_YARN_KEYS = {"type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
              "attention_factor", "truncate"}
# config.json fields that change the computation; each must hold the value our model implements,
# else loading is an error (never a silently different model). name -> (allowed values, what it means)
_FIXED_FIELDS: dict[str, tuple[tuple, str]] = {
    "scoring_func": (("sigmoid",), "router scores (DeepSeek-V3/Kimi-K2 use sigmoid)"),
    "topk_method": (("noaux_tc",), "router top-k (aux-loss-free with e_score_correction_bias)"),
    "moe_layer_freq": ((1,), "every layer from first_k_dense_replace on is MoE"),
    "pretraining_tp": ((1,), "no tensor-parallel slicing of the linear layers at inference"),
    "attention_dropout": ((0, 0.0), "no attention dropout"),
    "ep_size": ((1,), "the checkpoint's own expert-parallel sharding"),
    "mlp_bias": ((False,), "no MLP biases"),
}



class ConfigError(ValueError):
    """A model config field is wrong; the message names the field and the fix."""


@dataclass(kw_only=True)
class K2Config:
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 256
    """FFN width of the first `first_k_dense_replace` (dense) layers."""
    moe_intermediate_size: int = 64
    """FFN width of each routed expert (and, times n_shared_experts, of the shared expert)."""
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    n_shared_experts: int = 1
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_group: int = 1
    """Expert groups for group-limited routing; groups are ranked by the sum of their top-2 biased scores."""
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 1
    q_lora_rank: int | None = 64
    """None: a plain q_proj instead of the q_a/q_b low-rank pair."""
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    """None, or YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", "beta_fast",
    "beta_slow", "mscale", "mscale_all_dim"} (DeepSeek-V3 / Kimi-K2 config.json spelling)."""
    rope_interleave: bool = True
    """DeepSeek-V3 stores rope dims as interleaved pairs (x0,x1),(x2,x3)... (HF default True)."""
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    model_type: str = "deepseek_v3"
    """deepseek_v3 or kimi_k2 (the same architecture); kept so an export says what it was loaded as."""
    quantization_config: dict | None = None
    """How the checkpoint's weights are stored (FP8 block-128 as released); None = unquantized.
    Describes files, not the model: exports set it from their format (k2sys.models.hf_io.save_hf)."""
    extra: dict = field(default_factory=dict)
    """Unknown config.json keys, kept so a round trip does not lose them."""

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_scaling is not None:
            rs = dict(self.rope_scaling)
            rs.setdefault("type", rs.get("rope_type", "default"))
            rs.pop("rope_type", None)
            self.rope_scaling = None if rs["type"] == "default" else rs
        self.validate()

    # ---- derived -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek-V3)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.get("mscale_all_dim"):
            m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            scale *= m * m
        return scale

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"K2Config.{name}: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "intermediate_size", "moe_intermediate_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, name, f"must be a positive int, got {v!r}")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", f"must be even for RoPE, got {self.qk_rope_head_dim}")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank", "must be None or a positive int")
        need(self.num_key_value_heads == self.num_attention_heads, "num_key_value_heads",
             "MLA has one latent per token; set it equal to num_attention_heads (or leave it None)")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        has_moe = self.first_k_dense_replace < self.num_hidden_layers
        if has_moe:
            need(self.n_routed_experts > 0, "n_routed_experts", "must be > 0 when any layer is MoE")
            need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0, "n_group",
                 f"must divide n_routed_experts={self.n_routed_experts}, got {self.n_group}")
            need(self.n_routed_experts // self.n_group >= 2, "n_group",
                 "each expert group needs >= 2 experts (groups are ranked by their top-2 scores)")
            need(1 <= self.topk_group <= self.n_group, "topk_group", f"must be in [1, n_group={self.n_group}]")
            per_group = self.n_routed_experts // self.n_group
            need(1 <= self.num_experts_per_tok <= self.topk_group * per_group, "num_experts_per_tok",
                 f"must be in [1, topk_group * experts_per_group = {self.topk_group * per_group}]")
            need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
        need(self.hidden_act == "silu", "hidden_act", f"only 'silu' (SwiGLU) is supported, got {self.hidden_act!r}")
        need(self.torch_dtype in ("float32", "bfloat16", "float16"), "torch_dtype",
             f"must be one of float32, bfloat16, float16; got {self.torch_dtype!r}")
        need(self.model_type in _MODEL_TYPES, "model_type", f"must be one of {_MODEL_TYPES}, got {self.model_type!r}")
        if self.quantization_config is not None:
            FP8Block.from_config(self.quantization_config)  # raises naming the field
        rs = self.rope_scaling
        if rs is not None:
            need(rs["type"] in _ROPE_TYPES, "rope_scaling.type", f"must be one of {_ROPE_TYPES}, got {rs['type']!r}")
            if rs["type"] == "yarn":
                unknown = sorted(set(rs) - _YARN_KEYS)
                need(not unknown, "rope_scaling", f"unknown YaRN keys {unknown}; k2sys implements {sorted(_YARN_KEYS)}")
                for key in ("factor", "original_max_position_embeddings"):
                    need(key in rs, f"rope_scaling.{key}", "is required for YaRN")
                need(rs["factor"] >= 1, "rope_scaling.factor", f"must be >= 1, got {rs['factor']}")

    # ---- HF interchange --------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "rope_scaling")}
        d.update(self.extra)
        for k, v in _WRITTEN.items():
            d.setdefault(k, v)
        if d.get("quantization_config") is None:
            d.pop("quantization_config", None)
        if "eos_token_ids" in d:  # config.json had a list of eos ids
            ids = d.pop("eos_token_ids")
            d["eos_token_id"] = ids if ids and ids[0] == self.eos_token_id else self.eos_token_id
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        # transformers >= 5 reads rope_parameters; older loaders and SGLang read rope_scaling/rope_theta.
        rp: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rp.update({k: v for k, v in self.rope_scaling.items() if k != "type"})
            rp["rope_type"] = self.rope_scaling["type"]
        d["rope_parameters"] = rp
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "K2Config":
        d = dict(d)
        mt = d.get("model_type", "deepseek_v3")
        if mt not in _MODEL_TYPES:
            raise ConfigError(f"config.json model_type: expected 'deepseek_v3' or 'kimi_k2', got {mt!r}")
        for key, (allowed, meaning) in _FIXED_FIELDS.items():
            if key in d and d[key] not in allowed and d[key] is not None:
                raise ConfigError(f"config.json {key}: {d[key]!r} is not supported; k2sys implements {allowed[0]!r} "
                                  f"({meaning})")
        if "rope_scaling" in d and d["rope_scaling"] is not None and not isinstance(d["rope_scaling"], dict):
            raise ConfigError(f"config.json rope_scaling: expected an object or null, got {d['rope_scaling']!r}")
        rp = d.pop("rope_parameters", None)
        if rp:
            rp = dict(rp)
            d.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
            rtype = rp.pop("rope_type", rp.pop("type", "default"))
            if rtype != "default" and not d.get("rope_scaling"):
                d["rope_scaling"] = {"type": rtype, **rp}
        names = {f.name for f in dataclasses.fields(cls)}
        ignored = {"qk_head_dim", "head_dim", "dtype", "extra"}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "dtype" in d and "torch_dtype" not in d:
            kwargs["torch_dtype"] = str(d["dtype"]).replace("torch.", "")
        eos = kwargs.get("eos_token_id")
        if isinstance(eos, list):  # several stop ids: the first is the model's eos, all are written back
            kwargs["eos_token_id"] = eos[0] if eos else None
            d["eos_token_ids"] = eos
        extra = {k: v for k, v in d.items() if k not in names and k not in ignored and not (k in _WRITTEN and _WRITTEN[k] == v)}
        return cls(**kwargs, extra=extra)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# ---- presets -------------------------------------------------------------------------------
def k2_tiny(vocab_size: int = 2048) -> K2Config:
    """~1.5M params: trains on a 2-core CPU in minutes. 4 layers, first dense, 8 experts top-2 + shared."""
    return K2Config(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                    num_hidden_layers=4, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                    n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=64,
                    kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                    routed_scaling_factor=1.0, max_position_embeddings=1024)


def k2_small(vocab_size: int = 16384) -> K2Config:
    """Tens of millions of params, group-limited routing (4 groups, keep 2) like DeepSeek-V3."""
    return K2Config(vocab_size=vocab_size, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
                    num_hidden_layers=8, num_attention_heads=8, n_routed_experts=16, num_experts_per_tok=4,
                    n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=192,
                    kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                    routed_scaling_factor=2.5, max_position_embeddings=4096)


def kimi_k2() -> K2Config:
    """The released Kimi-K2 shapes (1.04T params): for planning and benchmarks on the meta device."""
    return K2Config(vocab_size=163840, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                    num_hidden_layers=61, num_attention_heads=64, n_routed_experts=384, num_experts_per_tok=8,
                    n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=1536,
                    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    routed_scaling_factor=2.827, max_position_embeddings=131072, rope_theta=50000.0,
                    rope_scaling={"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                                  "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
                    bos_token_id=163584, eos_token_id=163585, torch_dtype="bfloat16")


PRESETS = {"k2-tiny": k2_tiny, "k2-small": k2_small, "kimi-k2": kimi_k2}


def preset(name: str, **overrides: Any) -> K2Config:
    if name not in PRESETS:
        raise ConfigError(f"model preset {name!r} is unknown; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


# ---- quantization config --------------------------------------------------------------------------
@dataclass(frozen=True)
class FP8Block:
    """The release FP8 scheme: e4m3 weights, one fp32 scale per (block[0] x block[1]) tile."""

    block: tuple[int, int] = (128, 128)

    @classmethod
    def from_config(cls, qc: Mapping[str, Any] | None) -> "FP8Block | None":
        """Parse config.json's quantization_config; anything not representable exactly is an error."""
        if qc is None:
            return None
        if not isinstance(qc, Mapping):
            raise ConfigError(f"config.json quantization_config: expected an object, got {type(qc).__name__}")
        method = qc.get("quant_method")
        if method != "fp8":
            raise ConfigError(f"config.json quantization_config.quant_method: {method!r} is not supported; k2sys "
                              "reads 'fp8' (block-scaled e4m3, as DeepSeek-V3 / Kimi-K2 are released) and "
                              "unquantized checkpoints. Dequantize it with its own tooling first.")
        fmt = qc.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ConfigError(f"config.json quantization_config.fmt: {fmt!r} is not supported (only 'e4m3')")
        bs = qc.get("weight_block_size")
        if (not isinstance(bs, (list, tuple)) or len(bs) != 2
                or not all(isinstance(b, int) and b > 0 for b in bs)):
            raise ConfigError(f"config.json quantization_config.weight_block_size: expected two positive ints "
                              f"(e.g. [128, 128]), got {bs!r}; per-tensor or per-channel FP8 is not supported")
        act = qc.get("activation_scheme", "dynamic")
        if act != "dynamic":
            raise ConfigError(f"config.json quantization_config.activation_scheme: {act!r} is not supported "
                              "(only 'dynamic': no activation scales are stored)")
        known = {"quant_method", "fmt", "weight_block_size", "activation_scheme"}
        for key in ("ignored_layers", "modules_to_not_convert"):
            known.add(key)  # which modules stay unquantized is read from the tensors themselves
        unknown = sorted(set(qc) - known)
        if unknown:
            raise ConfigError(f"config.json quantization_config: unknown keys {unknown}; k2sys cannot tell "
                              "whether they change how weights are stored, so it refuses to guess")
        return cls((int(bs[0]), int(bs[1])))

    def to_config(self) -> dict[str, Any]:
        return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                "weight_block_size": list(self.block)}

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return (math.ceil(shape[0] / self.block[0]), math.ceil(shape[1] / self.block[1]))
