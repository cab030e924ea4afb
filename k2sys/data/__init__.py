"""SFT data: chat JSONL with validation reports, tokenization + loss masks, packing, synthesis.

User data sets (RL prompts and SFT chats from JSONL, Parquet, `datasets` save_to_disk directories,
with key mapping): see `k2sys.data.sources`.

Batch format: see `k2sys.data.packing` (tokens, labels, loss_mask, position_ids, segment_ids,
cu_seqlens). Tool-use data synthesis: `k2sys.data.synth`.
"""

from .jsonl import (BadDataError, BadRow, ChatRow, LoadReport, RowError, load_chat_jsonl, normalize_conversation,
                    read_chat_jsonl, write_chat_jsonl, write_jsonl)
from .packing import BATCH_KEYS, collate_rows, first_fit_decreasing, take_packed
from .sources import PromptRecord, SourceReport, load_chat_rows, load_prompts, read_records, source_format
from .sft_dataset import (Cursor, Sample, SFTData, SFTDataConfig, build_sft_data, chat_tokenize_fn, heldout_score,
                          load_sft_data)

__all__ = [
    "BATCH_KEYS", "BadDataError", "BadRow", "ChatRow", "Cursor", "LoadReport", "PromptRecord", "RowError",
    "SFTData", "SourceReport", "load_chat_rows", "load_prompts", "read_records", "source_format",
    "SFTDataConfig", "Sample", "build_sft_data", "chat_tokenize_fn", "collate_rows", "first_fit_decreasing",
    "heldout_score", "load_chat_jsonl", "load_sft_data", "normalize_conversation",
    "read_chat_jsonl", "take_packed", "write_chat_jsonl", "write_jsonl",
]
