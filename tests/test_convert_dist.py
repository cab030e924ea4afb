"""`k2sys convert` and megatron's distributed checkpoint format, on 2 gloo ranks.

A tiny random HF checkpoint (k2_tiny, vocab 512, fp32, non-zero expert bias, kimi_k2 config with an
auto_map, a tiktoken tokenizer with remote code) is converted at tp=2 (from this process: the CLI spawns
its 2 writer ranks) and at ep=2 (under a torchrun launch of 2 ranks: the ranks write in place). Fresh
processes then open each checkpoint with megatron's own `dist_checkpointing.load` and a GPTModel built at
a different layout (tp=1 here; tp=2 from the ep=2 write and ep=2 from the tp=2 write under torchrun) and
compare logits with k2sys.models.load_hf's reference model. megatron-to-hf must give back the HF
tensors bitwise; a writer that crashes, or fails, leaves no DST (or the previous one untouched).

The 2-rank parts re-launch this file under `torchrun --nproc_per_node=2` (see _worker).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # file total > 30 s on a 2-core CPU: scheduled first (conftest)

warnings.filterwarnings("ignore")

VOCAB = 512
LOGIT_TOL = 1e-5
AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
EXTRA_FILES = ("tiktoken.model", "tokenizer_config.json", "tokenization_kimi.py", "configuration_deepseek.py",
               "modeling_deepseek.py", "generation_config.json")


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def _write_hf(dst: Path) -> None:
    """The test's HF checkpoint: random weights with a routing-relevant expert bias, plus the files a
    Kimi-K2 release carries (tiktoken.model, tokenization_kimi.py, remote-code files named by auto_map)."""
    from k2sys.models import build_model, k2_tiny, save_hf

    ref = build_model(k2_tiny(VOCAB), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in range(ref.config.first_k_dense_replace, ref.config.num_hidden_layers):
            gate = ref.model.layers[i].mlp.gate
            gate.e_score_correction_bias.copy_(torch.randn(gate.e_score_correction_bias.shape, generator=g) * 0.05)
    save_hf(ref, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(model_type="kimi_k2", auto_map=AUTO_MAP)
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "tiktoken.model").write_text("IQ== 0\nIg== 1\n")
    (dst / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}, "model_max_length": 1024}))
    for f in ("tokenization_kimi.py", "configuration_deepseek.py", "modeling_deepseek.py"):
        (dst / f).write_text(f"# {f}: remote code of the release\n")


def _hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _load_at(mg: Path, tp: int, ep: int) -> dict:
    """Open `mg` with megatron's dist_checkpointing.load and a GPTModel built at (tp, ep) in the current
    world; logits vs the reference model and the loaded local tensors vs the HF tensors' slices."""
    from megatron.core import dist_checkpointing

    from k2sys.models import load_hf
    from k2sys.trainer import naming
    from k2sys.trainer.backend import MegatronBackend, TrainerConfig
    from k2sys.trainer.parallel import ParallelConfig, ranks

    hf = mg.parent / "hf"
    ref = load_hf(hf)
    cfg = ref.config
    be = MegatronBackend(cfg, ParallelConfig(tp=tp, ep=ep), TrainerConfig(moe_kernels="megatron"))
    gpt = be.model.module
    ids = _ids()
    want = ref(ids).detach()
    before = float((be.logits(ids) - want).abs().max())  # randomly initialised: must be far off
    state = dist_checkpointing.load({"model": gpt.sharded_state_dict()}, str(mg))
    gpt.load_state_dict(state["model"])
    got = be.logits(ids)
    r = ranks()
    expect = naming.hf_to_megatron(_hf_tensors(hf), cfg, tp, ep, r["tp_rank"], r["ep_rank"])
    local = be.local_state()
    mismatched = sorted(k for k in expect if not torch.equal(local[k], expect[k]))
    return {"before": before, "diff": float((got - want).abs().max()), "scale": float(want.abs().max()),
            "mismatched": mismatched[:5], "n_local": len(expect), "names_equal": set(local) == set(expect)}


