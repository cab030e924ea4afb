"""The pydantic request-body models (k2sys.engine.api.bodies): a bad or unknown field of every body is
a RequestError (the server's 400) naming the field, and the table-made models hold exactly the
fields of their api_fields table, with "off only" fields accepted only at their off values. The OpenAI
bodies name a bad field by its OpenAI name (max_tokens, not max_new_tokens)."""

from __future__ import annotations

import pytest

from k2sys.engine.api.api_fields import CHAT, COMPLETIONS, GENERATE, HONOURED, NO_EFFECT, OFF_ONLY
from k2sys.engine.api.openai_bodies import ChatBody, CompletionsBody
from k2sys.engine.api.bodies import (AbortBody, ContinueBody, DetokenizeBody, EmptyBody,
                                     GenerateBody, GetWeightsBody, MemoryBody, PauseBody, TokenizeBody,
                                     UpdateWeightsFromShmBody, UpdateWeightsFromTensorPayload, WeightSessionBody)
from k2sys.engine.api.openai_api import sampling_from_openai
from k2sys.engine.api.params import LogprobOptions
from k2sys.engine.api.protocol import GenerateRequest
from k2sys.engine.errors import RequestError

_ENTRY = {"name": "w", "dtype": "float32", "shape": [4], "offset": 0}
_HI = [{"role": "user", "content": "hi"}]
_TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
_IPC = {"size": [4], "stride": [1], "offset": 0, "dtype": "float32", "device": 0, "handle": "aa",
        "storage_size_bytes": 16, "storage_offset_bytes": 0, "ref_counter_handle": "bb", "ref_counter_offset": 0,
        "event_handle": None, "event_sync_required": False}

