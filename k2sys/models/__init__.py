"""The DeepSeek-V3 = Kimi-K2 architecture: config, HF-layout reference model, checkpoint I/O."""

from k2sys.models.config import PRESETS, ConfigError, K2Config, k2_small, k2_tiny, kimi_k2, preset
from k2sys.models.hf_io import build_model, load_config, load_hf, load_state_dict, save_hf
from k2sys.models.moe import moe_experts, route_topk
from k2sys.models.reference import K2ForCausalLM, num_params, param_shapes, route

__all__ = [
    "PRESETS", "ConfigError", "K2Config", "K2ForCausalLM", "build_model", "k2_small", "k2_tiny", "kimi_k2",
    "load_config", "load_hf", "load_state_dict", "moe_experts", "num_params", "param_shapes", "preset", "route",
    "route_topk", "save_hf",
]
