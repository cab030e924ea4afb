"""Structured output for the native engine: regex / JSON schema / EBNF as token masks (xgrammar).

    request (sampling_params.regex | json_schema | ebnf, OpenAI response_format)
      -> grammar_factory_for(engine, params): compiled once per request (a bad grammar is a 400)
      -> one GrammarMatcher per sample: allowed_mask() before each step, accept(token) after it

The sampler sets every token outside allowed_mask() to -inf before temperature and top-k/top-p,
so the output always parses. The grammar ends the request: on a stop token it allowed (EOS or
stop_token_ids), or, for a model without any stop token, as soon as the grammar is complete
and nothing can follow.

xgrammar (the library SGLang uses; `pip install xgrammar`) needs the raw bytes of every token:
`vocabulary_bytes` reads them from a byte-level BPE `tokenizers.Tokenizer` (our own and HF
tokenizer.json files) or from a tiktoken BPE (Kimi K2). Special tokens are never part of
structured text: the grammar sees them as empty (never allowed) unless they are stop tokens.
JSON output never holds a raw control character: tokens with a byte < 0x20 are masked for
json_schema (JSON forbids them in strings; xgrammar 0.2.7's JSON rules would let them in), and
JSON is compact (any_whitespace=False), so a weak model cannot wander off into whitespace.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable

import torch

from k2sys.engine.core.config import RequestError, SamplingParams

__all__ = ["GrammarMatcher", "grammar_factory_for", "special_token_ids", "vocabulary_bytes"]


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable character -> the byte it stands for."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def special_token_ids(tokenizer: Any) -> set[int]:
    if hasattr(tokenizer, "get_added_tokens_decoder"):
        return {i for i, t in tokenizer.get_added_tokens_decoder().items() if getattr(t, "special", False)}
    specials = getattr(tokenizer, "special_tokens", None)  # TiktokenTokenizer: {text: id}
    return set(specials.values()) if isinstance(specials, dict) else set()


def vocabulary_bytes(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """The raw bytes of every token id below vocab_size (b"" for ids the tokenizer does not have)."""
    out = [b""] * vocab_size
    encoding = getattr(tokenizer, "encoding", None)
    if encoding is not None and hasattr(encoding, "decode_single_token_bytes"):  # tiktoken
        for i in range(vocab_size):
            try:
                out[i] = encoding.decode_single_token_bytes(i)
            except KeyError:
                special = getattr(tokenizer, "_special_by_id", {}).get(i)
                out[i] = special.encode() if special is not None else b""
        return out
    if not hasattr(tokenizer, "to_str"):
        raise RequestError("structured output: the tokenizer's raw token bytes are unknown (neither a tokenizers "
                           "tokenizer.json nor tiktoken)")
    spec = json.loads(tokenizer.to_str())
    decoder = spec.get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", [])]
    added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    if "ByteLevel" in kinds:
        table = _byte_decoder()
        for piece, i in vocab.items():
            if i < vocab_size:
                out[i] = bytes(table[c] for c in piece)
    elif "ByteFallback" in kinds or "Metaspace" in kinds or "Replace" in kinds:  # sentencepiece-style
        for piece, i in vocab.items():
            if i >= vocab_size:
                continue
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                out[i] = bytes([int(piece[3:5], 16)])
            else:
                out[i] = piece.replace("\u2581", " ").encode()
    else:
        raise RequestError(f"structured output: tokenizer decoder {kinds} is not supported (byte-level BPE, "
                           "sentencepiece byte-fallback or tiktoken)")
    for i, content in added.items():
        if i < vocab_size:
            out[i] = content.encode()
    return out


class _Support:
    """Per-engine xgrammar state: the tokenizer info and a compiler (with its cache)."""

    def __init__(self, engine: Any):
        try:
            import xgrammar as xgr
        except ImportError:
            raise RequestError("structured output (regex / json_schema / ebnf / response_format) needs xgrammar: "
                               "pip install xgrammar") from None
        if engine.tokenizer is None:
            raise RequestError("structured output: the model has no tokenizer")
        V = engine.model_config.vocab_size
        raw = vocabulary_bytes(engine.tokenizer, V)
        for i in special_token_ids(engine.tokenizer):
            if i < V:
                raw[i] = b""  # never structured text (stop tokens are passed separately)
        self.xgr = xgr
        self.vocab_size = V
        self.info = xgr.TokenizerInfo(raw, xgr.VocabType.RAW, vocab_size=V, stop_token_ids=[])
        # JSON forbids raw control characters in strings, but xgrammar's JSON rules let them in: tokens
        # holding a byte < 0x20 are kept out of JSON output (compact JSON needs no tab or newline).
        self.json_banned = torch.tensor([any(c < 0x20 for c in b) for b in raw], dtype=torch.bool)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self.lock = threading.Lock()

    def compile(self, kind: str, source: str) -> Any:
        c = self.compiler
        try:
            with self.lock:
                if kind == "regex":
                    return c.compile_regex(source)
                if kind == "ebnf":
                    return c.compile_grammar(source)
                json.loads(source)  # a clear error before xgrammar's
                return c.compile_json_schema(source, any_whitespace=False)  # compact JSON: no runaway whitespace
        except (RuntimeError, ValueError, json.JSONDecodeError) as e:
            raise RequestError(f"sampling_params.{kind}: cannot compile ({str(e).splitlines()[0][:300]})") from None


def _support(engine: Any) -> _Support:
    sup = engine.__dict__.get("_grammar_support")
    if sup is None:
        sup = engine.__dict__["_grammar_support"] = _Support(engine)
    return sup


class GrammarMatcher:
    """One sample's position in a compiled grammar."""

    def __init__(self, support: _Support, compiled: Any, stop_ids: list[int], banned: torch.Tensor | None = None):
        xgr = support.xgr
        self.V = support.vocab_size
        self.banned = banned
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop_ids or None,
                                          terminate_without_stop_token=not stop_ids)
        self.bitmask = xgr.allocate_token_bitmask(1, self.V)
        self._shift = torch.arange(32, dtype=torch.int32)

    def allowed_mask(self) -> torch.Tensor:
        """Boolean [V]: the tokens the grammar allows next."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        bits = (self.bitmask[0, :, None] >> self._shift) & 1
        allowed = bits.reshape(-1)[:self.V].bool()
        return allowed & ~self.banned if self.banned is not None else allowed

    def accept(self, token: int) -> bool:
        return bool(self.matcher.accept_token(int(token)))

    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())

    def is_completed(self) -> bool:
        return bool(self.matcher.is_completed())


def grammar_factory_for(engine: Any, params: SamplingParams) -> Callable[[], GrammarMatcher]:
    """Compile the request's grammar now (errors are 400s) and return a matcher factory."""
    kind, source = params.grammar
    sup = _support(engine)
    compiled = sup.compile(kind, source)
    eos = engine.model_config.eos_token_id
    stop = [] if params.ignore_eos or eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    stop += [t for t in params.stop_token_ids if t not in stop]
    banned = sup.json_banned.clone() if kind == "json_schema" else None
    if banned is not None:
        banned[stop] = False
    return lambda: GrammarMatcher(sup, compiled, stop, banned)
