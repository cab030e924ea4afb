"""k2sys: the Kimi-K2 post-training system (SFT -> RL) on Megatron + SGLang/native inference."""

__version__ = "0.1.0"
