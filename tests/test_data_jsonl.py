"""Chat JSONL reading: every bad row reported with its line and reason; normalization; atomic writes."""

import json
import os

import pytest

from k2sys.data import BadDataError, ChatRow, load_chat_jsonl, read_chat_jsonl, write_chat_jsonl, write_jsonl

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
TOOL_CONV = {
    "tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}],
    "messages": [
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function", "function": {"name": "add", "arguments": '{"a": 2,  "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "5"},
        {"role": "assistant", "content": "5"},
    ],
    "source": "unit",
}


def _write_lines(path, lines):
    path.write_text("".join(l + "\n" for l in lines), encoding="utf-8")


def test_bad_rows_reported_with_line_and_reason(tmp_path):
    lines = [
        json.dumps(GOOD),                                                           # 1 ok
        "{not json",                                                                # 2
        json.dumps({"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}),  # 3 missing role
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),              # 4 unknown role
        json.dumps({"messages": [{"role": "user", "content": "only user"}]}),       # 5 no assistant
        json.dumps({"messages": [{"role": "user", "content": "q"},                  # 6 unmatched tool result
                                 {"role": "tool", "tool_call_id": "nope", "content": "r"},
                                 {"role": "assistant", "content": "a"}]}),
        "",                                                                         # 7 blank: not a row
        json.dumps(TOOL_CONV),                                                      # 8 ok
        json.dumps([1, 2]),                                                         # 9 not an object
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]}]}),  # 10
    ]
    p = tmp_path / "d.jsonl"
    _write_lines(p, lines)
    rows, rep = load_chat_jsonl(p)
    assert [r.line for r in rows] == [1, 8]
    assert rep.rows_seen == 9 and rep.blank_lines == 1 and rep.n_bad == 7
    by_line = {b.line: b.reason for b in rep.bad}
    assert by_line[2].startswith("not JSON")
    assert by_line[3].startswith("missing role") and "messages[0]" in by_line[3]
    assert by_line[4].startswith("unknown role") and "'robot'" in by_line[4]
    assert by_line[5].startswith("no assistant turn")
    assert by_line[6].startswith("unmatched tool result") and "'nope'" in by_line[6]
    assert by_line[9].startswith("not an object")
    assert by_line[10].startswith("bad tool call") and "arguments is not valid JSON" in by_line[10]
    assert rep.reasons()["not JSON"] == 1
    # 7 of 9 bad > 0.5: the run must stop, naming lines and reasons.
    with pytest.raises(BadDataError) as ei:
        read_chat_jsonl(p, max_bad_fraction=0.5)
    msg = str(ei.value)
    assert "line 2: not JSON" in msg and "line 3: missing role" in msg and "max_bad_fraction=0.5" in msg
    # The first line alone says what and how to fix it (the CLI's one-line error); the rows follow.
    first = msg.splitlines()[0]
    assert "2 of 9 rows kept, 7 bad" in first and "max_bad_fraction=0.5" in first and "data.max_bad_fraction" in first
    # A tolerant threshold lets it through with the same report.
    rows2, rep2 = read_chat_jsonl(p, max_bad_fraction=0.8)
    assert len(rows2) == 2 and rep2.n_bad == 7


def test_threshold_edges(tmp_path):
    p = tmp_path / "d.jsonl"
    _write_lines(p, [json.dumps(GOOD), "x"])          # exactly 0.5 bad: allowed at 0.5
    rows, rep = read_chat_jsonl(p, max_bad_fraction=0.5)
    assert rep.bad_fraction == 0.5 and len(rows) == 1
    with pytest.raises(BadDataError, match="max_bad_fraction=0.02"):   # the default tolerates 2%
        read_chat_jsonl(p)
    _write_lines(p, [json.dumps(GOOD)] * 49 + ["x"])  # exactly 2% bad: allowed by default
    rows, rep = read_chat_jsonl(p)
    assert rep.bad_fraction == 0.02 and len(rows) == 49
    _write_lines(p, [json.dumps(GOOD)] * 48 + ["x", "y"])  # 4%: stops
    with pytest.raises(BadDataError, match="2 bad"):
        read_chat_jsonl(p)
    _write_lines(p, ["x", "y"])
    with pytest.raises(BadDataError):
        read_chat_jsonl(p, max_bad_fraction=1.0)        # nothing usable is always an error
    _write_lines(p, [])
    with pytest.raises(BadDataError, match="empty"):
        read_chat_jsonl(p)


def test_normalization_renames_ids_and_parses_arguments(tmp_path):
    p = tmp_path / "d.jsonl"
    _write_lines(p, [json.dumps(TOOL_CONV)])
    (row,), _ = read_chat_jsonl(p)
    call = row.messages[1]["tool_calls"][0]
    assert call["id"] == "functions.add:0" and call["function"]["arguments"] == {"a": 2, "b": 3}
    assert row.messages[1]["content"] == ""
    assert row.messages[2] == {"role": "tool", "tool_call_id": "functions.add:0", "content": "5"}
    assert row.meta == {"source": "unit"}
    # The key is content-based: the same conversation spelled with other ids/spacing hashes the same.
    other = json.loads(json.dumps(TOOL_CONV))
    other["messages"][1]["tool_calls"][0]["id"] = "zzz"
    other["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"b": 3, "a": 2}
    other["messages"][2]["tool_call_id"] = "zzz"
    _write_lines(p, [json.dumps(other)])
    (row2,), _ = read_chat_jsonl(p)
    assert row2.key == row.key


def test_k2_template_accepts_normalized_rows(tmp_path):
    from k2sys.tokenizer import render_chat
    p = tmp_path / "d.jsonl"
    _write_lines(p, [json.dumps(TOOL_CONV)])
    (row,), _ = read_chat_jsonl(p)
    text = render_chat(row.messages, row.tools)
    assert '<|tool_call_begin|>functions.add:0<|tool_call_argument_begin|>{"a": 2, "b": 3}' in text
    assert "## Return of functions.add:0\n5" in text


def test_writer_round_trip_and_atomic(tmp_path):
    p = tmp_path / "sub" / "out.jsonl"
    assert write_chat_jsonl(p, [GOOD, TOOL_CONV]) == 2
    rows, rep = read_chat_jsonl(p)
    assert len(rows) == 2 and rep.n_bad == 0
    assert write_chat_jsonl(p, rows) == 2          # ChatRow round trip
    rows2, _ = read_chat_jsonl(p)
    assert [r.key for r in rows2] == [r.key for r in rows]
    before = p.read_bytes()

    def boom():
        yield {"a": 1}
        raise RuntimeError("generator died mid-write")
    with pytest.raises(RuntimeError):
        write_jsonl(p, boom())
    assert p.read_bytes() == before                      # old file intact
    assert sorted(os.listdir(p.parent)) == ["out.jsonl"]  # no temp file left behind
    with pytest.raises(ValueError, match="conversation 0 is invalid: no assistant turn"):
        write_chat_jsonl(p, [{"messages": [{"role": "user", "content": "x"}]}])
    assert isinstance(rows[0], ChatRow)
