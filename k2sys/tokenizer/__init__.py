"""Byte-level BPE tokenizer and the Kimi-K2 chat format (render, parse, SFT loss mask)."""

from .chat import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    STOP_TOKENS,
    ParsedAssistant,
    ToolCall,
    canonical_messages,
    parse_assistant,
    parse_chat,
    render_chat,
    render_continuation,
    tokenize_chat,
)
from .train import DEFAULT_VOCAB_SIZE, default_corpus, load_tokenizer, save_tokenizer, train_tokenizer

__all__ = [
    "CHAT_TEMPLATE", "DEFAULT_VOCAB_SIZE", "SPECIAL_TOKENS", "STOP_TOKENS", "ParsedAssistant", "ToolCall",
    "canonical_messages", "default_corpus", "load_tokenizer", "parse_assistant", "parse_chat", "render_chat",
    "render_continuation", "save_tokenizer", "tokenize_chat", "train_tokenizer",
]