# ---- the 2-rank worker (torchrun) ------------------------------------------------------------------------
def _worker(out_path: str, root: str, scenarios: list[str]) -> None:
    import torch.distributed as dist

    from k2sys.trainer import convert
    from k2sys.trainer.parallel import init_distributed

    init_distributed()
    root_p = Path(root)
    results: dict = {}

    def dump() -> None:
        if dist.get_rank() == 0:
            Path(out_path).write_text(json.dumps(results))

    for name in scenarios:
        if name == "write_ep2":  # under torchrun (WORLD_SIZE == tp*ep): the ranks write in place
            results[name] = convert.main(["hf-to-megatron", str(root_p / "hf"), str(root_p / "mg_ep2"), "--ep", "2"])
        elif name == "read":  # a fresh launch: no state shared with the writers
            results["tp2_from_ep2"] = _load_at(root_p / "mg_ep2", 2, 1)
            results["ep2_from_tp2"] = _load_at(root_p / "mg_tp2", 1, 2)
        elif name == "crash":  # rank 1 dies after its shards are on disk, before the checkpoint is committed
            import megatron.core.dist_checkpointing as dc

            real_save = dc.save

            def save_then_die(*args, **kwargs):
                real_save(*args, **kwargs)
                if dist.get_rank() == 1:  # the rank dies with its helpers (megatron's writer Manager process)
                    import psutil

                    for child in psutil.Process().children(recursive=True):
                        child.kill()
                    os._exit(17)

            dc.save = save_then_die
            dump()
            convert.main(["hf-to-megatron", str(root_p / "hf"), str(root_p / "mg_crash"), "--ep", "2"])
            results["crash"] = "the write finished"
        dump()
    from k2sys.trainer.parallel import shutdown

    shutdown()


def _torchrun(root: Path, scenarios: list[str], timeout: int = 420, expect_ok: bool = True) -> tuple[int, str, dict]:
    """(return code, log tail, results) of a 2-rank torchrun launch of _worker."""
    tag = "-".join(scenarios)
    out, log = root / f"result-{tag}.json", root / f"log-{tag}.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).resolve()), str(out), str(root), *scenarios]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            # Whatever is left of the launch (nothing, when it ends cleanly).
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    tail = log.read_text()[-6000:]
    if expect_ok:
        assert rc == 0, tail
    return rc, tail, (json.loads(out.read_text()) if out.exists() else {})


# ---- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from k2sys.trainer import convert

    root = tmp_path_factory.mktemp("convert_dist")
    _write_hf(root / "hf")
    # From a plain process: the CLI spawns its tp*ep = 2 writer ranks.
    assert convert.main(["hf-to-megatron", str(root / "hf"), str(root / "mg_tp2"), "--tp", "2"]) == 0
    _, tail, res = _torchrun(root, ["write_ep2"])
    assert res == {"write_ep2": 0}, tail
    return root


@pytest.fixture(scope="module")
def two_rank_reads(root):
    """Reads at other layouts, then (last: it kills the launch) a crash in the middle of a write."""
    rc, tail, res = _torchrun(root, ["read", "crash"], expect_ok=False)
    assert "tp2_from_ep2" in res and "ep2_from_tp2" in res, tail
    return rc, tail, res


# ---- tests -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,tp,ep", [("mg_tp2", 2, 1), ("mg_ep2", 1, 2)])
def test_writes_megatron_dist_checkpoint(root, name, tp, ep):
    from megatron.core import dist_checkpointing

    mg = root / name
    assert dist_checkpointing.check_is_distributed_checkpoint(str(mg))
    assert not list(mg.glob("mp_rank_*")), "the old per-rank files must be gone"
    meta = json.loads((mg / "k2sys_megatron.json").read_text())
    assert (meta["format"], meta["tp"], meta["ep"], meta["spec"], meta["dtype"]) == (
        "k2sys-megatron-model-dist-v1", tp, ep, "local", "float32")
    keys = set(dist_checkpointing.load_tensors_metadata(str(mg)))
    assert "decoder.layers.3.mlp.router.expert_bias" in keys  # the buffer travels with the weights
    assert "decoder.layers.0.self_attention.q_layernorm.weight" in keys  # local-spec names
    assert not any(k.startswith("optimizer") for k in keys)
    for f in EXTRA_FILES:
        assert (mg / f).read_bytes() == (root / "hf" / f).read_bytes(), f
    assert meta["config"]["auto_map"] == AUTO_MAP and meta["config"]["model_type"] == "kimi_k2"
    assert not [p.name for p in root.iterdir() if ".tmp-" in p.name]  # no temp dir left behind


