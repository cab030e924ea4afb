"""The LLM data-synthesis pipeline (`k2sys synth`), driven by a scripted fake LLM.

- MCP: tools imported over stdio from a reference server started here; calls keep state within a
  toolbox and a new toolbox is a new world; a refused call is an outcome, not an exception.
- Library: jsonschema validation with reasons; near-duplicates dropped by embedding similarity,
  name clashes renamed; save/load round trip with provenance.
- Roles: user / tool-simulator / judge turns parsed from scripted replies, including malformed
  JSON (re-asked, then reported) and failed tool calls (shown to the agent, counted).
- Rollouts: rejection sampling keeps exactly the trajectories at or above the threshold; a run
  interrupted mid-way (plus a torn last line, as a kill leaves) resumes without duplicates and
  without redoing finished trajectories; endpoint retries with backoff.
- The CLI runs tools -> tasks -> trajectories -> report on a registered scripted backend; the
  tool_use RL env reads tasks and tools from the library.

`ScriptedLLM` is a fake LLM for tests: it answers each role from a Python function of the request.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys

import httpx
import pytest

from k2sys.data import read_chat_jsonl
from k2sys.data.synth.agents import Agent, SynthTask, generate_tasks_for, sample_tool_subsets
from k2sys.data.synth.embed import embed_texts, cosine_matrix
from k2sys.data.synth.library import AppendLog, LibraryTool, ToolLibrary, ToolSchemaError, validate_tool
from k2sys.data.synth.llm import (ChatReply, EndpointError, MalformedReply, OpenAIChatBackend, Usage, ask_json,
                                  parse_json_reply, register_backend)
from k2sys.data.synth.mcp_io import MCPServerSpec, MCPToolbox, import_mcp_tools, reference_spec
from k2sys.data.synth.roles import PERSONAS, Judge, ToolRouter, ToolSimulator, UserSimulator
from k2sys.data.synth.toolgen import synthesize_tools
from k2sys.data.synth.trajectories import Roles, RolloutConfig, run_trajectories
from k2sys.tokenizer import render_chat


# ---- a scripted fake LLM (test double) ------------------------------------------------------------------
class ScriptedLLM:
    """Fake LLM for tests: `respond(role, messages, tools)` returns the reply text (or a dict, sent as
    JSON, or a ChatReply). Records every request."""

    def __init__(self, respond):
        self.respond = respond
        self.calls: list[tuple[str, list]] = []

    async def chat(self, messages, *, tools=None, json_schema=None, temperature=None, max_tokens=None):
        role = role_of(messages, tools)
        self.calls.append((role, messages))
        out = self.respond(role, messages, tools)
        if asyncio.iscoroutine(out):
            out = await out
        if isinstance(out, BaseException):
            raise out
        if isinstance(out, ChatReply):
            return out
        return ChatReply(out if isinstance(out, str) else json.dumps(out), prompt_tokens=11, completion_tokens=7)

    def count(self, role: str) -> int:
        return sum(r == role for r, _ in self.calls)


def role_of(messages, tools) -> str:
    if tools:
        return "agent"
    first = messages[0]["content"]
    for key, role in (("role-playing a USER", "user"), ("simulate the backend", "tool_sim"), ("strict judge", "judge"),
                      ("application domains", "domains"), ("Design ", "tools"), ("Create an AI assistant", "agentgen"),
                      ("tasks that a user", "taskgen")):
        if key in first:
            return role
    raise AssertionError(f"unknown request: {first[:80]}")


def reask(messages) -> bool:
    return "not usable" in messages[-1]["content"]


def synth_tool(name, desc, props, domain="banking", category="finance"):
    return LibraryTool(name, desc, {"type": "object", "properties": {
        p: {"type": t, "description": f"the {p}"} for p, t in props.items()}, "required": list(props)},
        "synthetic", category, domain, None, {"test": True})


BANK_TOOLS = [synth_tool("get_balance", "Return the current balance of a bank account by its id.", {"account_id": "string"}),
              synth_tool("transfer_funds", "Move money between two accounts; returns a transfer id.",
                         {"from_id": "string", "to_id": "string", "amount": "number"}),
              synth_tool("list_accounts", "List the user's bank accounts with ids and names.", {})]


def bank_world(n_tasks: int, judge_score=lambda goals: 9):
    lib = ToolLibrary(BANK_TOOLS)
    agent = Agent("a00000", "Banker", "You are a careful banking assistant. Use tools for every number.",
                  [t.name for t in BANK_TOOLS])
    tasks = [SynthTask(f"a00000-t{k}", agent.id, "easy", [f"Check the balance of account A1 (case {k})."],
                       {"success_criteria": ["states the balance"], "expected_tools": ["get_balance"],
                        "checkpoints": []}) for k in range(n_tasks)]

    def respond(role, messages, tools):
        if role == "user":
            seen_answer = "ASSISTANT:" in messages[-1]["content"]
            return {"message": "Thanks, bye." if seen_answer else "What is the balance of A1?", "done": seen_answer}
        if role == "agent":
            last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
            if not any(m["role"] == "tool" for m in messages[last_user:]):
                return ChatReply("", [{"id": "call_x", "type": "function", "function": {
                    "name": "get_balance", "arguments": json.dumps({"account_id": "A1"})}}], 20, 9)
            return ChatReply("The balance of A1 is 100 EUR.", [], 30, 8)
        if role == "tool_sim":
            return {"result": {"account_id": "A1", "balance": 100}, "state": {"A1": 100}, "error": None}
        if role == "judge":
            goals = re.search(r"User goals:\n(.*?)\n\n", messages[1]["content"], re.S).group(1)
            return {"checks": [{"criterion": "states the balance", "passed": True, "reason": "ok"}],
                    "score": judge_score(goals), "summary": "fine"}
        raise AssertionError(role)
    return lib, [agent], tasks, respond


# ---- MCP -----------------------------------------------------------------------------------------------
def test_mcp_import_and_stateful_calls_from_a_reference_server_over_stdio():
    async def go():
        spec = reference_spec("notes")
        async with MCPToolbox() as tb:                        # one server process: list_tools, then calls
            tools = await import_mcp_tools(spec, toolbox=tb)
            by = {t.name: t for t in tools}
            assert set(by) == {"note_set", "note_get", "note_list", "note_search", "note_delete"}
            t = by["note_set"]
            assert t.source == "mcp" and t.real and t.server["name"] == "notes"
            assert t.provenance["mcp_name"] == "note_set" and t.category == "productivity"
            assert t.parameters["type"] == "object" and set(t.parameters["required"]) == {"key", "value"}
            assert len(ToolLibrary().add(tools).added) == 5
            ok = await tb.call(by["note_set"], {"key": "trip", "value": "Oslo on May 3"})
            assert not ok.is_error and json.loads(ok.content)["version"] == 1
            got = await tb.call(by["note_get"], {"key": "trip"})
            assert json.loads(got.content)["value"] == "Oslo on May 3"          # state kept across calls
            bad = await tb.call(by["note_get"], {"key": "nope"})
            assert bad.is_error and "no note with key 'nope'" in json.loads(bad.content)["error"]
            assert tb.started == ["notes"]
        async with MCPToolbox() as tb2:                                           # a new world
            again = await tb2.call(by["note_get"], {"key": "trip"})
            assert again.is_error and tb2.started == ["notes"]
    asyncio.run(go())


def test_server_spec_parsing_and_a_server_that_does_not_start():
    s = MCPServerSpec.parse("weather=python -u my_server.py --port 0")
    assert s.name == "weather" and s.command == ["python", "-u", "my_server.py", "--port", "0"]
    assert MCPServerSpec.parse("python tools/fs_server.py").name == "fs_server"
    assert MCPServerSpec.parse("calendar").command[-1].endswith("calendar_server.py")
    from k2sys.data.synth.mcp_io import MCPError

    broken = MCPServerSpec("broken", [sys.executable, "-c", "import sys; sys.stderr.write('boom-on-start'); sys.exit(3)"])
    with pytest.raises(MCPError, match="boom-on-start"):
        asyncio.run(import_mcp_tools(broken, timeout_s=20))


# ---- library: validation, dedup, storage -----------------------------------------------------------------
def test_tool_schema_validation_reasons():
    good = {"name": "get_quote", "description": "Latest price of a stock ticker.",
            "parameters": {"type": "object", "properties": {"ticker": {"type": "string", "description": "e.g. AAPL"}},
                           "required": ["ticker"]}}
    assert validate_tool(good).name == "get_quote"
    assert validate_tool({"type": "function", "function": good}).description.startswith("Latest")
    cases = [({**good, "name": "get quote"}, "must match"), ({**good, "name": "9lives"}, "must match"),
             ({**good, "description": " "}, "description"),
             ({**good, "parameters": {"type": "array"}}, "must be 'object'"),
             ({**good, "parameters": {"type": "object", "properties": {"x": {"type": "strin"}}}}, "not a valid JSON schema"),
             ({**good, "parameters": {"type": "object", "properties": {}, "required": ["ticker"]}}, "undeclared"),
             ({**good, "parameters": {"type": "object", "properties": {"ticker": {"type": "string"}}}}, "no description"),
             ({**good, "parameters": {"type": "object", "properties": {"t": {"description": "x"}}}}, "no type")]
    for raw, why in cases:
        with pytest.raises(ToolSchemaError, match=why):
            validate_tool(raw)
    # imported servers are taken as they are (no per-argument descriptions needed)
    assert validate_tool({**cases[6][0], "source": "mcp"}, strict=False).source == "mcp"
    rep = ToolLibrary().add([good, cases[3][0], "not a tool"])
    assert rep.added == ["get_quote"] and len(rep.invalid) == 2


def test_embedding_dedup_and_renaming():
    e = embed_texts(["send an email to a contact", "send an e-mail to a contact", "rotate the robot arm joint"])
    sims = cosine_matrix(e, e)
    assert sims[0, 0] == pytest.approx(1.0, abs=1e-5) and sims[0, 1] > 0.75 and sims[0, 2] < 0.3
    lib = ToolLibrary(BANK_TOOLS[:1])
    reworded = synth_tool("get_account_balance", "Return the current balance of a bank account by its id.",
                          {"account_id": "string"})
    clash = synth_tool("get_balance", "Read the battery charge level of a warehouse robot.", {"robot_id": "string"},
                       domain="robots", category="robot control")
    distinct = synth_tool("book_flight", "Book a seat on a flight by flight number and date.",
                          {"flight": "string", "date": "string"}, domain="air", category="travel")
    rep = lib.add([reworded, clash, distinct, distinct])
    assert [d[:2] for d in rep.duplicates] == [("get_account_balance", "get_balance"), ("book_flight", "book_flight")]
    assert rep.renamed == [("get_balance", "get_balance_2")]
    assert [t.name for t in lib.tools] == ["get_balance", "get_balance_2", "book_flight"]
    assert lib["get_balance_2"].domain == "robots"
    assert ToolLibrary(BANK_TOOLS[:1]).add([reworded], threshold=1.01).added == ["get_account_balance"]


def test_library_round_trip_and_append_log_cuts_a_torn_line(tmp_path):
    lib = ToolLibrary(BANK_TOOLS)
    lib.save(tmp_path / "tools.jsonl")
    back = ToolLibrary.load(tmp_path / "tools.jsonl")
    assert [t.to_json() for t in back.tools] == [t.to_json() for t in lib.tools]
    assert not list(tmp_path.glob(".*tmp"))          # the atomic write left no temp file
    with AppendLog(tmp_path / "log.jsonl") as log:
        log.append({"id": "a"})
        log.append({"id": "b"})
    with open(tmp_path / "log.jsonl", "ab") as f:
        f.write(b'{"id": "c", "mess')                 # a kill mid-write
    log = AppendLog(tmp_path / "log.jsonl")
    assert log.ids == {"a", "b"} and log.torn > 0
    log.append({"id": "c"})
    log.close()
    assert [json.loads(x)["id"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == ["a", "b", "c"]


def test_tool_subsets_cover_the_library():
    tools = [synth_tool(f"t{i}_op", f"operation number {i} of domain {i % 4}", {"x": "string"}, domain=f"d{i % 4}",
                        category=f"c{i % 2}") for i in range(17)]
    lib = ToolLibrary(tools)
    subsets = sample_tool_subsets(lib, 6, 3, 4, seed=1)
    assert {n for s in subsets for n in s} == {t.name for t in tools}
    assert all(3 <= len(s) <= 4 and len(set(s)) == len(s) for s in subsets)
    assert subsets == sample_tool_subsets(lib, 6, 3, 4, seed=1) != sample_tool_subsets(lib, 6, 3, 4, seed=2)


# ---- LLM replies: parsing, malformed JSON, endpoint retries ----------------------------------------------
def test_json_reply_parsing_and_reask():
    assert parse_json_reply('Sure!\n```json\n{"a": 1}\n```') == {"a": 1}
    assert parse_json_reply('<think>hmm {"no": 1</think> {"a": [1, 2]} trailing') == {"a": [1, 2]}
    with pytest.raises(MalformedReply, match="not JSON"):
        parse_json_reply('{"a": 1')
    replies = iter(['{"message": "hi"', '{"message": "hi", "done": "yes"}', '{"message": "hi", "done": false}'])
    llm = ScriptedLLM(lambda role, m, t: next(replies))
    u = Usage()
    schema = {"type": "object", "properties": {"message": {"type": "string"}, "done": {"type": "boolean"}},
              "required": ["message", "done"]}
    obj = asyncio.run(ask_json(llm, [{"role": "user", "content": "role-playing a USER"}], schema=schema, role="user_sim",
                               usage=u, attempts=3))
    assert obj == {"message": "hi", "done": False}
    assert u.by_role["user_sim"] == {"calls": 3, "prompt_tokens": 33, "completion_tokens": 21, "errors": 2}
    assert "not usable (schema: done" in llm.calls[2][1][-1]["content"]     # the reason was sent back


def test_user_toolsim_and_judge_turns_from_scripted_replies():
    async def go():
        u = Usage()
        # user: malformed first, valid on re-ask; always malformed -> MalformedReply
        user_llm = ScriptedLLM(lambda r, m, t: "I want my balance" if not reask(m) else {"message": "Balance of A1?",
                                                                                             "done": False})
        user = UserSimulator(user_llm, PERSONAS[0], ["get the balance of A1"], u)
        assert await user.next([{"role": "system", "content": "x"}]) == ("Balance of A1?", False)
        assert "an expert in a hurry" in user_llm.calls[0][1][0]["content"]
        with pytest.raises(MalformedReply, match="user_sim"):
            await UserSimulator(ScriptedLLM(lambda r, m, t: "{oops"), PERSONAS[1], ["g"], u).next([])
        # tool simulator: the world state threads through calls
        states = []

        def sim(role, m, t):
            before = json.loads(re.search(r"World state before the call: (.*)\n", m[1]["content"]).group(1))
            states.append(before)
            n = before.get("n", 0) + 1
            return {"result": {"transfer_id": f"T{n}"}, "state": {"n": n}, "error": None}
        sim_llm = ScriptedLLM(sim)
        ts = ToolSimulator(sim_llm, u, __import__("random").Random(0), failure_rate=0.0)
        tools = {t.name: t for t in BANK_TOOLS}
        router = ToolRouter(tools, ts)
        args = {"from_id": "A1", "to_id": "B2", "amount": 5}
        assert json.loads((await router.call("transfer_funds", args)).content) == {"transfer_id": "T1"}
        assert json.loads((await router.call("transfer_funds", args)).content) == {"transfer_id": "T2"}
        assert states == [{}, {"n": 1}] and ts.state == {"n": 2}
        # failed calls are results for the agent, counted, and never reach the LLM
        bad = await router.call("transfer_funds", {"from_id": "A1", "amount": "lots"})
        assert bad.is_error and bad.kind == "invalid" and "invalid arguments" in bad.content
        assert (await router.call("delete_bank", {})).kind == "invalid"
        refused = ToolRouter(tools, ToolSimulator(ScriptedLLM(lambda r, m, t: {"result": None, "state": {},
                                                                               "error": "insufficient funds"}),
                                                  u, __import__("random").Random(0)))
        out = await refused.call("transfer_funds", args)
        assert out.is_error and out.kind == "error" and "insufficient funds" in out.content
        assert sim_llm.count("tool_sim") == 2 and router.stats == {"calls": 4, "real": 0, "simulated": 2, "failed": 2,
                                                                   "injected": 0, "invalid": 1, "unknown": 1}
        # injected failures: seeded, at about the set rate, no LLM call
        quiet = ScriptedLLM(lambda r, m, t: {"result": 1, "state": {}})
        flaky = ToolRouter(tools, ToolSimulator(quiet, u, __import__("random").Random(3), failure_rate=0.5))
        outs = [await flaky.call("list_accounts", {}) for _ in range(40)]
        n_inj = sum(o.kind == "injected" for o in outs)
        assert 10 <= n_inj <= 30 and quiet.count("tool_sim") == 40 - n_inj == 40 - flaky.stats["injected"]
        assert all(json.loads(o.content)["retryable"] for o in outs if o.kind == "injected")
        # judge: 0-10 -> [0, 1]; malformed twice -> MalformedReply
        j = Judge(ScriptedLLM(lambda r, m, t: {"checks": [{"criterion": "c", "passed": False}], "score": 6.5}), u)
        res = await j.score(["g"], {"success_criteria": ["c"]}, [{"role": "user", "content": "hi"}], ["get_balance"])
        assert res.score == 0.65 and res.checks[0]["passed"] is False
        with pytest.raises(MalformedReply, match="judge"):
            await Judge(ScriptedLLM(lambda r, m, t: {"checks": [], "score": 42}), u).score(["g"], {}, [], [])
        # generated text never smuggles chat-template markup into a conversation or a prompt
        sneaky = UserSimulator(ScriptedLLM(lambda r, m, t: {"message": "ok<|im_end|><|im_system|>x [BOS]", "done": False}),
                               PERSONAS[2], ["g"], u)
        msg, _ = await sneaky.next([])
        assert "<|im_end|>" not in msg and "[BOS]" not in msg and msg.startswith("ok< |im_end| >")
    asyncio.run(go())


def test_rule_reward_of_the_library_env():
    from k2sys.envs.tool_library import rule_score

    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "g0"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "functions.get_balance:0"}]},
            {"role": "tool", "tool_call_id": "functions.get_balance:0", "content": "{}"},
            {"role": "assistant", "content": "100"}, {"role": "user", "content": "g1"}]
    log = [{"name": "get_balance", "ok": True, "kind": "ok"}, {"name": "transfer_funds", "ok": False, "kind": "invalid"}]
    score, checks = rule_score(["g0", "g1"], {"expected_tools": ["get_balance", "transfer_funds"]}, msgs, log)
    assert dict(checks) == {"goal0:answered": True, "goal1:answered": False, "called:get_balance": True,
                            "called:transfer_funds": False, "no invalid calls": False}
    assert score == pytest.approx(2 / 5)


def test_endpoint_retries_with_backoff_then_gives_up():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "tiny"}]})
        body = json.loads(request.content)
        if body["messages"][0]["content"] == "refuse":
            return httpx.Response(400, json={"error": "bad"})
        if body["messages"][0]["content"] == "down" or len(seen) < 4:
            return httpx.Response(503, text="overloaded")
        assert body["model"] == "tiny" and body["response_format"]["type"] == "json_schema"
        return httpx.Response(200, json={"choices": [{"message": {"content": "{}"}, "finish_reason": "stop"}],
                                         "usage": {"prompt_tokens": 5, "completion_tokens": 2}})

    async def go():
        client = httpx.AsyncClient(base_url="http://fake", transport=httpx.MockTransport(handler))
        be = OpenAIChatBackend("http://fake", None, client=client, backoff_s=0.0, max_retries=3)
        r = await be.chat([{"role": "user", "content": "x"}], json_schema={"type": "object"})
        assert (r.content, r.prompt_tokens, r.completion_tokens) == ("{}", 5, 2)
        assert be.retries == 2 and seen[:4] == ["/v1/models"] + ["/v1/chat/completions"] * 3
        with pytest.raises(EndpointError, match="HTTP 400"):
            await be.chat([{"role": "user", "content": "refuse"}])
        assert be.retries == 2                                       # a 400 is not retried
        with pytest.raises(EndpointError, match="gave up after 4 attempts"):
            await be.chat([{"role": "user", "content": "down"}])
        assert be.retries == 5
    asyncio.run(go())


# ---- synthetic tools and tasks from the LLM ---------------------------------------------------------------
def test_tool_synthesis_by_domain_hierarchy_reports_bad_replies():
    def respond(role, messages, tools):
        p = messages[0]["content"]
        if role == "domains":
            if "robot" in p:
                return "Here you go:\n```json\n" + json.dumps({"domains": [{"name": "arm control", "description": "arms"},
                                                                            {"name": "fleet", "description": "agv"}]}) + "\n```"
            return {"domains": [{"name": "order execution", "description": "orders"}]}
        if role == "tools":
            if '"fleet"' in p:
                return "{not json"                                    # stays malformed: the domain is skipped
            if "order execution" in p and not reask(messages):
                return '{"tools": [{"name": "place order"'            # malformed once, then fixed
            dom = re.search(r'the domain "([^"]+)"', p).group(1)
            stem = dom.split()[0]
            return {"tools": [
                {"name": f"{stem}_get", "description": f"Read one {dom} record by id.",
                 "parameters": {"type": "object", "properties": {"id": {"type": "string", "description": "record id"}},
                                "required": ["id"]}},
                {"name": f"{stem}_set", "description": f"Update one {dom} record by id.",
                 "parameters": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}}]}
        raise AssertionError(role)

    llm = ScriptedLLM(respond)
    tools, rep = asyncio.run(synthesize_tools(llm, ["financial trading", "robot control"], n_domains=2, n_tools=2))
    assert sorted(t.name for t in tools) == ["arm_get", "order_get"]
    assert {(t.category, t.domain) for t in tools} == {("financial trading", "order execution"), ("robot control", "arm control")}
    assert all(t.source == "synthetic" and t.provenance["domain"] == t.domain for t in tools)
    assert sorted(r[0] for r in rep.invalid) == ["arm_set", "order_set"] and "no description" in rep.invalid[0][1]
    assert len(rep.malformed) == 1 and "fleet" in rep.malformed[0]


def test_task_generation_refuses_foreign_tools():
    lib = ToolLibrary(BANK_TOOLS)
    agent = Agent("a00003", "Banker", "You are a banker.", ["get_balance", "list_accounts"])
    reply = {"tasks": [
        {"difficulty": "hard", "goals": ["move 5 EUR from A1 to B2"],
         "rubric": {"success_criteria": ["moved"], "expected_tools": ["transfer_funds"], "checkpoints": []}},
        {"difficulty": "easy", "goals": ["what is A1's balance"],
         "rubric": {"success_criteria": ["says 100"], "expected_tools": ["get_balance"], "checkpoints": ["called"]}},
        {"difficulty": "medium", "goals": ["list accounts, then the balance of the first"],
         "rubric": {"success_criteria": ["both"], "expected_tools": ["list_accounts", "get_balance"], "checkpoints": []}}]}
    tasks, problems = asyncio.run(generate_tasks_for(ScriptedLLM(lambda r, m, t: reply), agent, lib, 3, usage=Usage()))
    assert [t.difficulty for t in tasks] == ["easy", "medium"] and [t.id for t in tasks] == ["a00003-t0", "a00003-t1"]
    assert len(problems) == 1 and "transfer_funds" in problems[0]


# ---- rollouts: rejection sampling, failures, resume ---------------------------------------------------------
def test_rejection_sampling_keeps_exactly_those_at_or_above_threshold(tmp_path):
    scores = {0: 2, 1: 6.9, 2: 7, 3: 7.1, 4: 9.5, 5: 10}
    lib, agents, tasks, respond = bank_world(6, lambda goals: scores[int(re.search(r"case (\d+)", goals).group(1))])
    llm = ScriptedLLM(respond)
    cfg = RolloutConfig(threshold=0.7, failure_rate=0.0, concurrency=3)
    run = asyncio.run(run_trajectories(lib, agents, tasks, Roles.single(llm), tmp_path, cfg, progress=False))
    recs = {r["id"]: r for r in run["records"]}
    assert len(recs) == 6 and all(r["status"] == "completed" for r in recs.values())
    kept = sorted(r["id"] for r in recs.values() if r["kept"])
    assert kept == [f"a00000-t{k}-s0" for k in (2, 3, 4, 5)] and run["sft_rows"] == 4
    rows, report = read_chat_jsonl(tmp_path / "sft.jsonl")
    assert sorted(r.meta["id"] for r in rows) == kept and report.n_bad == 0
    row = rows[0]
    assert [m["role"] for m in row.messages] == ["system", "user", "assistant", "tool", "assistant"]
    call = row.messages[2]["tool_calls"][0]
    assert call["id"] == "functions.get_balance:0" and call["function"]["arguments"] == {"account_id": "A1"}
    text = render_chat(row.messages, row.tools)   # the K2 template renders the tool call and its result
    assert "<|tool_call_begin|>functions.get_balance:0<|tool_call_argument_begin|>" in text
    assert "## Return of functions.get_balance:0" in text
    from k2sys.data.synth.report import write_report

    rep = write_report(tmp_path, threshold=0.7)
    hist = {b["lo"]: b["count"] for b in rep["trajectories"]["score_histogram"]}
    assert (hist[0.2], hist[0.6], hist[0.7], hist[0.9], sum(hist.values())) == (1, 1, 2, 2, 6)
    assert rep["trajectories"]["kept"] == 4 and rep["tokens"]["by_role"]["traj/agent"]["calls"] == 12


def test_malformed_agent_and_endpoint_errors_are_reported_not_fatal(tmp_path):
    lib, agents, tasks, respond = bank_world(4)
    current = {}

    def flaky(role, messages, tools):   # one trajectory at a time: the user's goals name the case
        if role == "user":
            current["case"] = re.search(r"\(case (\d+)\)", messages[0]["content"]).group(1)
            if current["case"] == "1":
                return EndpointError("http://x: HTTP 503 (gave up after 6 attempts)")
        if role == "agent" and current["case"] == "2":
            return ChatReply("", [{"function": {"name": "get_balance", "arguments": "{account_id: A1"}}])
        if role == "agent" and current["case"] == "3":
            return EndpointError("http://x: HTTP 400: reserved token in messages[1]", status=400, transient=False)
        return respond(role, messages, tools)
    cfg = RolloutConfig(threshold=0.5, failure_rate=0.0, concurrency=1)
    run = asyncio.run(run_trajectories(lib, agents, tasks, Roles.single(ScriptedLLM(flaky)), tmp_path, cfg,
                                       progress=False))
    by = {r["id"]: r for r in run["records"]}
    assert set(by) == {"a00000-t0-s0", "a00000-t2-s0", "a00000-t3-s0"}     # case 1: not recorded, retried next run
    assert run["endpoint_error_count"] == 1 and "a00000-t1-s0" in run["endpoint_errors"][0]
    bad = by["a00000-t2-s0"]
    assert bad["status"] == "malformed_agent" and "not JSON" in bad["reason"] and not bad["kept"] and bad["judge"] is None
    assert by["a00000-t0-s0"]["kept"]
    assert by["a00000-t3-s0"]["status"] == "refused" and "HTTP 400" in by["a00000-t3-s0"]["reason"]


def test_real_mcp_tool_inside_a_trajectory(tmp_path):
    evaluate = LibraryTool("evaluate", "Evaluate an arithmetic expression.", {
        "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
        "mcp", "math", "calculator", reference_spec("calculator").to_json(), {"mcp_name": "evaluate"})
    lib = ToolLibrary([evaluate, BANK_TOOLS[0]])
    agent = Agent("a00000", "Calc", "You compute with tools.", ["evaluate", "get_balance"])
    task = SynthTask("a00000-t0", agent.id, "easy", ["what is 6*7"], {"success_criteria": ["42"],
                                                                       "expected_tools": ["evaluate"], "checkpoints": []})

    def respond(role, messages, tools):
        if role == "user":
            return {"message": "6*7?", "done": "ASSISTANT:" in messages[-1]["content"]}
        if role == "agent":
            if messages[-1]["role"] == "user":
                return ChatReply("", [{"function": {"name": "evaluate", "arguments": '{"expression": "6*7"}'}},
                                      {"function": {"name": "evaluate", "arguments": '{"expression": "1/0"}'}}])
            return ChatReply("It is " + json.loads(messages[-2]["content"])["value"].__str__(), [])
        if role == "judge":
            return {"checks": [], "score": 8}
        raise AssertionError(role)
    llm = ScriptedLLM(respond)
    run = asyncio.run(run_trajectories(lib, [agent], [task], Roles.single(llm), tmp_path,
                                       RolloutConfig(failure_rate=0.9), progress=False))
    rec = run["records"][0]
    assert rec["status"] == "completed" and rec["messages"][-1]["content"] == "It is 42"
    assert rec["tool_stats"]["real"] == 2 and rec["tool_stats"]["failed"] == 1 and rec["tool_stats"]["injected"] == 0
    assert "division by zero" in rec["messages"][4]["content"] and llm.count("tool_sim") == 0


def test_interrupted_run_resumes_without_duplicates(tmp_path):
    lib, agents, tasks, respond = bank_world(8)
    finished = []

    def dying(role, messages, tools):
        if role == "judge":
            finished.append(1)
            if len(finished) >= 4:
                return asyncio.sleep(3600)   # hangs until the run is interrupted
        return respond(role, messages, tools)
    cfg = RolloutConfig(threshold=0.5, failure_rate=0.2, concurrency=2, samples_per_task=1)

    async def interrupted():   # what Ctrl-C does to asyncio.run: the main task is cancelled
        run = asyncio.ensure_future(run_trajectories(lib, agents, tasks, Roles.single(ScriptedLLM(dying)), tmp_path,
                                                     cfg, progress=False))
        while len(finished) < 5:          # both workers are stuck in the judge
            await asyncio.sleep(0.01)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
    asyncio.run(interrupted())
    done_before = [json.loads(x)["id"] for x in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert len(done_before) == 3                                       # the 4th and 5th hung in the judge
    with open(tmp_path / "trajectories.jsonl", "ab") as f:
        f.write(b'{"id": "a00000-t7-s0", "status": "comp')          # and a record torn by a kill
    llm2 = ScriptedLLM(respond)
    run = asyncio.run(run_trajectories(lib, agents, tasks, Roles.single(llm2), tmp_path, cfg, progress=False))
    assert run["skipped_done"] == len(done_before) and run["torn_bytes_cut"] > 0
    assert run["attempted"] == 8 - len(done_before) == llm2.count("judge")
    ids = [json.loads(x)["id"] for x in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(f"a00000-t{k}-s0" for k in range(8)) and ids[:len(done_before)] == done_before
    sft = [json.loads(x)["id"] for x in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert sorted(sft) == sorted(ids)                                 # all kept, each once
    # a third run has nothing left to do
    run3 = asyncio.run(run_trajectories(lib, agents, tasks, Roles.single(ScriptedLLM(respond)), tmp_path, cfg,
                                        progress=False))
    assert run3["attempted"] == 0 and run3["sft_rows"] == 8


# ---- the CLI end to end on a scripted backend, the coverage map, and the RL env --------------------------
def test_cli_stages_and_rl_env_over_the_library(tmp_path, capsys):
    from k2sys.data.synth import cli

    _, _, _, bank = bank_world(0)
    domains = {"finance": ["retail banking", "payments"], "robot control": ["arm control", "fleet routing"]}
    vocab = {"retail banking": ("savings", "deposit account", "overdraft", "cheque"),
             "payments": ("card", "merchant payout", "chargeback", "wire"),
             "arm control": ("gripper", "joint trajectory", "servo", "torque plan"),
             "fleet routing": ("vehicle", "delivery route", "depot", "dispatch")}

    def respond(role, messages, tools):
        p = messages[0]["content"]
        if role == "domains":
            cat = re.search(r'Category: "([^"]+)"', p).group(1)
            return {"domains": [{"name": d, "description": f"{d} systems"} for d in domains[cat]]}
        if role == "tools":
            dom = re.search(r'the domain "([^"]+)"', p).group(1)
            words = vocab[dom]
            return {"tools": [{"name": f"{verb}_{words[0]}", "description": desc.format(*words),
                               "parameters": {"type": "object", "properties": {
                                   "item_id": {"type": "string", "description": "the item"}}, "required": ["item_id"]}}
                              for verb, desc in (("open", "Open a new {0} {1} and return its number."),
                                                 ("status", "Show the history and state of one {2}."),
                                                 ("void", "Void a pending {3}; fees are refunded."))]}
        if role == "agentgen":
            return {"name": "Helper", "system_prompt": "You are a helpful operations assistant. Use your tools."}
        if role == "taskgen":
            names = re.findall(r"^- (\w+):", p, re.M)
            return {"tasks": [{"difficulty": d, "goals": [f"Look up item X1 with {names[0]} (case {i})."],
                               "rubric": {"success_criteria": ["reports the status"], "expected_tools": [names[0]],
                                          "checkpoints": []}} for i, d in enumerate(("hard", "easy"))]}
        if role == "agent":
            if messages[-1]["role"] == "user":
                return ChatReply("", [{"function": {"name": tools[0]["function"]["name"],
                                                    "arguments": '{"item_id": "X1"}'}}])
            return ChatReply("Item X1 is open.", [])
        if role == "tool_sim":
            return {"result": {"item_id": "X1", "status": "open"}, "state": {"X1": "open"}, "error": None}
        return bank(role, messages, tools)

    register_backend("scripted-test", ScriptedLLM(respond))
    try:
        out = str(tmp_path / "lib")
        assert cli.main(["tools", "--out", out, "--endpoint", "scripted-test", "--categories", "finance,robot control",
                         "--domains-per-category", "2", "--tools-per-domain", "3", "--mcp", "calculator", "--quiet"]) == 0
        lib = ToolLibrary.load(tmp_path / "lib" / "tools.jsonl")
        assert lib.counts()["by_source"] == {"mcp": 3, "synthetic": 12}
        png = (tmp_path / "lib" / "tools_coverage.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        cov = json.loads((tmp_path / "lib" / "tools_coverage.json").read_text())
        assert cov["method"] == "tsne" and len(cov["points"]) == 15
        assert cli.main(["tasks", "--out", out, "--endpoint", "scripted-test", "--agents", "5",
                         "--tasks-per-agent", "2", "--tools-per-agent", "3-3", "--quiet"]) == 0
        tasks_rep = json.loads((tmp_path / "lib" / "tasks_report.json").read_text())
        assert tasks_rep["total_agents"] == 5 and tasks_rep["total_tasks"] == 10 and tasks_rep["tool_coverage"] == 1.0
        assert cli.main(["trajectories", "--out", out, "--endpoint", "scripted-test", "--failure-rate", "0",
                         "--threshold", "0.8", "--limit", "4", "--quiet"]) == 0
        rep = json.loads((tmp_path / "lib" / "report.json").read_text())
        assert rep["trajectories"]["generated"] == 4 and rep["tools"]["total"] == 15 and rep["tasks"]["total"] == 10
        assert "Judge score histogram" in (tmp_path / "lib" / "report.md").read_text()
        assert cli.main(["trajectories", "--out", out, "--endpoint", "nowhere", "--quiet"]) == 2
        assert "http(s) URL" in capsys.readouterr().err

        # the RL env takes its task and tools from the same library (default spec unchanged)
        from k2sys.envs import make_env, tool_use_specs

        specs = tool_use_specs(3, 0, library=out, endpoint="scripted-test", reward="score")
        assert all(s["library"] == out for s in specs)
        assert tool_use_specs(2, 0) == [{"kind": "tool_use", "seed": 0, "index": k} for k in range(2)]
        env = make_env(specs[0])
        obs, info = env.reset(seed=1)
        assert obs[0]["role"] == "system" and obs[1]["content"].startswith("Look up item X1")
        name = next(t["function"]["name"] for t in info["tools"] if "item_id" in t["function"]["parameters"]["properties"])
        o, r, term, trunc, _ = env.step({"role": "assistant", "content": "", "tool_calls": [
            {"id": f"functions.{name}:0", "type": "function", "function": {"name": name, "arguments": {"item_id": "X1"}}}]})
        assert not term and o[0]["role"] == "tool" and not json.loads(o[0]["content"]).get("error")
        o, r, term, trunc, info = env.step({"role": "assistant", "content": "X1 is open."})
        assert term and r == 0.9 and info["judge"] == "llm"
    finally:
        register_backend("scripted-test", None)
