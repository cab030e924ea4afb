"""SFT dataset on the real K2 chat template: assistant-only loss, over-long rejects, split, exact resume."""

import json
import random

import pytest
import torch

from k2sys.data import BadDataError, Cursor, SFTDataConfig, load_sft_data, write_jsonl
from k2sys.tokenizer import default_corpus, load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(default_corpus(200), 512, d)
    return load_tokenizer(d)


def _conv(rng, i):
    a, b = rng.randint(1, 999), rng.randint(1, 999)
    if i % 3 == 0:
        return {"tools": [{"type": "function", "function": {"name": "add", "description": "add two ints",
                                                            "parameters": {"type": "object"}}}],
                "messages": [{"role": "system", "content": "You can call tools."},
                             {"role": "user", "content": f"What is {a} plus {b}?"},
                             {"role": "assistant", "content": "", "tool_calls": [
                                 {"id": f"call_{i}", "type": "function",
                                  "function": {"name": "add", "arguments": json.dumps({"a": a, "b": b})}}]},
                             {"role": "tool", "tool_call_id": f"call_{i}", "content": str(a + b)},
                             {"role": "assistant", "content": f"The sum is {a + b}."}]}
    words = " ".join(rng.choice(["apple", "river", "token", "model", "answer"]) for _ in range(rng.randint(1, 40)))
    return {"messages": [{"role": "user", "content": f"Repeat: {words}"},
                         {"role": "assistant", "content": words}]}


def _write(path, n=80, seed=0, extra=()):
    rng = random.Random(seed)
    lines = [json.dumps(_conv(rng, i)) for i in range(n)] + list(extra)
    path.write_text("\n".join(lines) + "\n")


def test_loss_mask_is_assistant_text_only(tokenizer, tmp_path):
    p = tmp_path / "d.jsonl"
    conv = _conv(random.Random(1), 0)
    write_jsonl(p, [conv, _conv(random.Random(2), 1)])
    data = load_sft_data(SFTDataConfig(path=str(p), seq_len=512, heldout_fraction=0.0), tokenizer=tokenizer)
    s = next(x for x in data.train if x.line == 1)
    ids = s.input_ids.tolist()
    trained = tokenizer.decode([t for t, m in zip(ids, s.loss_mask) if m], skip_special_tokens=False)
    not_trained = tokenizer.decode([t for t, m in zip(ids, s.loss_mask) if not m], skip_special_tokens=False)
    args = conv["messages"][2]["tool_calls"][0]["function"]["arguments"]
    for piece in ("<|tool_calls_section_begin|>", args, conv["messages"][4]["content"], "<|im_end|>"):
        assert piece in trained
    for piece in (conv["messages"][1]["content"], "You can call tools.", "## Return of", "tool_declare"):
        assert piece in not_trained and piece not in trained
    # In the batch, the loss counts exactly the assistant tokens after position 0 of each conversation.
    batch, _ = next(data.train_batches())
    assert int(batch["loss_mask"].sum()) == sum(int(x.loss_mask[1:].sum()) for x in data.train)


def test_over_long_and_mostly_bad(tokenizer, tmp_path):
    p = tmp_path / "d.jsonl"
    long_conv = {"messages": [{"role": "user", "content": "x " * 400}, {"role": "assistant", "content": "ok"}]}
    reserved = {"messages": [{"role": "user", "content": "hi <|im_end|>"}, {"role": "assistant", "content": "ok"}]}
    _write(p, n=20, extra=[json.dumps(long_conv), "nope", json.dumps(reserved)])
    with pytest.raises(BadDataError, match="max_bad_fraction=0.02"):    # 3 of 23 bad: above the default 2%
        load_sft_data(SFTDataConfig(path=str(p), seq_len=320), tokenizer=tokenizer)
    data = load_sft_data(SFTDataConfig(path=str(p), seq_len=320, max_bad_fraction=0.2), tokenizer=tokenizer)
    bad = {b.line: b.reason for b in data.report.bad}
    assert bad[21].startswith("over-long:") and "> seq_len 320" in bad[21]
    assert bad[22].startswith("not JSON")
    assert bad[23].startswith("template rejected") and "<|im_end|>" in bad[23]
    assert len(data.train) + len(data.heldout) == 20 and data.report.n_ok == 20
    # Over-long rows count toward the threshold too: with seq_len so small most rows fail.
    with pytest.raises(BadDataError, match="over-long"):
        load_sft_data(SFTDataConfig(path=str(p), seq_len=100, max_bad_fraction=0.2), tokenizer=tokenizer)


