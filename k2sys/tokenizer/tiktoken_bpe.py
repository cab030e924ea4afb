"""tiktoken BPE tokenizers in the Kimi release layout, behind the `tokenizers.Tokenizer` interface.

A Kimi-K2 checkpoint ships its tokenizer as

    tiktoken.model            one "<base64 token bytes> <rank>" line per BPE token, ranks 0..n-1
    tokenizer_config.json     added_tokens_decoder: special tokens at ids n .. n+255 ([BOS] = n, ...),
                              bos/eos/unk/pad token names, auto_map -> the remote-code tokenizer class
    tokenization_kimi.py      that class: the split pattern `pat_str` and `num_reserved_special_tokens`

`TiktokenTokenizer` encodes with the `tiktoken` package and exposes what the rest of k2sys calls on a
`tokenizers.Tokenizer`: `encode(text).ids` / `.offsets`, `decode(ids, skip_special_tokens=...)`,
`token_to_id`, `id_to_token`, `get_vocab_size`, `get_vocab`. Special-token strings inside the text
become their single ids (as Hugging Face added tokens do). Ids n..n+255 (`num_reserved_special_tokens`)
not named by the config are `<|reserved_token_{id}|>`, so the vocabulary size is n + 256, the
model's embedding size (163840 for Kimi-K2).

The split pattern is read statically (Python `ast`, nothing executed) from the class that
`auto_map.AutoTokenizer` names; without an `auto_map`, Kimi's pattern (`KIMI_PAT_STR`) is used.
"""

from __future__ import annotations

import ast
import base64
import binascii
import json
import os
from bisect import bisect_left, bisect_right
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from .templates import special_tokens_map

# The pre-tokenizer split of Kimi-K2's tokenizer (tokenization_kimi.py, class attribute `pat_str`):
# Han runs alone, letters without Han, up to 3 digits, punctuation, newlines, spaces. tiktoken's
# regex engine (fancy-regex) supports the `&&` class intersections.
KIMI_PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
NUM_RESERVED_SPECIAL_TOKENS = 256
TIKTOKEN_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"


