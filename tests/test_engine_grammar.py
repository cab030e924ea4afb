"""Structured output (xgrammar token masks in the sampler) and stop_regex, against reference semantics:
the allowed-token mask equals a brute-force check with the `regex` module's partial matching over the
whole (small) vocabulary; every sample of regex / JSON schema (validated with `jsonschema`) / EBNF
parses; token bytes equal what the tokenizer encodes; a bad grammar is an error naming the field."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from k2sys.engine.core.config import EngineConfig, RequestError, SamplingParams
from k2sys.engine.core.engine import NativeEngine
from k2sys.models import build_model, k2_tiny, save_hf
from k2sys.tokenizer import default_corpus, train_tokenizer
from test_tokenizer_release import kimi  # noqa: F401  (fixture: a tiny Kimi-layout tiktoken tokenizer)

xgr = pytest.importorskip("xgrammar")
regex = pytest.importorskip("regex")

V = 512


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    root = tmp_path_factory.mktemp("gram")
    tok = train_tokenizer(default_corpus(300), V, root / "tok")
    cfg = dataclasses.replace(k2_tiny(vocab_size=V), initializer_range=0.05, eos_token_id=None)
    ckpt = save_hf(build_model(cfg, seed=8), root / "model", tokenizer=tok)
    e = NativeEngine.from_pretrained(ckpt, EngineConfig(max_total_tokens=16384, max_model_len=512))
    yield e
    e.shutdown()


def test_token_bytes_are_the_tokenizers(eng):
    from k2sys.engine.core.grammar import special_token_ids, vocabulary_bytes

    raw = vocabulary_bytes(eng.tokenizer, V)
    text = "The weather is 23 degrees; naïve café — ok?\n  done"
    ids = eng.encode(text)
    assert b"".join(raw[t] for t in ids) == text.encode()
    specials = special_token_ids(eng.tokenizer)
    for t in range(V):
        if t in specials:
            continue
        try:
            piece = raw[t].decode()
        except UnicodeDecodeError:
            continue  # part of a multi-byte character
        assert eng.tokenizer.decode([t], skip_special_tokens=False) == piece, t


def brute_force_allowed(pattern: str, prefix: str, raw: list[bytes], specials: set[int]) -> set[int]:
    out = set()
    for t, b in enumerate(raw):
        if not b or t in specials:
            continue
        try:
            s = prefix + b.decode()
        except UnicodeDecodeError:
            continue  # the pattern is ASCII: a piece of a multi-byte character can never be part of a match
        if regex.fullmatch(pattern, s, partial=True):
            out.add(t)
    return out


@pytest.mark.parametrize("pattern", [r"[0-9]{2,4}-(red|green|blue)", r"(the|an?) [a-z]+ (is|was) [0-9]+\.",
                                     r"yes|no|maybe"])
def test_mask_equals_brute_force_partial_matching(eng, pattern):
    from k2sys.engine.core.grammar import grammar_factory_for, special_token_ids, vocabulary_bytes

    raw = vocabulary_bytes(eng.tokenizer, V)
    specials = special_token_ids(eng.tokenizer)
    m = grammar_factory_for(eng, SamplingParams(regex=pattern))()
    g = torch.Generator().manual_seed(0)
    prefix = ""
    for _ in range(12):
        allowed = m.allowed_mask()
        want = brute_force_allowed(pattern, prefix, raw, specials)
        assert set(torch.nonzero(allowed).flatten().tolist()) == want, prefix
        if not want:
            assert regex.fullmatch(pattern, prefix)
            break
        choice = sorted(want)[int(torch.randint(len(want), (1,), generator=g))]
        assert m.accept(choice)
        prefix += raw[choice].decode()


def test_regex_json_schema_ebnf_outputs_parse(eng):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                               "temp": {"type": "integer", "minimum": -50, "maximum": 50},
                                               "rain": {"type": "boolean"}},
              "required": ["city", "temp", "rain"], "additionalProperties": False}
    cases = [("regex", r"[0-9]{3}-[a-z]{2,5}", lambda t: regex.fullmatch(r"[0-9]{3}-[a-z]{2,5}", t)),
             ("json_schema", json.dumps(schema), lambda t: jsonschema.validate(json.loads(t), schema) is None),
             ("ebnf", 'root ::= "(" num ("," num)* ")"\nnum ::= [1-9] [0-9]?', lambda t: regex.fullmatch(
                 r"\(([1-9][0-9]?)(,[1-9][0-9]?)*\)", t))]
    for kind, src, ok in cases:
        outs = eng.generate_sglang(["The weather"], SamplingParams(temperature=1.0, max_new_tokens=200, n=4,
                                                                   sampling_seed=3, **{kind: src}))
        for o in outs:
            assert o["meta_info"]["finish_reason"] == {"type": "stop", "matched": None}, (kind, o)
            assert ok(o["text"]), (kind, o["text"])
        greedy = eng.generate_sglang(["The weather"], SamplingParams(temperature=0, max_new_tokens=200, **{kind: src}))
        assert ok(greedy[0]["text"])


def test_bad_grammars_name_the_field(eng):
    for kind, src in (("regex", "[a-"), ("json_schema", "{not json"), ("ebnf", "root ::= ")):
        with pytest.raises(RequestError, match=f"sampling_params.{kind}"):
            eng.submit([1, 2, 3], SamplingParams(max_new_tokens=4, **{kind: src}))


def test_stop_regex_stops_and_trims(eng):
    p = SamplingParams(temperature=0, max_new_tokens=40)
    full = eng.generate_sglang(["The weather"], p)[0]["text"]
    words = regex.findall(r"[a-z]{3,}", full[4:])
    if not words:
        pytest.skip(f"greedy text has no word to stop on: {full!r}")
    pattern = words[0][:3] + r"[a-z]*"
    m = regex.search(pattern, full)
    out = eng.generate_sglang(["The weather"], p.replace(stop_regex=[pattern]))[0]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": pattern}
    assert out["text"] == full[:m.start()]
    kept = eng.generate_sglang(["The weather"], p.replace(stop_regex=[pattern], no_stop_trim=True))[0]
    assert kept["text"].startswith(full[:m.start()]) and regex.search(pattern, kept["text"])


def test_tiktoken_vocabulary_and_a_grammar_on_a_kimi_layout_tokenizer(kimi, tmp_path):  # noqa: F811
    """Kimi K2 ships a tiktoken BPE: token bytes come from tiktoken, special tokens are kept out of
    structured text, and a regex grammar runs on it."""
    from k2sys.engine.core.grammar import grammar_factory_for, special_token_ids, vocabulary_bytes
    from k2sys.tokenizer import load_tokenizer

    tok_dir, ranks, ref = kimi
    tok = load_tokenizer(tok_dir)
    vocab = len(ranks) + 256
    raw = vocabulary_bytes(tok, vocab)
    text = "The weather is 23 degrees, café ok"
    assert b"".join(raw[t] for t in tok.encode(text, add_special_tokens=False).ids) == text.encode()
    assert all(raw[i] == ref.decode_single_token_bytes(i) for i in range(len(ranks)))
    specials = special_token_ids(tok)
    assert specials and all(i >= len(ranks) for i in specials)
    cfg = dataclasses.replace(k2_tiny(vocab_size=vocab), eos_token_id=None)
    with NativeEngine.from_model(build_model(cfg, seed=1), EngineConfig(max_total_tokens=2048), tokenizer=tok) as e:
        m = grammar_factory_for(e, SamplingParams(regex=r"[a-c]{2}"))()
        allowed = torch.nonzero(m.allowed_mask()).flatten().tolist()
        assert allowed and all(raw[t] and set(raw[t].decode()) <= set("abc") and len(raw[t]) <= 2 for t in allowed)
        assert not set(allowed) & specials
        out = e.generate_sglang([[5, 6]], SamplingParams(temperature=1.0, max_new_tokens=8, n=3, sampling_seed=2,
                                                         regex=r"[a-c]{2}"))
        assert all(regex.fullmatch("[a-c]{2}", o["text"]) for o in out)
