import json
import os

import pytest

from k2sys.rl import rollout_buffer as rb
from k2sys.rl.rollout_buffer import PartialTrajectory, RolloutBuffer


def traj(uid, n=3, version=0, group=0):
    t = PartialTrajectory(uid=uid, group_id=group, prompt_tokens=[1, 2, 3], meta={"family": "arithmetic"})
    t.extend(list(range(10, 10 + n)), [-0.1 * (i + 1) for i in range(n)], version)
    return t


def test_extend_segments_and_validation():
    t = traj("a", 2, version=0)
    t.extend([7, 8, 9], [-1.0, -2.0, -3.0], 2)
    assert t.segments() == [(0, 0, 2), (2, 2, 5)]
    assert t.context_tokens == [1, 2, 3, 10, 11, 7, 8, 9]
    with pytest.raises(ValueError, match="older"):
        t.extend([1], [-1.0], 1)
    with pytest.raises(ValueError, match="logprobs"):
        PartialTrajectory(uid="x", group_id=0, prompt_tokens=[1], response_tokens=[1], logprobs=[], versions=[0])
    with pytest.raises(ValueError, match="non-decreasing"):
        PartialTrajectory(uid="x", group_id=0, prompt_tokens=[1], response_tokens=[1, 2],
                          logprobs=[0.0, 0.0], versions=[1, 0])


def test_commit_take_resume_roundtrip(tmp_path):
    path = tmp_path / "partial.json"
    buf = RolloutBuffer(path)
    buf.put([traj("a"), traj("b", 5)])
    buf.commit(iteration=0)
    loaded = RolloutBuffer.load(path)
    assert loaded.iteration == 0 and len(loaded) == 2
    a = {t.uid: t for t in loaded.peek()}["a"]
    assert a.logprobs == pytest.approx([-0.1, -0.2, -0.3]) and a.versions == [0, 0, 0]
    assert a.logprobs == {t.uid: t for t in buf.peek()}["a"].logprobs  # exact float round trip
    resumed = loaded.take()
    assert len(loaded) == 0 and all(t.age == 1 for t in resumed)
    assert loaded.last_stats.as_dict()["partial/num_resumed"] == 2
    # Resume a on new weights, it is still unfinished: pause it again.
    resumed[0].extend([99], [-0.5], 1)
    loaded.put([resumed[0]])
    loaded.commit(iteration=1)
    again = RolloutBuffer.load(path).take()
    assert [t.age for t in again] == [2] and again[0].versions[-1] == 1


def test_crash_before_commit_loses_nothing(tmp_path):
    path = tmp_path / "partial.json"
    buf = RolloutBuffer(path)
    buf.put([traj("a"), traj("b")])
    buf.commit(0)
    buf.take()  # iteration 1 starts, then the process dies before commit(1)
    del buf
    survivor = RolloutBuffer.load(path)
    assert sorted(t.uid for t in survivor.peek()) == ["a", "b"] and survivor.iteration == 0


def test_crash_during_commit_keeps_previous_snapshot(tmp_path, monkeypatch):
    path = tmp_path / "partial.json"
    buf = RolloutBuffer(path)
    buf.put([traj("a")])
    buf.commit(0)
    before = path.read_bytes()
    buf.take()
    buf.put([traj("c"), traj("d")])

    def die(*a, **k):
        raise KeyboardInterrupt("simulated kill between temp write and rename")
    monkeypatch.setattr(rb.os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        buf.commit(1)
    monkeypatch.undo()
    assert path.read_bytes() == before
    # A temp file left by a hard kill (no cleanup ran) is ignored and removed on load.
    (tmp_path / "partial.json.abc123.tmp").write_text('{"truncated": ')
    loaded = RolloutBuffer.load(path)
    assert [t.uid for t in loaded.peek()] == ["a"] and loaded.iteration == 0
    assert not list(tmp_path.glob("*.tmp"))


def test_max_age_drops_and_counts(tmp_path):
    buf = RolloutBuffer(tmp_path / "p.json", max_age=2)
    t = traj("old")
    t.age = 2
    buf.put([t, traj("new")])
    out = buf.take()
    assert [x.uid for x in out] == ["new"]
    st = buf.last_stats.as_dict()
    assert st["partial/num_dropped"] == 1 and st["partial/max_age"] == 1


def test_load_missing_and_foreign_files(tmp_path):
    assert len(RolloutBuffer.load(tmp_path / "none.json")) == 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format"):
        RolloutBuffer.load(bad)
    with pytest.raises(ValueError, match="path"):
        RolloutBuffer(None).commit(0)
    buf = RolloutBuffer(None)
    buf.put([traj("a")])
    with pytest.raises(ValueError, match="already"):
        buf.put([traj("a")])


def test_commit_writes_via_temp_and_replace(tmp_path, monkeypatch):
    calls = []
    real = os.replace
    monkeypatch.setattr(rb.os, "replace", lambda s, d: (calls.append((str(s), str(d))), real(s, d)))
    buf = RolloutBuffer(tmp_path / "p.json")
    buf.put([traj("a")])
    buf.commit(3)
    assert len(calls) == 1 and calls[0][0].endswith(".tmp") and calls[0][1] == str(tmp_path / "p.json")