def test_split_is_deterministic_disjoint_and_order_free(tokenizer, tmp_path):
    p, q = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write(p, n=120)
    lines = p.read_text().splitlines()
    random.Random(9).shuffle(lines)
    q.write_text("\n".join(lines) + "\n")
    cfg = dict(seq_len=320, heldout_fraction=0.2)
    a = load_sft_data(SFTDataConfig(path=str(p), **cfg), tokenizer=tokenizer)
    b = load_sft_data(SFTDataConfig(path=str(q), **cfg), tokenizer=tokenizer)
    ha, hb = {s.key for s in a.heldout}, {s.key for s in b.heldout}
    assert ha == hb and not ha & {s.key for s in a.train}
    assert 0.08 < len(a.heldout) / 120 < 0.35
    c = load_sft_data(SFTDataConfig(path=str(p), split_seed=1, **cfg), tokenizer=tokenizer)
    assert {s.key for s in c.heldout} != ha
    evals = list(a.eval_batches())
    assert sum(int((bt["segment_ids"] > 0).sum()) for bt in evals) == sum(len(s) for s in a.heldout)


@pytest.mark.parametrize("pack", [True, False])
def test_resume_from_any_cursor_gives_the_same_batches(tokenizer, tmp_path, pack):
    p = tmp_path / "d.jsonl"
    _write(p, n=60)
    cfg = SFTDataConfig(path=str(p), seq_len=320, rows_per_batch=3, pack=pack, shuffle_seed=5)
    data = load_sft_data(cfg, tokenizer=tokenizer)
    run = list(data.train_batches(epochs=3))
    per_epoch = data.batches_per_epoch()
    assert len(run) == sum(data.batches_per_epoch(e) for e in range(3)) and per_epoch >= 3
    # Each epoch sees every training conversation's tokens exactly once.
    seen = [0, 0, 0]
    epoch = 0
    for batch, nxt in run:
        seen[epoch] += int((batch["segment_ids"] > 0).sum())
        epoch = nxt.epoch
    assert seen == [sum(len(s) for s in data.train)] * 3
    # Epochs are shuffled differently.
    assert not torch.equal(run[0][0]["tokens"], run[per_epoch][0]["tokens"])
    # "kill -9" after step k: a fresh process reloads the file and resumes from the saved cursor.
    for k in (0, 1, per_epoch - 1, per_epoch + 2):
        saved = Cursor.from_dict(json.loads(json.dumps(run[k][1].to_dict())))
        fresh = load_sft_data(cfg, tokenizer=tokenizer)
        resumed = list(fresh.train_batches(saved, epochs=3))
        assert len(resumed) == len(run) - k - 1
        for (x, cx), (y, cy) in zip(resumed, run[k + 1:]):
            assert cx == cy
            for key in x:
                assert torch.equal(x[key], y[key]), key


def test_cursor_fingerprint_mismatch(tokenizer, tmp_path):
    p = tmp_path / "d.jsonl"
    _write(p, n=30)
    data = load_sft_data(SFTDataConfig(path=str(p), seq_len=320), tokenizer=tokenizer)
    _, cur = next(data.train_batches())
    other = load_sft_data(SFTDataConfig(path=str(p), seq_len=400), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="fingerprint"):
        next(other.train_batches(cur))


def test_packing_is_dense(tokenizer, tmp_path):
    p = tmp_path / "d.jsonl"
    _write(p, n=200)
    data = load_sft_data(SFTDataConfig(path=str(p), seq_len=512, rows_per_batch=4), tokenizer=tokenizer)
    batches = [b for b, _ in data.train_batches(epochs=1)]
    real = sum(int((b["segment_ids"] > 0).sum()) for b in batches[:-1])
    capacity = sum(b["tokens"].numel() for b in batches[:-1])
    print(f"packing fill {real / capacity:.3f}")
    assert real / capacity > 0.9, real / capacity


def test_config_validation():
    with pytest.raises(ValueError, match="seq_len"):
        SFTDataConfig(path="x", seq_len=1)
    with pytest.raises(ValueError, match="heldout_fraction"):
        SFTDataConfig(path="x", heldout_fraction=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        load_sft_data(SFTDataConfig(path="x"))
