"""Tokenizer training, HF layout and byte-exact round trips (k2sys.tokenizer.train)."""

import json
import re
import time

import pytest

from k2sys.tokenizer import SPECIAL_TOKENS, default_corpus, load_tokenizer, save_tokenizer, train_tokenizer
from k2sys.tokenizer.chat import CHAT_TEMPLATE, CHAT_TOKENS

transformers = pytest.importorskip("transformers")

VOCAB = 3000
SAMPLES = [
    "Question: What is 487 + 29?\nAnswer: 516",
    "  leading and trailing spaces  \n\n\ttabs\r\nwindows line",
    "unicode: café naïve Ωmega 你好，世界 こんにちは 😀👍🏽 \u200b zero-width",
    "def f(x):\n    return x ** 2  # square\n",
    '{"a": [1, 2.5e-3, null, true], "b": "\\u00e9"}',
    "-12345678901234567890 3.14159 0x1F 1e9 ½ ٣ ①",  # non-ASCII digits too
    "",
    " ",
    "<|im_end|> inside text and [EOS] and [PAD]",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    t0 = time.perf_counter()
    train_tokenizer(default_corpus(), VOCAB, out)
    train_s = time.perf_counter() - t0
    assert train_s < 30, f"training took {train_s:.1f}s; it must stay CPU-fast"
    return out


@pytest.fixture(scope="module")
def hf(tok_dir):
    return transformers.AutoTokenizer.from_pretrained(tok_dir)


def test_files_and_vocab(tok_dir):
    assert sorted(p.name for p in tok_dir.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                         "tokenizer_config.json"]
    tok = load_tokenizer(tok_dir)
    assert tok.get_vocab_size() == VOCAB
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATE
    # No merge swallowed part of a special token: "<|im" etc. only exist inside the specials themselves.
    vocab = tok.get_vocab()
    leaked = [t for t in vocab if ("<|" in t or "|>" in t or t.startswith("[EOS")) and t not in SPECIAL_TOKENS]
    assert leaked == []


def test_autotokenizer_loads_as_fast_tokenizer(hf):
    assert hf.is_fast
    assert len(hf) == VOCAB
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("[BOS]", "[EOS]", "[PAD]")
    assert set(CHAT_TOKENS) <= set(hf.all_special_tokens)
    assert hf.chat_template == CHAT_TEMPLATE
    # Nothing is added around plain text: the chat format carries no BOS.
    assert hf("hi")["input_ids"] == hf("hi", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_encode_is_identity(tok_dir, hf, text):
    tok = load_tokenizer(tok_dir)
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert hf.decode(hf(text)["input_ids"], skip_special_tokens=False) == text
    assert hf(text)["input_ids"] == ids


def test_special_tokens_are_single_ids(tok_dir):
    tok = load_tokenizer(tok_dir)
    for t in SPECIAL_TOKENS:
        assert tok.encode(f"a{t}b", add_special_tokens=False).ids[1] == tok.token_to_id(t)


def test_ascii_digits_are_split_individually(tok_dir):
    tok = load_tokenizer(tok_dir)
    import random
    rng = random.Random(1)
    text = " ".join(f"x{rng.randint(0, 10**12)}+{rng.randint(0, 999)}={rng.random()}" for _ in range(200))
    enc = tok.encode(text, add_special_tokens=False)
    for start, end in enc.offsets:
        piece = text[start:end]
        if re.search(r"[0-9]", piece):
            assert re.fullmatch(r"[0-9]", piece), f"token {piece!r} holds more than one digit"
    assert len([p for s, e in enc.offsets if re.fullmatch(r"[0-9]", p := text[s:e])]) == len(re.findall(r"[0-9]", text))


def test_training_is_deterministic(tok_dir, tmp_path):
    train_tokenizer(default_corpus(), VOCAB, tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    assert default_corpus(50, seed=3) == default_corpus(50, seed=3)
    assert default_corpus(50, seed=3) != default_corpus(50, seed=4)


def test_small_corpus_gives_smaller_vocab(tmp_path):
    train_tokenizer(["abc abc abd"] * 10, 4096, tmp_path)
    n = load_tokenizer(tmp_path).get_vocab_size()
    assert len(SPECIAL_TOKENS) + 256 <= n < 300


def test_writes_leave_other_files_and_no_temp(tmp_path, tok_dir):
    (tmp_path / "config.json").write_text("{}")
    save_tokenizer(load_tokenizer(tok_dir), tmp_path)
    save_tokenizer(load_tokenizer(tok_dir), tmp_path)  # overwrite in place
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert (tmp_path / "tokenizer.json").stat().st_mode & 0o044  # readable by others, not mkstemp's 0600


def test_bad_inputs_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], 100, tmp_path)
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        train_tokenizer(["abc", b"bytes"], 1000, tmp_path)
    with pytest.raises(ValueError, match="min_frequency"):
        train_tokenizer(["abc"], 1000, tmp_path, min_frequency=0)
    with pytest.raises(FileNotFoundError, match="train_tokenizer"):
        load_tokenizer(tmp_path / "nowhere")
    from tokenizers import Tokenizer, models
    with pytest.raises(ValueError, match="special tokens"):
        save_tokenizer(Tokenizer(models.BPE()), tmp_path)
