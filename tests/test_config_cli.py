"""Config overrides, recipes and the CLI front door."""

import json
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from k2sys.cli import main
from k2sys.config import ConfigError, apply_overrides, coerce, from_dict, to_dict
from k2sys.recipes import RunConfig, get_recipe


@dataclass(kw_only=True)
class _Inner:
    mode: Literal["linear", "exp"] = "linear"
    rate: float = 0.1
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    maybe: int | None = None


@dataclass(kw_only=True)
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    flag: bool = False


def test_overrides_coerce_types_and_copy():
    base = _Outer()
    cfg = apply_overrides(base, ["inner.mode=exp", "inner.rate=2e-3", "inner.sizes=4,5,6", "flag=yes",
                                 "inner.maybe=none"])
    assert cfg.inner.mode == "exp" and cfg.inner.rate == 0.002 and cfg.inner.sizes == [4, 5, 6]
    assert cfg.flag is True and cfg.inner.maybe is None
    assert base.inner.mode == "linear" and base.inner.sizes == [1, 2]  # original untouched


@pytest.mark.parametrize("override,match", [
    ("inner.mod=exp", r"unknown key 'mod'.*valid keys: mode, rate, sizes, maybe"),
    ("inner.mode=cosine", r"inner.mode: 'cosine' is not allowed; choose one of 'linear', 'exp'"),
    ("inner.rate=fast", r"inner.rate: expected a float"),
    ("flag=maybe", r"flag: expected a bool"),
    ("inner=3", r"inner is a section"),
    ("flag", r"expected KEY=VALUE"),
])
def test_bad_overrides_name_the_field(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(_Outer(), [override])


def test_validate_runs_after_overrides():
    with pytest.raises(ConfigError, match="tokenizer.vocab_size"):
        apply_overrides(get_recipe("tiny-model"), ["tokenizer.vocab_size=10"])


def test_config_dict_round_trip():
    cfg = apply_overrides(get_recipe("tiny-model"), ["model.seed=7"])
    assert from_dict(RunConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    with pytest.raises(ConfigError, match="unknown keys"):
        from_dict(RunConfig, {**to_dict(cfg), "bogus": 1})


def test_coerce_union_reports_all_options():
    with pytest.raises(ConfigError, match="int or none"):
        coerce("x", int | None, "f")


def test_cli_config_show_and_errors(capsys):
    assert main(["config", "show", "tiny-model", "--set", "model.seed=11"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["model"]["seed"] == 11 and shown["name"] == "tiny-model"
    assert main(["config", "show", "tiny-model", "--set", "model.preset=k9"]) == 2
    assert "model.preset" in capsys.readouterr().err
    assert main(["config", "show", "no-such-recipe"]) == 2
    assert "tiny-model" in capsys.readouterr().err


def test_cli_env_reports_extensions():
    out = subprocess.run([sys.executable, "-m", "k2sys.cli", "env", "--json"], capture_output=True, text=True,
                         check=True).stdout
    info = json.loads(out)
    assert info["extensions"]["cpp"] is True
    assert info["versions"]["torch"]
    assert "native engine" in info["backends"]
