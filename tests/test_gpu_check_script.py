"""scripts/gpu_check.sh on a CPU machine: it cannot run here, so check what can be checked.

- the script parses (bash -n) and every Python command it runs exists and accepts the exact
  arguments the script passes (each is re-run with --help appended: argparse validates the
  arguments before it, then exits 0);
- the GPU-path helpers refuse a machine without CUDA with exit 2 and a clear message;
- the formulas behind the decode and MFU figures, against the model's own tensors.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _python_commands() -> dict[str, list[str]]:
    """{stage name: argv after $PY} of every `stage NAME SECS $PY ...` in the script."""
    text = re.sub(r"\\\n\s*", " ", SCRIPT.read_text())  # join continued lines
    cmds = {}
    for m in re.finditer(r"^\s*stage (\w+) \d+ \$PY (.+)$", text, re.M):
        line = m[2].split("  #")[0]
        cmds[m[1]] = shlex.split(line.replace('"$OUT', '"/tmp/gpu_check_test'))
    return cmds


def test_script_parses_and_names_every_stage():
    assert os.access(SCRIPT, os.X_OK)
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    cmds = _python_commands()
    for stage in ("build", "ext", "gpu_tests", "compile_sm90", "nvcc", "onload", "switch", "moe", "decode", "mfu",
                  "tune_moe"):
        assert stage in cmds, f"gpu_check.sh lost its {stage} stage"
    text = SCRIPT.read_text()
    assert 'skip sglang "' in text and 'skip te "' in text  # skipped with a reason when not installed
    assert "timeout \"$secs\"" in text and "gpu_check.json" in text


@pytest.mark.parametrize("stage", ["compile_sm90", "nvcc", "onload", "switch", "moe", "decode", "mfu", "tune_moe"])
def test_each_python_stage_accepts_its_arguments(stage, tmp_path):
    argv = _python_commands()[stage]
    if argv[0] != "-m":
        assert (ROOT / argv[0]).is_file(), f"{argv[0]} is missing"
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert proc.returncode == 0, f"{stage}: {argv}\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}"
    assert "usage:" in proc.stdout


def test_gpu_path_needs_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    for cmd in ("onload", "switch", "decode", "mfu"):
        proc = subprocess.run([sys.executable, "benchmarks/gpu_path.py", cmd], capture_output=True, text=True,
                              cwd=ROOT, timeout=300)
        assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr, (cmd, proc.stderr[-500:])


@pytest.fixture(scope="module")
def gpu_path():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_path

        yield gpu_path
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        sys.modules.pop("gpu_path", None)


def test_decode_bytes_and_training_flops_formulas(gpu_path):
    from k2sys.models import build_model, k2_small

    cfg = k2_small(vocab_size=1024)
    state = build_model(cfg, seed=0).state_dict()
    E, k, H = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
    routed = sum(v.numel() for n, v in state.items() if re.search(r"\.mlp\.experts\.\d+\.", n))
    buffers = sum(v.numel() for n, v in state.items() if "e_score_correction_bias" in n)
    embed = state["model.embed_tokens.weight"].numel()
    everything = sum(v.numel() for v in state.values())
    # One embedding row, top_k / E of the routed experts, every other tensor (router bias too) once; bf16.
    want = (everything - embed + H - routed + routed * k // E) * 2
    assert gpu_path.bytes_per_decode_token(cfg, 2) == want
    norms = sum(v.numel() for n, v in state.items() if "norm" in n)
    active = everything - buffers - embed - norms - routed + routed * k // E
    T = 1024
    attn = 3 * 2 * (T / 2) * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
                                                          + cfg.v_head_dim) * cfg.num_hidden_layers
    assert gpu_path.train_flops_per_token(cfg, T) == pytest.approx(6 * active + attn)
