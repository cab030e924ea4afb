"""The SLURM launchers on a real one-node SLURM cluster started for the test (scripts/local_slurm.sh)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
needs_slurm = pytest.mark.skipif(shutil.which("slurmctld") is None or os.geteuid() != 0,
                                 reason="needs slurmctld/slurmd installed (apt-get install slurmctld slurmd "
                                        "slurm-client) and root; .ci/run installs them")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    out = subprocess.run(["bash", str(ROOT / "scripts" / "local_slurm.sh"), "start", str(d)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    conf = out.stdout.strip().split("=", 1)[1]
    yield {**os.environ, "SLURM_CONF": conf}
    subprocess.run(["bash", str(ROOT / "scripts" / "local_slurm.sh"), "stop", str(d)], timeout=60)


@needs_slurm
def test_sbatch_scripts_parse():
    for f in (ROOT / "examples" / "slurm").glob("*.sbatch"):
        assert subprocess.run(["bash", "-n", str(f)]).returncode == 0, f


@needs_slurm
@pytest.mark.slow
def test_recipe_runs_under_sbatch(slurm, tmp_path):
    venv = Path(sys.executable).parent.parent
    env = {**slurm, "K2SYS_HOME": str(ROOT), "K2SYS_VENV": str(venv), "OUTPUT_ROOT": str(tmp_path),
           "OMP_NUM_THREADS": "1",
           "K2SYS_SET": "--set name=slurm --set sft.steps=5 --set rl.iterations=1 --set tasks.n_train=60 "
                        "--set eval.n_tasks=5 --set rl.filter_prompts=8 --set rollout.prompts_per_iter=2 "
                        "--set rollout.samples_per_prompt=2 --set rl.mismatch_probe=1"}
    res = subprocess.run(["sbatch", "--wait", f"--output={tmp_path}/job.out",
                          str(ROOT / "examples" / "slurm" / "tiny_k2.sbatch")],
                         env=env, capture_output=True, text=True, timeout=900)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert res.returncode == 0, res.stderr + log[-3000:]
    report = json.loads((tmp_path / "slurm" / "report.json").read_text())
    assert report["rl_iterations"] == 1 and set(report["eval"]) == {"sft", "rl"}
