"""Bad input and data loss (issue 15): every bad CLI argument, config value or data row ends in one
line naming the field or file and the fix (exit 2 for usage/config, 1 otherwise, no traceback unless
--debug / K2SYS_DEBUG=1); every accepted config value is one the code can run with; `k2sys convert`
never clobbers an existing output without --overwrite, never writes into its own source, and swaps a
complete output in atomically; every dropped data row is counted and reported, and a file with more
bad rows than data.max_bad_fraction stops the run.

Most cases call k2sys.cli.main in-process (stderr captured); a few run `python -m k2sys.cli` as a
real user would. Property-based cases (hypothesis) fuzz `--set KEY=VALUE` and data rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from k2sys.cli import format_error, main  # noqa: E402
from k2sys.config import INT_MAX, ConfigError, apply_overrides, to_dict, validate_tree  # noqa: E402

warnings.filterwarnings("ignore")
VOCAB = 512
GOOD = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}


# ---- helpers ---------------------------------------------------------------------------------------------
def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    return rc, capsys.readouterr().err


def _assert_one_line_error(rc: int, err: str, *names: str, expect_rc: int | None = None) -> None:
    assert rc != 0, err
    if expect_rc is not None:
        assert rc == expect_rc, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for n in names:
        assert n in lines[0], (n, err)


def _tree(p: Path) -> dict[str, str]:
    """Every file under p (and beside it: temp dirs left over count) -> sha256 of its bytes."""
    return {str(f.relative_to(p)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(p.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny HF checkpoint, a second one with other weights, and the first written in the k2sys
    per-rank Megatron layout (megatron-to-hf reads it without megatron's writer processes)."""
    from k2sys.models import build_model, k2_tiny, save_hf
    from k2sys.models.config import K2Config
    from k2sys.trainer import naming
    from k2sys.trainer.convert import META, rank_dir

    root = tmp_path_factory.mktemp("ckpts")
    save_hf(build_model(k2_tiny(VOCAB), seed=0), root / "hf")
    save_hf(build_model(k2_tiny(VOCAB), seed=1), root / "hf_other")
    from safetensors.torch import load_file

    state = load_file(str(root / "hf" / "model.safetensors"))
    cfg = K2Config.from_hf_dict(json.loads((root / "hf" / "config.json").read_text()))
    mg = root / "mg"
    (mg / rank_dir(0, 0, 1)).mkdir(parents=True)
    torch.save({"model": naming.hf_to_megatron(state, cfg, 1, 1, 0, 0)}, mg / rank_dir(0, 0, 1) / "model_optim_rng.pt")
    (mg / META).write_text(json.dumps({"format": "k2sys-megatron-per-rank-v1", "tp": 1, "ep": 1,
                                       "config": cfg.to_hf_dict()}))
    trunc = root / "hf_truncated"
    trunc.mkdir()
    (trunc / "config.json").write_text((root / "hf" / "config.json").read_text())
    blob = (root / "hf" / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(blob[: len(blob) * 2 // 3])
    return root


# ---- invalid --set values: rejected by name, before any work -----------------------------------------
# Each override names its field (the key before "="), except where a second item says what to look for.
BAD_SETS = [(o, f or o.split("=", 1)[0]) for o, f in [(x, None) if isinstance(x, str) else x for x in [
    "rl.tau=inf", "rl.tau=nan", "rl.tau=0", "rl.lr=-1", "rl.lr=1e999", "sft.lr=0", "sft.lr=-inf",
    ('rl.budgets={"list_ops": -8, "arithmetic": 4}', "rl.budgets.list_ops"),
    ('rl.budgets={"list_ops": NaN, "arithmetic": 4}', "rl.budgets"),
    ('rl.budgets={"list_ops": 1e400, "arithmetic": 4}', "rl.budgets"),
    "engine.port=99999", "engine.port=-1", "engine.sync_port=70000", "cpu_threads=0", "rl.stale_mode=importance",
    "rl.iterations=-1", "rl.iterations=99999999999999999999999", "rl.max_staleness=-1", "rl.t_start=0",
    "rl.budget_penalty=-0.5", "rl.filter_prompts=-1", "rl.mismatch_probe=-2", "rl.ptx_rows=0", "rl.filter_low=0.99",
    "rollout.top_p=1.5", "rollout.max_age=0", "rollout.samples_per_prompt=1", "rollout.max_seconds=inf",
    "eval.max_new_tokens=0", "eval.temperature=-1", "eval.seed=-3", "seed=-1", "model.seed=99999999999",
    "engine.max_running_requests=0", "engine.restarts=-1", "engine.startup_timeout_s=0",
    "engine.mem_fraction_static=1.5", "engine.update_bucket_mb=0", "engine.sglang_module=;rm -rf /",
    "data.max_bad_fraction=1.5", "data.heldout=-1", "data.sft=/nonexistent/sft.jsonl", "data.prompt_key=",
    "model.path=/nonexistent", "model.vocab_size=0", "tokenizer.vocab_size=10", "tokenizer.vocab_size=99999999999",
    ('tasks.params={"list_ops": {"length": -3}}', "tasks.params.list_ops"),
    ('tasks.params={"arithmetic": {"bogus": 1}}', "tasks.params.arithmetic"),
    "tasks.n_train=0", "tasks.tool_use=-1", "tasks.tool_use_failure_rate=1", "tasks.families=nope", "trainer.tp=0",
    "sft.seq_len=4", "sft.checkpoint_every=0", "agent.max_turn_tokens=0", "name=..", "name=a/b",
    "output_root=/proc/k2sys-cannot-write-here", "name=a\x00b", "rl.nope=1", ("rl.tau", "KEY=VALUE"),
    ("rl=3", "rl is a section"),
]]]


@pytest.mark.parametrize("override,field", BAD_SETS, ids=[b[0][:40] for b in BAD_SETS])
def test_invalid_set_values_are_rejected_by_name(override, field, capsys):
    rc, err = _run_cli(["config", "show", "tiny-k2", "--set", override], capsys)
    _assert_one_line_error(rc, err, field, expect_rc=2)


def test_every_recipe_is_valid_and_defaults_are_strict():
    from k2sys.coordinator.sections import DataSection, RLSection
    from k2sys.recipes import RECIPES, get_recipe

    for name in RECIPES:
        if name != "custom":  # custom needs the user's model/data on the command line
            validate_tree(get_recipe(name))
    assert DataSection().max_bad_fraction <= 0.02
    # stale_mode offers only what the RL loop implements (importance needs per-token pi_old it lacks)
    assert "importance" not in RLSection.__annotations__["stale_mode"]


# ---- bad CLI invocations: one line, the right exit code, no traceback ------------------------------------
def _bad_cli_cases(root: Path) -> list[tuple[list[str], int, list[str]]]:
    hf, mg = str(root / "hf"), str(root / "mg")
    (root / "bad_meta").mkdir(exist_ok=True)
    (root / "bad_meta" / "k2sys_megatron.json").write_text('{"format": "k2sys-megat')
    return [
        (["config", "show", "no-such-recipe"], 2, ["no-such-recipe", "tiny-k2"]),
        (["config", "show"], 2, ["name a recipe"]),
        (["sft", "tiny-model"], 2, ["no SFT stage"]),
        (["sft", "tiny-k2", "--set", "data.sft=/nonexistent.jsonl"], 2, ["data.sft"]),
        (["run", "tiny-k2", "--set", "rl.stale_mode=importance"], 2, ["rl.stale_mode"]),
        (["serve", "--model", "/nonexistent"], 2, ["--model", "/nonexistent"]),
        (["serve", "--model", hf, "--port", "99999"], 2, ["--port", "99999"]),
        (["serve", "--port=70000", "--model", hf], 2, ["--port", "70000"]),
        (["serve", "--model", str(root / "hf" / "config.json")], 2, ["--model", "is a file"]),
        (["convert", "hf-to-megatron", "/nonexistent", str(root / "x")], 2, ["/nonexistent", "does not exist"]),
        (["convert", "hf-to-megatron", hf, hf], 2, [hf, "input checkpoint"]),
        (["convert", "hf-to-megatron", str(root / "hf_truncated"), str(root / "x")], 2,
         ["model.safetensors", "truncated"]),
        (["convert", "megatron-to-hf", hf, str(root / "x")], 2, ["k2sys_megatron.json"]),
        (["convert", "megatron-to-hf", str(root / "bad_meta"), str(root / "x")], 2,
         ["k2sys_megatron.json", "not valid JSON"]),
        (["convert", "megatron-to-hf", mg, hf], 2, [hf, "--overwrite"]),
        (["kernels", "compile", "--arch", "90", "--json", str(root)], 2, ["--json", "directory"]),
    ]


def test_bad_cli_invocations_give_one_line(ckpts, capsys):
    cases = _bad_cli_cases(ckpts)
    for argv, want_rc, names in cases:
        rc, err = _run_cli(argv, capsys)
        _assert_one_line_error(rc, err, *names, expect_rc=want_rc)
    assert not (ckpts / "x").exists()


def test_usage_errors_exit_2_without_traceback(capsys):
    for argv in (["frobnicate"], ["config", "explode"], ["convert", "hf-to-megatron"], ["kernels", "compile"],
                 ["kernels", "compile", "--arch", "90", "--jobs", "-2"]):
        rc, err = _run_cli(argv, capsys)
        assert rc == 2 and "Traceback" not in err and "error:" in err, (argv, err)


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch, capsys):
    from k2sys import cli

    def boom(args):
        raise TypeError("something broke\nwith a second line")

    monkeypatch.setattr(cli, "_cmd_env", boom)  # build_parser binds the module's function when called
    monkeypatch.delenv("K2SYS_DEBUG", raising=False)
    rc, err = _run_cli(["env"], capsys)
    _assert_one_line_error(rc, err, "k2sys env", "TypeError", "something broke", "--debug", expect_rc=1)
    with pytest.raises(TypeError, match="something broke"):
        main(["--debug", "env"])
    with pytest.raises(TypeError):
        main(["env", "--debug"])
    monkeypatch.setenv("K2SYS_DEBUG", "1")
    with pytest.raises(TypeError):
        main(["env"])
    # Error classes written for users keep their message; an OSError names its file first.
    msg, rc = format_error(FileNotFoundError(2, "No such file or directory", "/data/x.jsonl"), "sft")
    assert msg == "k2sys sft: error: /data/x.jsonl: No such file or directory" and rc == 1
    assert format_error(KeyboardInterrupt(), "run")[1] == 130


def test_subprocess_cases(ckpts, tmp_path):
    """As a user runs them: `python -m k2sys.cli ...` (a few, concurrently: each start costs seconds)."""
    hf = str(ckpts / "hf")
    cases = [
        (["config", "show", "tiny-k2", "--set", "rl.lr=1e999", "engine.port=99999"], 2, ["rl.lr"]),
        (["serve", "--model", "/nonexistent"], 2, ["/nonexistent"]),
        (["serve", "--model", hf, "--port", "99999"], 2, ["--port"]),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("K2SYS_DEBUG", None)
    procs = [subprocess.Popen([sys.executable, "-m", "k2sys.cli", *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for argv, _, _ in cases]
    for (argv, want_rc, names), p in zip(cases, procs):
        _, err = p.communicate(timeout=300)
        _assert_one_line_error(p.returncode, err, *names, expect_rc=want_rc)
    # --debug shows the traceback
    out = subprocess.run([sys.executable, "-m", "k2sys.cli", "--debug", "serve", "--model", "/nonexistent"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1 and "Traceback" in out.stderr and "ConfigError" in out.stderr


# ---- convert: no clobbering, never into the source, atomic swap ------------------------------------------
def test_convert_refuses_to_clobber_or_touch_its_source(ckpts, tmp_path, capsys):
    from k2sys.trainer import convert

    hf, mg = ckpts / "hf", ckpts / "mg"
    before_hf, before_mg = _tree(hf), _tree(mg)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    afile = tmp_path / "afile"
    afile.write_text("keep me too")
    cases = [
        (["hf-to-megatron", str(hf), str(hf)], "is the input checkpoint"),
        (["hf-to-megatron", str(hf), str(hf / "sub")], "inside the input checkpoint"),
        (["hf-to-megatron", str(hf), str(ckpts)], "contains the input checkpoint"),
        (["hf-to-megatron", str(hf), str(mg)], "--overwrite"),              # an existing checkpoint
        (["hf-to-megatron", str(hf), str(mine), "--overwrite"], "not a k2sys Megatron checkpoint"),
        (["hf-to-megatron", str(hf), str(afile), "--overwrite"], "not a directory"),
        (["megatron-to-hf", str(mg), str(mg)], "is the input checkpoint"),
        (["megatron-to-hf", str(mg), str(mg / "hf")], "inside the input checkpoint"),
        (["megatron-to-hf", str(mg), str(ckpts / "hf_other")], "--overwrite"),
        (["megatron-to-hf", str(mg), str(mine), "--overwrite"], "not an HF checkpoint directory"),
        (["megatron-to-hf", str(mg), str(afile), "--overwrite"], "not a directory"),
    ]
    for argv, match in cases:
        assert convert.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err, (argv, err)
    assert _tree(hf) == before_hf and _tree(mg) == before_mg
    assert (mine / "notes.txt").read_text() == "keep me" and afile.read_text() == "keep me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "mine"]
    assert not (hf / "sub").exists() and not (mg / "hf").exists()


def test_convert_overwrite_swaps_in_a_complete_output_atomically(ckpts, tmp_path, monkeypatch, capsys):
    import shutil

    from k2sys.models import hf_io
    from k2sys.trainer import convert

    dst = tmp_path / "out"
    shutil.copytree(ckpts / "hf_other", dst)
    old = _tree(dst)
    assert convert.main(["megatron-to-hf", str(ckpts / "mg"), str(dst)]) == 2
    assert "--overwrite" in capsys.readouterr().err and _tree(dst) == old

    # A write that dies half-way (disk full) leaves the previous DST byte for byte, and no temp dir.
    real = hf_io.save_state_dict

    def dies_mid_write(state, out_dir, *a, **k):
        (Path(out_dir) / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_io, "save_state_dict", dies_mid_write)
    rc, err = _run_cli(["convert", "megatron-to-hf", str(ckpts / "mg"), str(dst), "--overwrite"], capsys)
    _assert_one_line_error(rc, err, "No space left on device", expect_rc=1)
    assert _tree(dst) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.setattr(hf_io, "save_state_dict", real)

    # With --overwrite the new checkpoint replaces the old one whole: the source's weights, nothing else.
    assert convert.main(["megatron-to-hf", str(ckpts / "mg"), str(dst), "--overwrite"]) == 0
    from safetensors.torch import load_file

    a, b = load_file(str(ckpts / "hf" / "model.safetensors")), load_file(str(dst / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # An empty directory is not data: it is written without --overwrite.
    (tmp_path / "empty").mkdir()
    assert convert.main(["megatron-to-hf", str(ckpts / "mg"), str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "config.json").is_file()


def test_check_output_dir_allows_overwrite_of_an_existing_megatron_checkpoint(ckpts, tmp_path):
    from k2sys.trainer.convert import ConvertError, check_output_dir

    check_output_dir(ckpts / "hf", ckpts / "mg", overwrite=True, kind="megatron")
    with pytest.raises(ConvertError, match="--overwrite"):
        check_output_dir(ckpts / "hf", ckpts / "mg", overwrite=False, kind="megatron")
    check_output_dir(ckpts / "hf", tmp_path / "new" / "deeper", overwrite=False, kind="megatron")


# ---- data: every dropped row counted and reported; BOM accepted; mostly-good files still checked ---------
def _mixed_file(path: Path, n_good: int) -> None:
    good = json.dumps(GOOD).encode()
    lines = [b"\xef\xbb\xbf" + good]                                          # 1: BOM, then a good row
    lines += [good] * (n_good - 1)
    lines.append(json.dumps(GOOD)[:25].encode())                              # truncated
    lines.append(b'{"messages": [\x00\x00]}')                                 # NUL bytes
    lines.append('{"messages": [{"role": "user", "content": "café"}, '
                 '{"role": "assistant", "content": "ok"}]}'.encode("latin-1"))  # latin-1
    lines.append(json.dumps({"messages": [{"role": "bot", "content": "x"}]}).encode())  # wrong role
    path.write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize("reader", ["jsonl", "sources"])
def test_sft_rows_dropped_are_counted_per_reason_and_checked(tmp_path, reader):
    from k2sys.coordinator.sections import DataSection
    from k2sys.data import BadDataError, load_chat_jsonl, load_chat_rows

    load = (lambda p: load_chat_jsonl(p)) if reader == "jsonl" else (lambda p: load_chat_rows(p))
    p = tmp_path / "sft.jsonl"
    _mixed_file(p, 60)  # 4 bad of 64: 6%, a "mostly good" file
    rows, rep = load(p)
    assert [r.line for r in rows] == list(range(1, 61))                       # the BOM row is kept
    assert rep.rows_seen == 64 and rep.n_bad == 4
    assert rep.reasons() == {"truncated": 1, "NUL byte": 1, "not UTF-8": 1, "unknown role": 1}
    assert [b.line for b in sorted(rep.bad, key=lambda b: b.line)] == [61, 62, 63, 64]
    head = rep.summary().splitlines()[0]
    assert "60 of 64 rows kept, 4 bad" in head and "truncated x1" in head and "not UTF-8 x1" in head
    with pytest.raises(BadDataError) as ei:
        rep.check(DataSection().max_bad_fraction)
    first = str(ei.value).splitlines()[0]
    assert str(p) in first and "max_bad_fraction" in first and "4 bad" in first
    assert "line 61: truncated" in str(ei.value)
    # The same 4 bad rows in a file 50x larger are within the default and pass, still reported.
    _mixed_file(p, 300)
    rows, rep = load(p)
    rep.check(DataSection().max_bad_fraction)
    assert len(rows) == 300 and rep.n_bad == 4


def test_sft_dataset_reports_tolerated_bad_rows(tmp_path, caplog):
    import logging

    from k2sys.data import SFTDataConfig, load_sft_data

    p = tmp_path / "sft.jsonl"
    _mixed_file(p, 300)

    def tokenize(messages, tools):
        ids = [len(m["content"]) % 7 + 1 for m in messages]
        return ids, [int(m["role"] == "assistant") for m in messages]

    with caplog.at_level(logging.WARNING, logger="k2sys.data"):
        data = load_sft_data(SFTDataConfig(path=str(p), seq_len=64), tokenize=tokenize)
    assert data.report.n_bad == 4
    assert any("4 bad" in r.getMessage() and "line 301: truncated" in r.getMessage() for r in caplog.records)


# ---- property-based fuzzing -------------------------------------------------------------------------------
def _leaf_keys(cfg, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out += _leaf_keys(v, f"{prefix}{f.name}.") if dataclasses.is_dataclass(v) else [prefix + f.name]
    return out


def _tiny_k2():
    from k2sys.recipes import get_recipe

    return get_recipe("tiny-k2")


KEYS = _leaf_keys(_tiny_k2())
SPECIAL_VALUES = ["inf", "-inf", "nan", "NaN", "1e999", "-1e999", "-1", "0", "1", "2", "0.5", "65535", "65536", "99999",
                  "-0", "1e-320", str(2**63), str(-2**63), "", " ", "none", "true", "false", "{}", "[]",
                  '{"list_ops": -1}', '{"list_ops": 8, "arithmetic": 1e999}', '{"a": Infinity}', "mask", "importance",
                  "adamw", "muon", "\x00", "../..", "/proc/x", "x" * 300]
VALUES = st.one_of(st.sampled_from(SPECIAL_VALUES), st.text(max_size=20),
                   st.integers(min_value=-2**70, max_value=2**70).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(items=st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=12)), VALUES),
                      min_size=1, max_size=3))
def test_fuzz_set_overrides(items):
    """Any `--set` list either gives a config whose every value is finite and valid, or a ConfigError
    naming a key; never another exception."""
    overrides = [f"{k}={v}" for k, v in items]
    try:
        cfg = apply_overrides(_tiny_k2(), overrides)
    except ConfigError as e:
        msg = str(e)
        assert msg.strip() and "Traceback" not in msg
        named = any(part.strip() and part.strip() in msg for k, _ in items for part in k.split("=")[0].split("."))
        assert named or "unknown key" in msg or "KEY=VALUE" in msg, (overrides, msg)
        return
    text = json.dumps(to_dict(cfg), allow_nan=False)  # raises on any inf/nan left in the config
    validate_tree(cfg)

    def ints(v):
        if isinstance(v, dict):
            return [x for w in v.values() for x in ints(w)]
        if isinstance(v, list):
            return [x for w in v for x in ints(w)]
        return [v] if isinstance(v, int) and not isinstance(v, bool) else []

    assert all(abs(v) <= INT_MAX for v in ints(json.loads(text)))
    assert 0 <= cfg.engine.port <= 65535 and cfg.rl.stale_mode in ("none", "mask") and cfg.rl.lr > 0


_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8)
                            | st.floats(allow_nan=False),
                            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                            max_leaves=6)
_convs = st.builds(
    lambda turns, roles: {"messages": [{"role": r, "content": t} for r, t in zip(roles, turns)]
                          + [{"role": "assistant", "content": turns[-1]}]},
    st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=3),
    st.lists(st.sampled_from(["user", "system"]), min_size=3, max_size=3))
LINE_KINDS = st.one_of(
    st.tuples(st.just("good"), _convs.map(lambda c: json.dumps(c, ensure_ascii=False).encode())),
    st.tuples(st.just("truncated"), st.tuples(_convs, st.floats(0.05, 0.95)).map(
        lambda t: (s := json.dumps(t[0]).encode())[: max(1, int(len(s) * t[1]))].rstrip())),
    st.tuples(st.just("bytes"), st.binary(max_size=30).map(lambda b: b.replace(b"\n", b""))),
    st.tuples(st.just("json"), _json_values.map(lambda v: json.dumps(v).encode())),
    st.tuples(st.just("blank"), st.sampled_from([b"", b"   ", b"\t", b"\r"])),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(lines=st.lists(LINE_KINDS, min_size=1, max_size=15), bom=st.booleans(), crlf=st.booleans())
def test_fuzz_data_rows_are_never_lost(tmp_path_factory, lines, bom, crlf):
    """Every non-blank line is either kept (with its line number) or reported bad with its line number;
    every well-formed conversation is kept (a leading BOM included); no reader raises."""
    from k2sys.data import BadDataError, load_chat_jsonl, load_chat_rows

    d = tmp_path_factory.mktemp("fuzz")
    eol = b"\r\n" if crlf else b"\n"
    blob = (b"\xef\xbb\xbf" if bom else b"") + eol.join(raw for _, raw in lines) + eol
    p = d / "rows.jsonl"
    p.write_bytes(blob)
    nonblank = set()
    for i, (kind, raw) in enumerate(lines, start=1):
        text = raw.decode("utf-8", errors="replace")
        if i == 1 and not bom:  # a file that starts with BOM bytes starts with a BOM: readers drop it
            text = text.removeprefix("\ufeff")
        if text.strip():
            nonblank.add(i)
    good = {i for i, (kind, _) in enumerate(lines, start=1) if kind == "good"}
    broken = {i for i, (kind, _) in enumerate(lines, start=1) if kind == "truncated"}
    for read in (load_chat_jsonl, load_chat_rows):
        try:
            rows, rep = read(p)
        except BadDataError as e:  # whole-file refusals of the sources reader, each for its stated reason
            assert read is load_chat_rows, e
            assert "one JSON array" in str(e) or ("no row has the messages key" in str(e) and not good), e
            continue
        kept = [r.line for r in rows]
        bad = [b.line for b in rep.bad]
        assert len(kept) == len(set(kept)) and not set(kept) & set(bad)
        assert set(kept) | set(bad) == nonblank, (read.__name__, kept, bad, nonblank)
        assert rep.rows_seen == len(nonblank) and rep.n_ok == len(kept)
        assert good <= set(kept) and not broken & set(kept)
