"""The console: k2sys's own progress at INFO, third-party chatter hidden unless --verbose."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap
import time

from k2sys.console import Progress

SCRIPT = textwrap.dedent("""
    import logging, sys, warnings
    from k2sys import console
    console.setup(console.verbose_requested(sys.argv[1:]))
    logging.getLogger("megatron.core.distributed").info("Params for bucket 1 (1495552 elements)")
    logging.getLogger("k2sys.coordinator").info("ours: SFT step 1/3")
    logging.getLogger("megatron.core").warning("a real megatron warning")
    warnings.warn("Transformer Engine and Apex are not installed. Falling back to local")
    warnings.warn("something else entirely")
""")


def _run(*args: str, env: dict | None = None) -> str:
    env = {**{k: v for k, v in os.environ.items() if k != "K2SYS_VERBOSE"}, **(env or {})}
    res = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stderr


def test_default_console_keeps_ours_and_real_warnings_only():
    err = _run()
    assert "ours: SFT step 1/3" in err and "a real megatron warning" in err and "something else entirely" in err
    assert "Params for bucket" not in err and "Transformer Engine and Apex" not in err


def test_verbose_brings_third_party_back():
    for args, env in ((("--verbose",), None), ((), {"K2SYS_VERBOSE": "1"})):
        err = _run(*args, env=env)
        assert "Params for bucket" in err and "Transformer Engine and Apex" in err and "ours: SFT step" in err


def test_progress_lines_carry_figures_and_eta(caplog):
    log = logging.getLogger("k2sys.test_progress")
    p = Progress("RL", 10, "iter", start=4, logger=log, stream=io.StringIO())  # not a terminal: log lines
    time.sleep(0.05)
    with caplog.at_level(logging.INFO, logger="k2sys.test_progress"):
        p.update(5, reward=0.25, loss=1.5, paused=2)
        p.update(6, reward=None, loss=1.25)
    first, second = (r.getMessage() for r in caplog.records)
    assert first.startswith("RL iter 5/10 | reward 0.25 | loss 1.5 | paused 2 | ")
    assert "reward" not in second and second.startswith("RL iter 6/10 | loss 1.25")
    # ETA from this process's own rate: one iteration ran since the resume at 4, five remain
    eta = p.eta_s(5)
    assert 5 * 0.04 < eta < 5 * 5.0
    assert p.eta_s(4) != p.eta_s(4)  # nothing ran yet: unknown (nan), not zero


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_one_bar_on_a_terminal(monkeypatch):
    monkeypatch.delenv("K2SYS_VERBOSE", raising=False)
    out = _Terminal()
    p = Progress("SFT", 3, "step", stream=out, logger=logging.getLogger("k2sys.test_progress_bar"))
    for i in (1, 2, 3):
        p.update(i, loss=2.0 / i)
    p.close()
    text = out.getvalue()
    assert "SFT" in text and "3/3" in text and "loss=0.6667" in text
