"""User data sources: RL prompts and SFT chats from JSONL, Parquet and `datasets` save_to_disk
directories written by the real libraries; key mapping; bad rows reported by row number."""

import json
import logging

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")   # test-only: writes the directories the loaders must read

from k2sys.data import (BadDataError, PromptRecord, SourceReport, load_chat_jsonl, load_chat_rows, load_prompts,
                        read_records, source_format)

ROWS = [
    {"question": "1+1?", "solution": "2", "level": 1},
    {"question": "What is 3*4?", "solution": "12", "level": 2},
    {"question": "Half of one?", "solution": "\\frac{1}{2}", "level": 3},
    {"question": "10-7?", "solution": "3", "level": 1},
]


def _jsonl(path, objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs), encoding="utf-8")
    return path


def _as_expected(rows, prompt="question", label="solution"):
    return [(r[prompt], r[label], {k: v for k, v in r.items() if k not in (prompt, label)}) for r in rows]


def _triples(records):
    return [(r.prompt, r.label, r.metadata) for r in records]


def test_three_formats_same_prompts_and_ids(tmp_path):
    j = _jsonl(tmp_path / "p.jsonl", ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    want = _as_expected(ROWS)
    loaded = {}
    for src in (j, tmp_path / "p.parquet", tmp_path / "ds"):
        recs, rep = load_prompts(src, prompt_key="question", label_key="solution")
        assert isinstance(rep, SourceReport) and rep.n_bad == 0 and rep.rows_seen == 4
        assert _triples(recs) == want
        assert [r.row for r in recs] == [1, 2, 3, 4]
        loaded[source_format(src)] = recs
    assert set(loaded) == {"jsonl", "parquet", "datasets"}
    # The id is a content hash: identical across formats, distinct across different prompts.
    ids = [[r.id for r in recs] for recs in loaded.values()]
    assert ids[0] == ids[1] == ids[2] and len(set(ids[0])) == 4


def test_datasets_dir_matches_the_library_and_keeps_shard_order(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": i * i, "tags": ["a"] * (i % 3)} for i in range(50)]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=3)
    assert len(list((tmp_path / "ds").glob("*.arrow"))) == 3
    reference = datasets.load_from_disk(str(tmp_path / "ds"))       # the library's own reader
    recs, rep = load_prompts(tmp_path / "ds")
    assert rep.format == "datasets" and rep.n_ok == 50
    assert [(r.prompt, r.label, r.metadata["tags"]) for r in recs] == \
        [(x["prompt"], x["answer"], x["tags"]) for x in reference]
    assert [r.row for r in recs] == list(range(1, 51))


def test_dataset_dict_requires_a_split(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:3]),
                               "test": datasets.Dataset.from_list(ROWS[3:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError) as ei:
        load_prompts(tmp_path / "dd", prompt_key="question", label_key="solution")
    assert "'train'" in str(ei.value) and "'test'" in str(ei.value) and "split=" in str(ei.value)
    with pytest.raises(ValueError, match="no split 'validation'.*'train', 'test'"):
        load_prompts(tmp_path / "dd", prompt_key="question", label_key="solution", split="validation")
    recs, rep = load_prompts(tmp_path / "dd", prompt_key="question", label_key="solution", split="test")
    assert _triples(recs) == _as_expected(ROWS[3:]) and rep.source.endswith("[test]")
    recs, _ = load_prompts(tmp_path / "dd", prompt_key="question", label_key="solution", split="train")
    assert _triples(recs) == _as_expected(ROWS[:3])
    # A split for data that has none is refused, not ignored.
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match="no splits"):
        load_prompts(tmp_path / "p.parquet", prompt_key="question", label_key="solution", split="train")


def test_key_missing_from_every_row_names_the_setting_and_columns(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    with pytest.raises(BadDataError) as ei:
        load_prompts(tmp_path / "p.parquet")                    # defaults: prompt / answer
    msg = str(ei.value)
    assert "data.prompt_key" in msg and "'question'" in msg and "'solution'" in msg and "'level'" in msg
    with pytest.raises(BadDataError) as ei:
        load_prompts(tmp_path / "p.parquet", prompt_key="question")
    assert "data.label_key" in str(ei.value) and "'solution'" in str(ei.value)
    j = _jsonl(tmp_path / "p.jsonl", ROWS)
    with pytest.raises(BadDataError, match=r"data\.label_key=answer.*'question'"):
        load_prompts(j, prompt_key="question")
    # label_key=None: no label by design; the answer column stays in the metadata.
    recs, _ = load_prompts(j, prompt_key="question", label_key=None)
    assert [r.label for r in recs] == [None] * 4 and recs[0].metadata == {"solution": "2", "level": 1}


def test_bad_rows_reported_with_row_numbers(tmp_path):
    rows = [
        {"question": "ok one", "solution": "1"},               # 1
        {"question": None, "solution": "2"},                    # 2 null prompt
        {"question": "no label", "solution": None},             # 3 null label
        {"question": "   ", "solution": "4"},                   # 4 blank prompt
        {"question": "ok two", "solution": "5"},                # 5
        {"question": "ok three", "solution": "6"},              # 6
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    with pytest.raises(BadDataError, match="max_bad_fraction=0.02"):   # 3 of 6 bad: far above the default 2%
        load_prompts(tmp_path / "p.parquet", prompt_key="question", label_key="solution")
    recs, rep = load_prompts(tmp_path / "p.parquet", prompt_key="question", label_key="solution",
                             max_bad_fraction=0.5)
    assert [r.row for r in recs] == [1, 5, 6] and [r.prompt for r in recs] == ["ok one", "ok two", "ok three"]
    by_row = {b.line: b.reason for b in rep.bad}
    assert set(by_row) == {2, 3, 4}
    assert by_row[2].startswith("missing prompt") and "'question'" in by_row[2]
    assert by_row[3].startswith("missing label") and "'solution'" in by_row[3]
    assert by_row[4].startswith("empty prompt")
    summary = rep.summary()
    assert "row 2: missing prompt" in summary and "dataset[N - 1]" in summary and "line 2" not in summary

    lines = [json.dumps({"question": "a", "solution": "1", "src": "x"}),   # 1
             "{not json",                                                    # 2
             json.dumps({"q": "wrong key", "solution": "2"}),               # 3 key missing on this row
             "",                                                             # 4 blank: not a row
             json.dumps({"question": "no label here"}),                     # 5
             json.dumps(["a list"]),                                         # 6
             json.dumps({"question": 7, "solution": "3"}),                   # 7 not a string
             json.dumps({"question": "b", "solution": [1, 2]})]             # 8 any JSON label is fine
    j = _jsonl(tmp_path / "p.jsonl", lines)
    recs, rep = load_prompts(j, prompt_key="question", label_key="solution", max_bad_fraction=None)
    assert [r.row for r in recs] == [1, 8] and recs[1].label == [1, 2] and recs[0].metadata == {"src": "x"}
    assert rep.rows_seen == 7 and rep.blank_lines == 1
    by_line = {b.line: b.reason for b in rep.bad}
    assert set(by_line) == {2, 3, 5, 6, 7}
    assert by_line[2].startswith("not JSON")
    # A missing key names the key and the keys the row does have.
    assert by_line[3] == "missing prompt: row has no 'question' (its keys: 'q', 'solution')"
    assert by_line[5] == "missing label: row has no 'solution' (its keys: 'question')"
    assert by_line[6].startswith("not an object")
    assert by_line[7].startswith("bad prompt") and "int" in by_line[7]


def test_mostly_bad_file_stops(tmp_path):
    rows = [{"prompt": "fine", "answer": "1"}] + [{"prompt": None, "answer": str(i)} for i in range(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(BadDataError) as ei:
        load_prompts(tmp_path / "ds", max_bad_fraction=0.5)
    msg = str(ei.value)
    assert "1 of 4 rows kept" in msg and "row 2: missing prompt" in msg and "max_bad_fraction=0.5" in msg
    recs, rep = load_prompts(tmp_path / "ds", max_bad_fraction=0.8)
    assert len(recs) == 1 and rep.n_bad == 3
    # An empty table is no data, not a clean file.
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")
    with pytest.raises(BadDataError, match="no rows"):
        load_prompts(tmp_path / "empty.parquet")


def test_message_prompts_and_nested_label_key(tmp_path):
    # The verl layout: prompt = chat messages, label nested in reward_model.ground_truth.
    rows = [
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
         "reward_model": {"ground_truth": "4", "style": "rule"}, "data_source": "toy"},
        {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
         "reward_model": {"ground_truth": "x", "style": "rule"}, "data_source": "toy"},          # ends with assistant
        {"prompt": [{"role": "user", "content": "3+3?"}],
         "reward_model": {"ground_truth": None, "style": "rule"}, "data_source": "toy"},        # null nested label
        {"prompt": [{"role": "user", "content": "5+5?"}],
         "reward_model": {"ground_truth": "10", "style": "rule"}, "data_source": "toy"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "verl.parquet")
    recs, rep = load_prompts(tmp_path / "verl.parquet", label_key="reward_model.ground_truth", max_bad_fraction=None)
    assert [r.row for r in recs] == [1, 4]
    assert recs[0].prompt == rows[0]["prompt"] and recs[0].label == "4"
    assert recs[0].metadata == {"reward_model": {"ground_truth": "4", "style": "rule"}, "data_source": "toy"}
    by_row = {b.line: b.reason for b in rep.bad}
    assert by_row[2].startswith("bad prompt") and "'assistant'" in by_row[2]
    assert by_row[3].startswith("missing label") and "reward_model.ground_truth" in by_row[3]
    with pytest.raises(BadDataError, match="data.label_key"):
        load_prompts(tmp_path / "verl.parquet", label_key="reward_model.answer")

    # messages_key: the prompt must be a message list; tool calls are normalized as for SFT.
    conv = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"c": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    j = _jsonl(tmp_path / "m.jsonl", [{"conversation": conv, "answer": "sunny"},
                                      {"conversation": "just text", "answer": "x"}])
    recs, rep = load_prompts(j, messages_key="conversation", max_bad_fraction=None)
    assert len(recs) == 1 and recs[0].prompt[-1] == {"role": "tool", "tool_call_id": "functions.get:0",
                                                      "content": "sunny"}
    assert recs[0].prompt[1]["tool_calls"][0]["function"]["arguments"] == {"c": "Oslo"}
    assert rep.bad[0].line == 2 and "must be a list of chat messages" in rep.bad[0].reason
    with pytest.raises(BadDataError, match="data.messages_key"):
        load_prompts(j, messages_key="messages")


CHATS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "src": "a"},
    {"messages": [{"role": "user", "content": "only user"}], "src": "b"},                        # no assistant
    {"messages": [{"role": "user", "content": "2+3?"},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"id": "c9", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
                  {"role": "tool", "tool_call_id": "c9", "content": "5"},
                  {"role": "assistant", "content": "5"}],
     "tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}], "src": "c"},
]


def test_chat_rows_match_load_chat_jsonl(tmp_path):
    j = _jsonl(tmp_path / "c.jsonl", CHATS + ["{oops"])
    ref_rows, ref_rep = load_chat_jsonl(j)                    # the JSONL reader is the reference
    rows, rep = load_chat_rows(j)
    assert [(r.messages, r.tools, r.line, r.meta) for r in rows] == \
        [(r.messages, r.tools, r.line, r.meta) for r in ref_rows]
    assert [(b.line, b.reason) for b in rep.bad] == [(b.line, b.reason) for b in ref_rep.bad]

    # The same conversations as a DatasetDict with a renamed messages column and tools stored as a
    # JSON string (the form Arrow keeps exactly): same rows, numbered by row.
    tab = [{"conversation": c["messages"], "functions": json.dumps(c["tools"]) if "tools" in c else "",
            "src": c["src"]} for c in CHATS]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(tab)}).save_to_disk(str(tmp_path / "dd"))
    rows2, rep2 = load_chat_rows(tmp_path / "dd", messages_key="conversation", tools_key="functions",
                                 split="train")
    assert [(r.messages, r.tools, r.line, r.meta) for r in rows2] == \
        [(r.messages, r.tools, r.line, r.meta) for r in ref_rows]
    assert [(b.line, b.reason) for b in rep2.bad] == [(2, ref_rep.bad[0].reason)] and rep2.unit == "row"
    assert rows2[1].key == ref_rows[1].key                 # content identity survives the format change

    with pytest.raises(BadDataError, match="data.messages_key"):
        load_chat_rows(tmp_path / "dd", split="train")
    with pytest.raises(BadDataError, match="data.tools_key"):
        load_chat_rows(tmp_path / "dd", messages_key="conversation", tools_key="tool_list", split="train")


def test_chat_rows_parquet_bad_tools_and_struct_warning(tmp_path, caplog):
    tab = [{"messages": CHATS[0]["messages"], "tools": "[not json"},
           {"messages": None, "tools": ""},
           {"messages": CHATS[0]["messages"], "tools": ""}]
    pq.write_table(pa.Table.from_pylist(tab), tmp_path / "c.parquet")
    rows, rep = load_chat_rows(tmp_path / "c.parquet")
    assert [r.line for r in rows] == [3] and rows[0].tools is None
    by_row = {b.line: b.reason for b in rep.bad}
    assert by_row[1].startswith("bad tools") and by_row[2] == "missing messages: 'messages' is null"
    j = _jsonl(tmp_path / "s.jsonl", [{"messages": "a string"}])
    assert load_chat_rows(j)[1].bad[0].reason.startswith("bad messages: 'messages' is a string")
    # Tools stored as structs: Arrow unions the fields of every row, so the loader warns.
    structs = [{"messages": CHATS[2]["messages"], "tools": CHATS[2]["tools"]}]
    pq.write_table(pa.Table.from_pylist(structs), tmp_path / "s.parquet")
    with caplog.at_level(logging.WARNING, logger="k2sys.data"):
        rows, _ = load_chat_rows(tmp_path / "s.parquet")
    assert len(rows) == 1 and "JSON string column" in caplog.text


def test_read_records_and_format_errors(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    recs, rep = read_records(tmp_path / "p.parquet")
    assert recs == list(enumerate(ROWS, start=1)) and rep.format == "parquet"
    # An Arrow IPC file written by pyarrow (file format) reads the same.
    with pa.OSFile(str(tmp_path / "p.arrow"), "wb") as f, pa.ipc.new_file(f, pa.Table.from_pylist(ROWS).schema) as w:
        w.write_table(pa.Table.from_pylist(ROWS))
    assert read_records(tmp_path / "p.arrow")[0] == recs

    (tmp_path / "p.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"unsupported data file suffix '\.csv'.*Parquet"):
        load_prompts(tmp_path / "p.csv")
    (tmp_path / "somedir").mkdir()
    with pytest.raises(ValueError, match="not a `datasets` save_to_disk directory"):
        load_prompts(tmp_path / "somedir")
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "arr.json").write_text(json.dumps(ROWS, indent=1))
    with pytest.raises(ValueError, match="one JSON array.*JSON lines"):
        load_prompts(tmp_path / "arr.json")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        load_prompts(tmp_path / "bad.parquet")


def test_prompt_record_is_frozen():
    r = PromptRecord(prompt="p", label=None, metadata={}, id="x", row=1)
    with pytest.raises(AttributeError):
        r.prompt = "q"