def test_megatron_loads_it_at_tp1_in_a_fresh_process_group(root):
    """This process has not written anything: a world of one, tp=1/ep=1, reading both writes."""
    for name in ("mg_tp2", "mg_ep2"):
        r = _load_at(root / name, 1, 1)
        assert r["names_equal"] and not r["mismatched"], (name, r)
        assert r["before"] > 1e-2, r  # the model was random before the load
        assert r["diff"] <= LOGIT_TOL, (name, r)


@pytest.mark.parametrize("case", ["tp2_from_ep2", "ep2_from_tp2"])
def test_megatron_loads_it_at_other_two_rank_layouts(two_rank_reads, case):
    r = two_rank_reads[2][case]
    assert r["names_equal"] and not r["mismatched"], r
    assert r["before"] > 1e-2, r
    assert r["diff"] <= LOGIT_TOL, r


def test_crash_in_the_middle_leaves_no_dst(root, two_rank_reads):
    rc, tail, res = two_rank_reads
    assert "crash" not in res, "rank 1 was meant to die inside the write"
    assert rc != 0 and re.search(r"exitcode\s*:\s*17\b", tail), tail
    assert not (root / "mg_crash").exists()


@pytest.mark.parametrize("name", ["mg_tp2", "mg_ep2"])
def test_megatron_to_hf_round_trip_is_bitwise(root, name):
    from k2sys.trainer import convert

    out = root / f"back_{name}"
    assert convert.main(["megatron-to-hf", str(root / name), str(out)]) == 0
    a, b = _hf_tensors(root / "hf"), _hf_tensors(out)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    src_cfg, out_cfg = (json.loads((d / "config.json").read_text()) for d in (root / "hf", out))
    assert out_cfg == src_cfg
    for f in EXTRA_FILES:
        assert (out / f).read_bytes() == (root / "hf" / f).read_bytes(), f


