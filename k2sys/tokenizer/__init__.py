"""Tokenizers (our byte-level BPE, HF tokenizer.json, tiktoken BPE as Kimi ships it) and chat formats
(our K2 format; a checkpoint's own chat template): render, parse, SFT loss mask."""

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
from .formats import ChatFormat, K2ChatFormat, TemplateChatFormat
from .tiktoken_bpe import TiktokenTokenizer
from .train import DEFAULT_VOCAB_SIZE, chat_format_for, default_corpus, load_tokenizer, save_tokenizer, train_tokenizer

__all__ = [
    "CHAT_TEMPLATE", "DEFAULT_VOCAB_SIZE", "SPECIAL_TOKENS", "STOP_TOKENS", "ChatFormat", "K2ChatFormat",
    "ParsedAssistant", "TemplateChatFormat", "TiktokenTokenizer", "ToolCall", "canonical_messages",
    "chat_format_for", "default_corpus", "load_tokenizer", "parse_assistant", "parse_chat", "render_chat",
    "render_continuation", "save_tokenizer", "tokenize_chat", "train_tokenizer",
]