@lru_cache(maxsize=1)
def _byte_to_unicode() -> tuple[str, ...]:
    """GPT-2's reversible byte -> printable character table (what HF byte-level vocabularies use).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards in byte order.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table, extra = [], 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return tuple(table)


def _token_string(b: bytes) -> str:
    table = _byte_to_unicode()
    return "".join(table[x] for x in b)


def read_tiktoken_bpe(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: one "<base64 bytes> <rank>" per line, ranks exactly 0..n-1.

    Read directly (tiktoken's own loader caches files by path in a temp dir and can serve a stale copy).
    """
    path = Path(path)
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {raw[:60]!r}")
            try:
                token = base64.b64decode(parts[0], validate=True)
                rank = int(parts[1])
            except (binascii.Error, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: bad token or rank ({e}): {raw[:60]!r}") from None
            if not token or rank < 0:
                raise ValueError(f"{path}:{lineno}: empty token or negative rank: {raw[:60]!r}")
            if token in ranks:
                raise ValueError(f"{path}:{lineno}: token {token!r} listed twice (ranks {ranks[token]} and {rank})")
            if rank in seen_ranks:
                raise ValueError(f"{path}:{lineno}: rank {rank} listed twice")
            ranks[token] = rank
            seen_ranks.add(rank)
    n = len(ranks)
    if n == 0:
        raise ValueError(f"{path}: no tokens")
    if max(seen_ranks) != n - 1:
        missing = next(i for i in range(n) if i not in seen_ranks)
        raise ValueError(f"{path}: ranks must be 0..{n - 1} without gaps (special tokens are numbered from the "
                         f"token count); rank {missing} is missing")
    missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
    if missing_bytes:
        raise ValueError(f"{path}: single-byte tokens {missing_bytes[:8]} are missing; a byte-level BPE needs all 256")
    return ranks


def _static_string(node: ast.AST) -> str | None:
    """Value of a string expression made of literals: "a", "a" "b", "a" + "b", "sep".join([...])."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _static_string(node.left), _static_string(node.right)
        return None if left is None or right is None else left + right
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "join"
            and len(node.args) == 1 and not node.keywords and isinstance(node.args[0], (ast.List, ast.Tuple))):
        sep = _static_string(node.func.value)
        parts = [_static_string(e) for e in node.args[0].elts]
        if sep is not None and all(p is not None for p in parts):
            return sep.join(parts)  # type: ignore[arg-type]
    return None


def _remote_code_settings(tok_dir: Path, config: dict) -> tuple[str, int, str]:
    """(pat_str, num_reserved_special_tokens, source) for a tiktoken directory.

    With `auto_map.AutoTokenizer` = "module.Class", both are read from the class body in module.py
    (statically); the file must be there. Without an auto_map, Kimi's values.
    """
    cfg_file = tok_dir / CONFIG_FILE
    auto_map = config.get("auto_map") or {}
    if isinstance(auto_map, (list, tuple)):  # the old form: the AutoTokenizer entry itself
        auto_map = {"AutoTokenizer": auto_map}
    if not isinstance(auto_map, dict):
        raise ValueError(f"{cfg_file}: auto_map must be an object, got {auto_map!r}")
    auto = auto_map.get("AutoTokenizer")
    if auto is None:
        return KIMI_PAT_STR, NUM_RESERVED_SPECIAL_TOKENS, "Kimi-K2 default (no auto_map)"
    ref = auto[0] if isinstance(auto, (list, tuple)) and auto else auto
    if not isinstance(ref, str) or "." not in ref:
        raise ValueError(f"{cfg_file}: auto_map.AutoTokenizer {auto!r} must name 'module.Class'")
    if "--" in ref:  # "repo--module.Class": code in another hub repo, not in this directory
        raise ValueError(f"{cfg_file}: auto_map.AutoTokenizer {ref!r} points to another repository; copy that "
                         f"tokenizer code into {tok_dir} and name it as 'module.Class'")
    module, cls_name = ref.rsplit(".", 1)
    code_file = tok_dir / (module.replace(".", "/") + ".py")
    if not code_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: auto_map.AutoTokenizer names {ref!r} but {code_file} is missing; "
                                "copy it from the release (it holds the split pattern) or remove auto_map")
    tree = ast.parse(code_file.read_text(encoding="utf-8"), filename=str(code_file))
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls_name), None)
    if cls is None:
        raise ValueError(f"{code_file}: no class {cls_name} (named by auto_map in {cfg_file})")
    pat, reserved = None, NUM_RESERVED_SPECIAL_TOKENS
    for stmt in cls.body:
        target = stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else (
            stmt.target if isinstance(stmt, ast.AnnAssign) and stmt.value is not None else None)
        if not isinstance(target, ast.Name):
            continue
        if target.id == "pat_str":
            pat = _static_string(stmt.value)
            if pat is None:
                raise ValueError(f"{code_file}:{stmt.lineno}: {cls_name}.pat_str is not a literal string expression; "
                                 "k2sys reads it without running the code")
        elif target.id == "num_reserved_special_tokens":
            if not (isinstance(stmt.value, ast.Constant) and type(stmt.value.value) is int and stmt.value.value > 0):
                raise ValueError(f"{code_file}:{stmt.lineno}: {cls_name}.num_reserved_special_tokens must be a "
                                 "positive int literal")
            reserved = stmt.value.value
    if pat is None:
        raise ValueError(f"{code_file}: class {cls_name} has no pat_str; cannot tell how it splits text")
    return pat, reserved, f"{code_file.name}:{cls_name}"


class TiktokenEncoding:
    """Result of `TiktokenTokenizer.encode`: `ids`, and character `offsets` / `tokens` on demand."""

    __slots__ = ("ids", "_tok", "_text", "_offsets")

    def __init__(self, ids: list[int], tok: "TiktokenTokenizer", text: str):
        self.ids, self._tok, self._text, self._offsets = ids, tok, text, None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def tokens(self) -> list[str]:
        return [self._tok.id_to_token(i) for i in self.ids]  # type: ignore[misc]

    @property
    def offsets(self) -> list[tuple[int, int]]:
        """(start, end) character span of each token in the text; a token holding part of a multi-byte
        character spans that whole character."""
        if self._offsets is None:
            # tiktoken encodes lone surrogates as U+FFFD (3 bytes), the same length as surrogatepass gives.
            data_len = len(self._text.encode("utf-8", "surrogatepass"))
            starts = [0]  # byte offset where each character starts, plus the end
            for ch in self._text:
                starts.append(starts[-1] + (1 if ch < "\x80" else 2 if ch < "\u0800" else 3 if ch < "\U00010000"
                                            else 4))
            pieces = self._tok.encoding.decode_tokens_bytes(self.ids)
            spans, pos = [], 0
            for b in pieces:
                end = pos + len(b)
                spans.append((bisect_right(starts, pos) - 1, bisect_left(starts, end)))
                pos = end
            if pos != data_len:  # would mean tokens do not spell the text; never expected
                raise RuntimeError(f"token bytes ({pos}) do not cover the text ({data_len} bytes)")
            self._offsets = spans
        return self._offsets


class TiktokenTokenizer:
    """A tiktoken BPE + special tokens, with the `tokenizers.Tokenizer` methods k2sys uses."""

    def __init__(self, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int], pat_str: str, *,
                 skip_on_decode: Iterable[int] = (), config: dict | None = None, name: str = "tiktoken"):
        import tiktoken

        n = len(mergeable_ranks)
        for tok, i in special_tokens.items():
            if not n <= i:
                raise ValueError(f"special token {tok!r} has id {i}, inside the BPE ranks 0..{n - 1}")
        if len(set(special_tokens.values())) != len(special_tokens):
            raise ValueError("two special tokens share an id")
        self.encoding = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                                          special_tokens=special_tokens)
        self.pat_str, self.n_bpe, self._ranks = pat_str, n, mergeable_ranks
        self.special_tokens = dict(special_tokens)
        self._special_by_id = {i: t for t, i in special_tokens.items()}
        self._skip = frozenset(skip_on_decode)
        self._vocab_size = max([n - 1, *special_tokens.values()]) + 1
        self.config = dict(config or {})
        self.special_tokens_map = special_tokens_map(self.config, name)
        for attr, tok in self.special_tokens_map.items():
            if tok not in self.special_tokens:
                raise ValueError(f"{name}: {attr} {tok!r} is not one of the special tokens (added_tokens_decoder)")
        self._add_bos = self._flag("add_bos_token", "bos_token")
        self._add_eos = self._flag("add_eos_token", "eos_token")
        self._id_by_string: dict[str, int] | None = None
        self.pattern_source = "given"  # where pat_str came from (from_dir: the remote-code class or the default)

    def _flag(self, key: str, attr: str) -> int | None:
        value = self.config.get(key, False)
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        if not value:
            return None
        if attr not in self.special_tokens_map:
            raise ValueError(f"{key} is true but the config has no {attr}")
        return self.special_tokens[self.special_tokens_map[attr]]

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "TiktokenTokenizer":
        """Load `tiktoken.model` + `tokenizer_config.json` (+ the auto_map tokenizer code) from `path`."""
        tok_dir = Path(path)
        cfg_file = tok_dir / CONFIG_FILE
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file} not found: a tiktoken tokenizer needs it next to {TIKTOKEN_FILE} "
                                    "(its added_tokens_decoder numbers the special tokens)")
        try:
            config = json.loads(cfg_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{cfg_file} must hold a JSON object")
        ranks = read_tiktoken_bpe(tok_dir / TIKTOKEN_FILE)
        pat_str, reserved, pattern_source = _remote_code_settings(tok_dir, config)
        n = len(ranks)
        declared: dict[int, str] = {}
        skip: set[int] = set()
        added = config.get("added_tokens_decoder", {})
        if not isinstance(added, dict):
            raise ValueError(f"{cfg_file}: added_tokens_decoder must be an object {{id: {{content, ...}}}}")
        for key, entry in added.items():
            where = f"{cfg_file}: added_tokens_decoder[{key!r}]"
            try:
                i = int(key)
            except ValueError:
                raise ValueError(f"{where}: the key must be an integer id") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) or not entry["content"]:
                raise ValueError(f"{where} must be {{'content': '<token>', 'special': ...}}")
            if not n <= i < n + reserved:
                raise ValueError(f"{where}: id {i} is outside the special-token block {n}..{n + reserved - 1} "
                                 f"({n} BPE tokens in {TIKTOKEN_FILE} + {reserved} reserved ids)")
            for flag in ("lstrip", "rstrip", "single_word"):
                if entry.get(flag):
                    raise ValueError(f"{where}: {flag}=true is not supported for tiktoken tokenizers; "
                                     "special tokens are matched exactly")
            declared[i] = entry["content"]
            if entry.get("special", True):
                skip.add(i)
        specials: dict[str, int] = {}
        for i in range(n, n + reserved):
            name = declared.get(i)
            if name is None:
                name = f"<|reserved_token_{i}|>"
                skip.add(i)  # never text: dropped by skip_special_tokens like the declared special ones
            if name in specials:
                raise ValueError(f"{cfg_file}: token {name!r} is declared for ids {specials[name]} and {i}")
            specials[name] = i
        tok = cls(ranks, specials, pat_str, skip_on_decode=skip, config=config, name=str(tok_dir))
        tok.pattern_source = pattern_source
        return tok

    # -- the tokenizers.Tokenizer surface --------------------------------------------------------
    def encode(self, sequence: str, pair: None = None, is_pretokenized: bool = False,
               add_special_tokens: bool = True) -> TiktokenEncoding:
        """Token ids of `sequence`; special-token strings in it become their ids. With
        `add_special_tokens`, BOS/EOS are added when the config's add_bos_token/add_eos_token say so."""
        if pair is not None or is_pretokenized:
            raise ValueError("TiktokenTokenizer.encode takes one string (no pair, not pretokenized)")
        if not isinstance(sequence, str):
            raise TypeError(f"encode expects a str, got {type(sequence).__name__}")
        ids = self.encoding.encode(sequence, allowed_special="all", disallowed_special=())
        text = sequence
        if add_special_tokens and self._add_bos is not None:
            ids = [self._add_bos, *ids]
            text = self.special_tokens_map["bos_token"] + text
        if add_special_tokens and self._add_eos is not None:
            ids = [*ids, self._add_eos]
            text = text + self.special_tokens_map["eos_token"]
        return TiktokenEncoding(ids, self, text)

    def encode_batch(self, inputs: Sequence[str], add_special_tokens: bool = True) -> list[TiktokenEncoding]:
        return [self.encode(s, add_special_tokens=add_special_tokens) for s in inputs]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (invalid UTF-8 from a partial character becomes U+FFFD, as in HF)."""
        out = []
        for t in ids:
            t = int(t)
            if not 0 <= t < self._vocab_size:
                raise ValueError(f"token id {t} is outside the vocabulary 0..{self._vocab_size - 1}")
            if skip_special_tokens and t in self._skip:
                continue
            out.append(t)
        return self.encoding.decode_bytes(out).decode("utf-8", errors="replace")

    def decode_batch(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def token_to_id(self, token: str) -> int | None:
        """Id of a special-token name or of a BPE token written in GPT-2 byte-level characters."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        if self._id_by_string is None:
            self._id_by_string = {_token_string(b): i for b, i in self._ranks.items()}
        return self._id_by_string.get(token)

    def id_to_token(self, id: int) -> str | None:
        id = int(id)
        if id in self._special_by_id:
            return self._special_by_id[id]
        if 0 <= id < self.n_bpe:
            return _token_string(self.encoding.decode_single_token_bytes(id))
        return None

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self._vocab_size if with_added_tokens else self.n_bpe

    def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]:
        vocab = {_token_string(b): i for b, i in self._ranks.items()}
        if with_added_tokens:
            vocab.update(self.special_tokens)
        return vocab

    def __repr__(self) -> str:
        return (f"TiktokenTokenizer({self.encoding.name!r}, {self.n_bpe} BPE tokens, "
                f"{len(self.special_tokens)} special, vocab {self._vocab_size})")