def test_export_without_the_remote_code_has_no_auto_map(root, tmp_path):
    from k2sys.trainer import convert

    mg = tmp_path / "mg"
    shutil.copytree(root / "mg_tp2", mg)
    (mg / "modeling_deepseek.py").unlink()
    assert convert.main(["megatron-to-hf", str(mg), str(tmp_path / "hf")]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "auto_map" not in cfg and cfg["model_type"] == "kimi_k2"
    assert (tmp_path / "hf" / "tiktoken.model").exists() and (tmp_path / "hf" / "tokenization_kimi.py").exists()


def test_te_spec_checkpoint_reads_without_transformer_engine(root, tmp_path):
    """A checkpoint with the TE spec's names (fused layer norms as `...layer_norm_weight`), written here
    from a local-spec model renamed along naming.py's TE column, reads back bitwise on a CPU."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from k2sys.trainer import convert, naming
    from k2sys.trainer.backend import MegatronBackend, TrainerConfig
    from k2sys.trainer.parallel import ParallelConfig

    be = MegatronBackend.from_hf(root / "hf", ParallelConfig(), TrainerConfig(moe_kernels="megatron"))
    cfg = be.config
    local, te = naming.local_names(cfg, te=False), naming.local_names(cfg, te=True)
    to_te = {a: b for a, b in zip(local, te) if a != b}
    assert any(b.endswith("layer_norm_weight") for b in to_te.values()) and len(local) == len(te)
    sharded = be.model.module.sharded_state_dict()
    for v in sharded.values():
        if isinstance(v, ShardedTensor) and v.key in to_te:
            v.key = to_te[v.key]
    mg = tmp_path / "mg_te"
    mg.mkdir()
    dist_checkpointing.save({"model": sharded}, str(mg))
    meta = json.loads((root / "mg_tp2" / "k2sys_megatron.json").read_text())
    (mg / "k2sys_megatron.json").write_text(json.dumps({**meta, "tp": 1, "ep": 1, "spec": "te"}))
    keys = set(dist_checkpointing.load_tensors_metadata(str(mg)))
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in keys
    assert "decoder.layers.0.pre_mlp_layernorm.weight" not in keys
    assert convert.main(["megatron-to-hf", str(mg), str(tmp_path / "hf")]) == 0
    a, b = _hf_tensors(root / "hf"), _hf_tensors(tmp_path / "hf")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # The meta file and the stored names must agree.
    (mg / "k2sys_megatron.json").write_text(json.dumps({**meta, "spec": "local"}))
    assert convert.main(["megatron-to-hf", str(mg), str(tmp_path / "hf2")]) == 2


def test_old_per_rank_format_still_reads(root, tmp_path):
    """Backwards compatibility: the per-rank layout earlier versions wrote (built here by hand)."""
    from k2sys.models.config import K2Config
    from k2sys.trainer import convert, naming

    hf = _hf_tensors(root / "hf")
    cfg = K2Config.from_hf_dict(json.loads((root / "hf" / "config.json").read_text()))
    old = tmp_path / "old"
    for t in range(2):
        for e in range(2):
            d = old / (f"mp_rank_{t:02d}_{e:03d}")
            d.mkdir(parents=True)
            torch.save({"model": naming.hf_to_megatron(hf, cfg, 2, 2, t, e), "tp_rank": t, "ep_rank": e},
                       d / "model_optim_rng.pt")
    (old / "k2sys_megatron.json").write_text(json.dumps(
        {"format": "k2sys-megatron-per-rank-v1", "tp": 2, "ep": 2, "config": cfg.to_hf_dict()}))
    assert convert.main(["megatron-to-hf", str(old), str(tmp_path / "hf")]) == 0
    back = _hf_tensors(tmp_path / "hf")
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)


def test_failed_writer_rank_keeps_the_previous_dst(root, tmp_path, capsys):
    """A checkpoint missing a tensor, converted over an existing DST with --overwrite: refused (by the
    header check before any writer rank starts), the error names the tensor, the old DST is
    untouched and no temp dir is left."""
    from safetensors.torch import save_file

    from k2sys.trainer import convert

    bad = tmp_path / "bad"
    shutil.copytree(root / "hf", bad)
    state = _hf_tensors(bad)
    gone = "model.layers.3.mlp.experts.7.down_proj.weight"
    del state[gone]
    (bad / "model.safetensors").unlink()
    save_file(state, str(bad / "model.safetensors"))
    dst = tmp_path / "mg"
    shutil.copytree(root / "mg_tp2", dst)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    assert convert.main(["hf-to-megatron", str(bad), str(dst), "--ep", "2", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert gone in err, err[-2000:]
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "mg"]


def test_bad_arguments_are_refused_before_any_rank_starts(root, tmp_path, capsys):
    from k2sys.trainer import convert
    from k2sys.trainer.spec import te_available

    hf = str(root / "hf")
    assert convert.main(["hf-to-megatron", hf, str(tmp_path / "a"), "--tp", "3"]) == 2
    assert "not divisible by tp=3" in capsys.readouterr().err
    assert convert.main(["hf-to-megatron", hf, str(tmp_path / "a"), "--ep", "3"]) == 2
    assert "ep=3 must divide n_routed_experts=8" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert convert.main(["hf-to-megatron", hf, str(tmp_path / "mine")]) == 2
    assert "not a k2sys Megatron checkpoint" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    if not te_available():
        assert convert.main(["hf-to-megatron", hf, str(tmp_path / "a"), "--spec", "te"]) == 2
        assert "--spec te" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


if __name__ == "__main__":  # torchrun entry: OUT ROOT SCENARIO...
    _worker(sys.argv[1], sys.argv[2], sys.argv[3:])
