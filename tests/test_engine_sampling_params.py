"""The one SamplingParams (k2sys.engine.api.params): every layer's name for it is the same class, it
round-trips through SGLang's `sampling_params` dict, and SGLang's own SamplingParams accepts (and
verifies) the dict we send; bad values are a RequestError naming the field and the fix."""

from __future__ import annotations

import json

import pytest

from k2sys.engine.api.params import SamplingParams
from k2sys.engine.errors import RequestError

FULL = dict(max_new_tokens=24, temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, n=3, stop=["</s>", "\n\n"],
            stop_token_ids=[2, 7], stop_regex=[r"\d{3}"], ignore_eos=True, min_new_tokens=2, skip_special_tokens=False,
            spaces_between_special_tokens=False, no_stop_trim=True, sampling_seed=11, frequency_penalty=0.5,
            presence_penalty=-0.25, repetition_penalty=1.1, logit_bias={5: -100.0, 9: 2.5}, stream_interval=4,
            json_schema='{"type": "object"}')


def test_every_layer_has_the_same_class():
    from k2sys.engine import SamplingParams as from_engine
    from k2sys.engine.api.protocol import SamplingParams as from_protocol
    from k2sys.engine.core.config import SamplingParams as from_config
    from k2sys.engine.protocol import SamplingParams as from_old_path

    assert from_engine is from_protocol is from_config is from_old_path is SamplingParams


def test_full_field_set_round_trips_through_the_sglang_dict():
    sp = SamplingParams(**FULL)
    d = json.loads(json.dumps(sp.to_sglang()))  # what goes over the wire
    assert d["logit_bias"] == {"5": -100.0, "9": 2.5} and d["sampling_seed"] == 11 and "seed" not in d
    assert SamplingParams.from_sglang(d) == sp
    for name, value in FULL.items():  # every field set away from its default is sent
        assert d[name] == ({str(k): v for k, v in value.items()} if name == "logit_bias" else value), name
    # defaults travel as SGLang's five always-sent fields only
    assert SamplingParams().to_sglang() == {"max_new_tokens": 128, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "n": 1}
    assert SamplingParams.from_sglang({"seed": 5}).sampling_seed == 5  # k2sys alias in the dict form only
    assert SamplingParams(stop="x", stop_token_ids=(3, 1)).stop == ["x"]  # Python callers may pass a str / tuple


def test_sglang_accepts_the_dict_we_send():
    sglang_ref = pytest.importorskip("sglang_ref")
    try:
        sglang_ref.prepare()
    except ImportError as e:
        pytest.skip(str(e))
    ours = pytest.importorskip("sglang.srt.sampling.sampling_params")
    for sp in (SamplingParams(), SamplingParams(**FULL), SamplingParams(**{**FULL, "json_schema": None, "regex": "a+"})):
        d = json.loads(json.dumps(sp.to_sglang()))
        theirs = ours.SamplingParams(**d)  # an unknown keyword would raise here
        theirs.verify(vocab_size=32)  # SGLang's own range checks
        for name, value in d.items():
            if name == "top_k" and value == -1:
                value = ours.TOP_K_ALL  # SGLang's own spelling of "off"
            elif name == "stop_token_ids":
                value = set(value)  # SGLang keeps them as a set
            assert getattr(theirs, name) == value, name
        # and io_struct's GenerateReqInput carries it unchanged
        io = sglang_ref.io_struct()
        req = sglang_ref.parse(io.GenerateReqInput, {"input_ids": [1, 2], "sampling_params": d})
        assert req.sampling_params == d


@pytest.mark.parametrize("kw,field,fix", [
    ({"top_p": 1.5}, "sampling_params.top_p", r"\(0, 1\]"),
    ({"temperature": "0.5"}, "sampling_params.temperature", "send a number"),
    ({"top_k": True}, "sampling_params.top_k", "send an integer"),
    ({"n": 2.0}, "sampling_params.n", "send an integer"),
    ({"temperature": float("inf")}, "sampling_params.temperature", "finite"),
    ({"stop": ["a", 3]}, r"sampling_params.stop.1", "send a string"),
    ({"stop_token_ids": [-1]}, r"sampling_params.stop_token_ids\[0\]", ">= 0"),
    ({"logit_bias": {"x": 1}}, "sampling_params.logit_bias", "token id"),
    ({"bogus": 1}, "sampling_params.bogus", "known fields are"),
    ({"seed": 1.5}, "sampling_params.sampling_seed", "integer"),
    ({"regex": "a", "ebnf": "root ::= \"a\""}, "sampling_params.regex/ebnf", "only one"),
])
def test_bad_values_name_the_field_and_the_fix(kw, field, fix):
    with pytest.raises(RequestError, match=f"^{field}: .*{fix}"):
        SamplingParams(**kw)


def test_frozen_and_replace_checks():
    sp = SamplingParams(max_new_tokens=8)
    with pytest.raises(Exception):
        sp.max_new_tokens = 3
    assert sp.replace(max_new_tokens=3).max_new_tokens == 3 and sp.max_new_tokens == 8
    with pytest.raises(RequestError, match="min_new_tokens"):
        sp.replace(min_new_tokens=9)
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy and not sp.greedy
    assert SamplingParams(ebnf="root ::= \"a\"").grammar == ("ebnf", "root ::= \"a\"")
    assert SamplingParams(regex="").grammar is None  # SGLang: empty = unset
    assert SamplingParams(presence_penalty=0.1).needs_history and not sp.needs_history


def test_seed_is_the_old_name_of_sampling_seed():
    assert SamplingParams(seed=3).sampling_seed == 3
    assert SamplingParams(seed=None, sampling_seed=4).sampling_seed == 4
    assert SamplingParams(seed=5) == SamplingParams(sampling_seed=5)
    with pytest.raises(RequestError, match="seed or sampling_seed"):
        SamplingParams(seed=1, sampling_seed=2)