# (model, a valid body, a bad one, the field its error must name)
CASES = [
    (PauseBody, {"mode": "retract"}, {"mode": "nope"}, "mode"),
    (PauseBody, {}, {"mode": {}}, "mode"),
    (AbortBody, {"rid": "r1"}, {"rid": {}}, "rid"),
    (AbortBody, {"abort_all": True}, {"rid": "x", "abort_all": "yes"}, "abort_all"),
    (AbortBody, {"rid": "x", "abort_message": "bye"}, {"abort_all": False}, "abort_all"),
    (MemoryBody, {"tags": ["kv_cache"]}, {"tags": "kv_cache"}, "tags"),
    (MemoryBody, {}, {"tags": ["gpu"]}, "tags"),
    (WeightSessionBody, {"selector": "all"}, {"selector": "x"}, "selector"),
    (GetWeightsBody, {"name": "w", "truncate_size": 4}, {"name": "w", "truncate_size": "x"}, "truncate_size"),
    (GetWeightsBody, {"name": "w"}, {"name": "w", "truncate_size": 0}, "truncate_size"),
    (GetWeightsBody, {"name": "w"}, {}, "name"),
    (TokenizeBody, {"prompt": ["a", "b"]}, {"prompt": 5}, "prompt"),
    (TokenizeBody, {"prompt": "a", "add_special_tokens": False}, {"prompt": "a", "add_special_tokens": "x"},
     "add_special_tokens"),
    (TokenizeBody, {"messages": [], "tool_choice": "auto"}, {"messages": [], "tool_choice": "required"}, "tool_choice"),
    (DetokenizeBody, {"tokens": [1, 2]}, {"tokens": 5}, "tokens"),
    (DetokenizeBody, {"tokens": [[1]]}, {"tokens": [1], "skip_special_tokens": "no"}, "skip_special_tokens"),
    (UpdateWeightsFromTensorPayload, {"serialized_named_tensors": ["QUJD"]}, {"serialized_named_tensors": 5},
     "serialized_named_tensors"),
    (UpdateWeightsFromTensorPayload, {"serialized_named_tensors": ["QUJD"], "flush_cache": None},
     {"serialized_named_tensors": ["QUJD"], "flush_cache": "yes"}, "flush_cache"),
    (UpdateWeightsFromTensorPayload, {"serialized_named_tensors": ["QUJD"], "weight_version": 3},
     {"serialized_named_tensors": ["QUJD"], "weight_version": {}}, "weight_version"),
    (UpdateWeightsFromTensorPayload, {"serialized_named_tensors": ["QUJD"], "load_format": "flattened_bucket"},
     {"serialized_named_tensors": ["QUJD"], "load_format": "direct"}, "load_format"),
    (UpdateWeightsFromShmBody, {"entries": [_ENTRY], "shm_size": 64}, {"entries": 5}, "entries"),
    (UpdateWeightsFromShmBody, {"entries": [_ENTRY], "shm_size": 64}, {"entries": [_ENTRY], "shm_size": "x"},
     "shm_size"),
    (UpdateWeightsFromShmBody, {"entries": [_ENTRY], "shm_size": 64}, {"entries": [{**_ENTRY, "offset": 2}],
                                                                       "shm_size": 64}, "entries[0].offset"),
    (UpdateWeightsFromShmBody, {"entries": [_ENTRY], "transport": "cuda_ipc", "cuda_ipc": _IPC},
     {"entries": [_ENTRY], "transport": "cuda_ipc", "cuda_ipc": {**_IPC, "size": "x"}}, "cuda_ipc.size"),
    (GenerateBody, {"text": ["a", "b"], "return_logprob": [True, None]}, {"text": "a", "return_logprob": "yes"},
     "return_logprob"),
    (GenerateBody, {"input_ids": [1, 2], "stream": True}, {"input_ids": [1, 2], "stream": "yes"}, "stream"),
    (GenerateBody, {"input_ids": [1], "cache_salt": "s"}, {"input_ids": [1], "cache_salt": 5}, "cache_salt"),
    (GenerateBody, {"input_ids": [1], "image_data": None}, {"input_ids": [1], "image_data": "x"}, "image_data"),
    (GenerateBody, {"input_ids": [1], "routed_dp_rank": 0}, {"input_ids": [1], "routed_dp_rank": 1}, "routed_dp_rank"),
    (GenerateBody, {"text": "a"}, {"text": "a", "input_ids": [1]}, "input_ids/text"),
    (CompletionsBody, {"prompt": "a", "max_tokens": 3}, {"prompt": "a", "max_tokens": "3"}, "max_tokens"),
    (CompletionsBody, {"prompt": "a", "max_tokens": 0, "echo": True}, {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    (CompletionsBody, {"prompt": "a", "n": 2}, {"prompt": "a", "n": True}, "n: must be int"),
    (CompletionsBody, {"prompt": "a", "logprobs": 20}, {"prompt": "a", "logprobs": 21}, "logprobs"),
    (CompletionsBody, {"prompt": [1, 2]}, {"prompt": 5}, "prompt"),
    (CompletionsBody, {"prompt": [[1], "a"]}, {"prompt": []}, "prompt"),
    (CompletionsBody, {"prompt": ["a", "b"], "rid": ["x", "y"]}, {"prompt": ["a", "b"], "rid": ["x"]}, "rid"),
    (CompletionsBody, {"prompt": "a", "stop": ["."]}, {"prompt": "a", "stop": [1]}, "stop"),
    (CompletionsBody, {"prompt": "a", "temperature": 0}, {"prompt": "a", "temperature": "0"}, "temperature"),
    (CompletionsBody, {"prompt": "a", "logit_bias": {"1": -100}}, {"prompt": "a", "logit_bias": {"1": 101}},
     "logit_bias"),
    (CompletionsBody, {"prompt": "a", "stream_options": {"include_usage": True}},
     {"prompt": "a", "stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats"),
    (CompletionsBody, {"prompt": "a", "response_format": {"type": "json_object"}},
     {"prompt": "a", "response_format": {"type": "json_object"}, "regex": "a+"}, "response_format"),
    (CompletionsBody, {"prompt": "a", "suffix": ""}, {"prompt": "a", "suffix": "!"}, "completions.suffix"),
    (CompletionsBody, {"prompt": "a", "user": {"any": 1}}, {}, "prompt"),
    (ChatBody, {"messages": _HI}, {"messages": []}, "messages"),
    (ChatBody, {"messages": _HI}, {"messages": [*_HI, 5]}, "messages[1]"),
    (ChatBody, {"messages": [*_HI, {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]},
     {"messages": [*_HI, {"role": "user", "content": 7}]}, "messages[1].content"),
    (ChatBody, {"messages": _HI}, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]"),
    (ChatBody, {"messages": _HI, "max_tokens": 1}, {"messages": _HI, "max_tokens": 0}, "max_tokens"),
    (ChatBody, {"messages": _HI, "max_completion_tokens": 1}, {"messages": _HI, "max_completion_tokens": 1.5},
     "max_completion_tokens"),
    (ChatBody, {"messages": _HI, "logprobs": True, "top_logprobs": 2}, {"messages": _HI, "top_logprobs": 2},
     "top_logprobs"),
    (ChatBody, {"messages": _HI, "logprobs": True}, {"messages": _HI, "logprobs": 1}, "logprobs"),
    (ChatBody, {"messages": _HI, "tools": _TOOLS}, {"messages": _HI, "tools": {"add": 1}}, "tools"),
    (ChatBody, {"messages": _HI, "tool_choice": {"type": "function", "function": {"name": "add"}}, "tools": _TOOLS},
     {"messages": _HI, "tool_choice": {"a": 1}}, "tool_choice"),
    (ChatBody, {"messages": _HI, "tool_choice": "none"}, {"messages": _HI, "tool_choice": "required"}, "tool_choice"),
    (ChatBody, {"messages": _HI, "tool_choice": "auto", "tools": [{"type": "function"}]},
     {"messages": _HI, "tool_choice": "required", "tools": [{"type": "function"}]}, "tools[0]"),
    (ChatBody, {"messages": _HI, "tools": _TOOLS}, {"messages": _HI, "tools": _TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name 'nope'"),
    (ChatBody, {"messages": _HI, "tool_choice": "required", "tools": _TOOLS},
     {"messages": _HI, "tool_choice": "required", "tools": _TOOLS, "regex": "a"}, "tool_choice"),
    (ChatBody, {"messages": _HI, "rid": "r"}, {"messages": _HI, "rid": ["r"]}, "rid"),
    (ChatBody, {"messages": _HI, "parallel_tool_calls": False}, {"messages": _HI, "parallel_tool_calls": "no"},
     "parallel_tool_calls"),
    (ChatBody, {"messages": _HI, "store": False}, {"messages": _HI, "store": True}, "chat.completions.store"),
    (ChatBody, {"messages": _HI, "skip_special_tokens": "any"}, {"messages": _HI, "json_schema": "{}"}, "json_schema"),
]


@pytest.mark.parametrize("model,good,bad,field", CASES, ids=lambda x: getattr(x, "__name__", None))
def test_bad_field_is_named(model, good, bad, field):
    model.parse(good)  # the valid neighbour passes: the refusal is about the bad field
    with pytest.raises(RequestError) as e:
        model.parse(bad)
    assert field in str(e.value)
    assert ";" in str(e.value), f"no fix in {e.value}"


@pytest.mark.parametrize("model,good", list({c[0]: (c[0], c[1]) for c in CASES}.values()),
                         ids=lambda x: getattr(x, "__name__", None))
def test_unknown_field_is_named(model, good):
    with pytest.raises(RequestError, match=r"bogus_field: unknown field;"):
        model.parse({**good, "bogus_field": 1})


def test_continue_body_accepts_any_object():
    # SGLang's ContinueGenerationReqInput: every field defaulted; the server has always accepted any object
    ContinueBody.parse({})
    ContinueBody.parse({"torch_empty_cache": True})


def test_empty_bodies_name_their_route():
    with pytest.raises(RequestError, match=r"end_weight_update\.x: unknown field"):
        EmptyBody.parse({"x": 1}, "end_weight_update")


@pytest.mark.parametrize("model,table,base,batch", [
    (GenerateBody, GENERATE, {"text": "a"}, {"text": ["a", "b"]}),
    (CompletionsBody, COMPLETIONS, {"prompt": "a"}, None),
    (ChatBody, CHAT, {"messages": _HI}, None),
], ids=["generate", "completions", "chat"])
def test_table_models_have_exactly_the_table_fields(model, table, base, batch):
    assert set(model.model_fields) == set(table)
    kind = model.KIND.replace(".", r"\.")
    # honoured fields are typed, the others take any value (no effect) or their off values (off only)
    for name, spec in table.items():
        if spec.status == NO_EFFECT:
            model.parse({**base, name: {"any": ["value"]}})
        elif spec.status == OFF_ONLY:
            for off in spec.off:
                model.parse({**base, name: off})
                if batch is not None:
                    model.parse({**batch, name: [off, off]})  # one per prompt of a batch
            with pytest.raises(RequestError, match=rf"{kind}\.{name}=.*not supported.*omit it or send"):
                model.parse({**base, name: "on"})
        else:
            assert spec.status == HONOURED
            # a typed honoured field refuses an object where it wants something else (messages, prompt: lists)
            if name not in ("sampling_params", "logit_bias", "stream_options", "response_format", "tool_choice"):
                with pytest.raises(RequestError, match=rf"\b{name}\b"):
                    model.parse({**base, name: {"x": object()}})


def test_openai_sampling_uses_openai_names():
    # the sampler's own range checks come back under the OpenAI field names
    body = CompletionsBody.parse({"prompt": "a", "seed": 2 ** 70, "min_tokens": 2, "temperature": 0.5})
    with pytest.raises(RequestError, match=r"^seed"):
        sampling_from_openai(body, 4)
    sp = sampling_from_openai(CompletionsBody.parse({"prompt": "a", "seed": 3, "min_tokens": 2, "stop": ".",
                                                     "response_format": {"type": "json_object"}}), 4)
    assert (sp.sampling_seed, sp.min_new_tokens, sp.max_new_tokens, sp.json_schema) == (3, 2, 4, '{"type": "object"}')
    chat = ChatBody.parse({"messages": _HI, "max_tokens": 5, "max_completion_tokens": 7, "skip_special_tokens": 3})
    assert chat.max_new_tokens == 7
    assert sampling_from_openai(chat, 7, extra_stop_ids=[9], skip_special_tokens=False).stop_token_ids == [9]


def test_update_payload_round_trip_and_python_callers():
    p = UpdateWeightsFromTensorPayload(serialized_named_tensors=["QUJD", "QUJD"], load_format="flattened_bucket",
                                       weight_version="7")
    assert p.serialized_named_tensors == ("QUJD", "QUJD")
    assert UpdateWeightsFromTensorPayload.from_sglang(p.to_sglang()) == p
    with pytest.raises(RequestError, match="serialized_named_tensors"):
        UpdateWeightsFromTensorPayload(serialized_named_tensors=[])


def test_logprob_options_checks_fields_together():
    assert LogprobOptions(return_logprob=True, token_ids_logprob=[3, 4]).token_ids_logprob == (3, 4)
    for kwargs, field in ((dict(return_logprob=False, top_logprobs_num=2), "top_logprobs_num"),
                          (dict(return_logprob="yes"), "return_logprob"),
                          (dict(return_logprob=True, logprob_start_len=-2), "logprob_start_len"),
                          (dict(return_logprob=True, token_ids_logprob=[True]), "token_ids_logprob"),
                          (dict(return_logprob=True, top_logprobs_num=1.5), "top_logprobs_num")):
        with pytest.raises(RequestError, match=field):
            LogprobOptions(**kwargs)


def test_generate_body_batched_per_prompt_values():
    reqs, batched, stream = GenerateRequest.parse_body(
        {"input_ids": [[1, 2], [3]], "rid": "r", "return_logprob": [True, None], "top_logprobs_num": [2, None],
         "image_data": [None, None], "stream": True})
    assert batched and stream and [r.rid for r in reqs] == ["r-0", "r-1"]
    assert [(r.return_logprob, r.top_logprobs_num) for r in reqs] == [(True, 2), (False, 0)]
    with pytest.raises(RequestError, match="rid: 1 entries for 2 prompts"):
        GenerateRequest.parse_body({"input_ids": [[1], [2]], "rid": ["a"]})
