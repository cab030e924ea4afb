"""One config per component (issue 17): the RL job nests the engine's EngineConfig and the trainer's
TrainerConfig; `k2sys serve --config JSON` reads the same EngineConfig its flags set (flags override
the file); the launcher hands the job's engine config over as that JSON."""

import dataclasses
import json

import pytest
import torch

from k2sys.config import ConfigError, apply_overrides, from_dict, to_dict
from k2sys.coordinator.engine_handle import EngineHandle
from k2sys.coordinator.sections import EngineSection, TrainerSection
from k2sys.engine.api import server
from k2sys.engine.core.config import EngineConfig
from k2sys.engine.launch import NativeLaunchConfig
from k2sys.recipes import RLRunConfig, get_recipe
from k2sys.trainer.config import OptimConfig, TrainerConfig


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "ckpt"  # the parser only checks it is a checkpoint directory; nothing is loaded
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def _serve(argv):
    return server.server_config(server._parser().parse_args(argv))


def test_serve_config_file_builds_the_flags_engine_config(model_dir, tmp_path):
    flags = ["--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096", "--max-num-batched-tokens", "256",
             "--max-running-requests", "7", "--block-size", "32", "--max-model-len", "300", "--served-model-name", "m",
             "--disable-radix-cache", "--moe-kernels", "torch", "--quantization", "fp8", "--max-body-bytes", "999",
             "--max-json-depth", "9", "--weight-update-timeout", "0", "--api-key", "k"]
    by_flags = _serve(["--model", str(model_dir), *flags])
    want = EngineConfig(dtype="float32", device="cpu", max_total_tokens=4096, max_num_batched_tokens=256,
                        max_running_requests=7, block_size=32, max_model_len=300, served_model_name="m",
                        enable_prefix_caching=False, moe_kernels="torch", quantization="fp8")
    assert by_flags[0] == want
    assert (by_flags[1].max_body_bytes, by_flags[1].max_json_depth, by_flags[1].weight_update_timeout_s,
            by_flags[1].api_key) == (999, 9, None, "k")
    doc = {"engine": {k: v for k, v in dataclasses.asdict(want).items()},
           "server": {"max_body_bytes": 999, "max_json_depth": 9, "weight_update_timeout_s": None, "api_key": "k"}}
    path = tmp_path / "serve.json"
    path.write_text(json.dumps(doc))
    assert _serve(["--model", str(model_dir), "--config", str(path)]) == by_flags
    assert _serve(["--model", str(model_dir), "--config", json.dumps(doc)]) == by_flags  # inline JSON
    # a flag overrides its field of the file and leaves the others; absent flags do not reset the file
    cfg, opts = _serve(["--model", str(model_dir), "--config", str(path), "--block-size", "64", "--max-json-depth", "5"])
    assert cfg == dataclasses.replace(want, block_size=64) and opts.max_json_depth == 5 and opts.max_body_bytes == 999
    # no file, no flags: EngineConfig's own defaults (the flags' documented defaults)
    assert _serve(["--model", str(model_dir)])[0] == EngineConfig()
    assert _serve(["--model", str(model_dir), "--device", "auto"])[0].device == \
        ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("doc,match", [
    ({"engine": {"max_runing_requests": 4}}, r"engine\.max_runing_requests: unknown field.*max_running_requests"),
    ({"engine": {"block_size": "16"}}, r"engine\.block_size: expected an int"),
    ({"engine": {"moe_kernels": "cuda"}}, r"engine\.moe_kernels: 'cuda' is not allowed; choose one of"),
    ({"engine": {"max_running_requests": 0}}, r"max_running_requests: must be >= 1"),
    ({"server": {"max_body_size": 1}}, r"server\.max_body_size: unknown field.*max_body_bytes"),
    ({"engin": {}}, r"unknown keys \['engin'\]"),
    ([1], r"expected \{\"engine\""),
])
def test_serve_config_bad_field_is_an_error_naming_it(model_dir, doc, match, capsys):
    with pytest.raises(ValueError, match=match):
        _serve(["--model", str(model_dir), "--config", json.dumps(doc)])
    with pytest.raises(SystemExit) as e:  # `k2sys serve` says so on one usage line, before loading the model
        server.main(["--model", str(model_dir), "--config", json.dumps(doc)])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_serve_config_missing_file(model_dir, tmp_path):
    with pytest.raises(ValueError, match="cannot read it"):
        _serve(["--model", str(model_dir), "--config", str(tmp_path / "nope.json")])


def test_set_engine_field_reaches_the_launched_server(model_dir, tmp_path):
    cfg = apply_overrides(get_recipe("tiny-k2"), ["engine.max_total_tokens=4096", "engine.block_size=32",
                                                  "engine.max_running_requests=7", "engine.enable_prefix_caching=false",
                                                  "engine.cpu_threads=2"])
    launch = EngineHandle(cfg.engine, tmp_path).launch_config(model_dir, torch.bfloat16)
    assert isinstance(launch, NativeLaunchConfig)
    cmd = launch.command()
    assert cmd[1:4] == ["-m", "k2sys.cli", "serve"] and cmd.count("--config") == 1
    got, _ = _serve(cmd[4:])  # what the launched server builds from its argv
    device = "cuda" if torch.cuda.is_available() else "cpu"  # engine.device=auto, decided by the launcher
    assert got == EngineConfig(dtype="bfloat16", device=device, max_total_tokens=4096, block_size=32,
                               max_running_requests=7, enable_prefix_caching=False, cpu_threads=2)


def test_job_engine_and_trainer_are_the_component_configs():
    cfg = get_recipe("tiny-k2")
    assert isinstance(cfg.engine, EngineConfig) and isinstance(cfg.trainer, TrainerConfig)
    # every EngineConfig / TrainerConfig field is a `--set` key, checked by the component's own rules
    names = {f.name for f in dataclasses.fields(EngineConfig)} | {"kind", "restarts", "update_bucket_mb"}
    assert names <= {f.name for f in dataclasses.fields(EngineSection)}
    for override, match in (("engine.max_running_requests=0", r"^engine\.max_running_requests: must be >= 1"),
                            ("engine.block_size=24", r"^engine\.block_size: must be a positive power of two"),
                            ("engine.device=tpu", r"^engine\.device: use cpu, cuda, cuda:N or auto"),
                            ("engine.dtype=float32", r"^engine\.dtype=float32: .*set trainer\.dtype instead"),
                            ("trainer.micro_batch_size=0", r"^trainer\.micro_batch_size: must be >= 1"),
                            ("trainer.optim.lr=0.5", r"^trainer\.optim\.lr: set per stage by sft\.lr and rl\.lr"),
                            ("trainer.optim.name=muon", r"^trainer\.optim\.name: set per stage"),
                            ("trainer.tp=0", r"^trainer\.tp: must be >= 1")):
        with pytest.raises(ConfigError, match=match):
            apply_overrides(cfg, [override])


def test_trainer_config_built_once_per_stage():
    cfg = apply_overrides(get_recipe("tiny-k2"), ["trainer.optim.clip_grad=0.25", "trainer.micro_batch_size=4",
                                                  "trainer.moe_kernels=megatron", "trainer.tp=2"])
    t = cfg.trainer.build("muon", 0.02)
    assert type(t) is TrainerConfig  # a plain TrainerConfig: its checkpoint metadata reloads as one
    assert t.optim == OptimConfig(name="muon", lr=0.02, clip_grad=0.25)
    assert (t.micro_batch_size, t.moe_kernels) == (4, "megatron")
    assert t.dtype == (None if torch.cuda.is_available() else "float32")  # trainer.dtype=auto
    assert cfg.trainer.parallel().tp == 2
    assert TrainerSection().dtype is None and cfg.trainer.dtype == "auto"  # the job composes its default


def test_old_saved_config_still_loads_and_compares():
    """A runs/<name>/config.json written before the sections became the component configs (fewer keys)."""
    cfg = get_recipe("tiny-k2")
    saved = to_dict(cfg)
    saved["engine"] = {k: saved["engine"][k] for k in (
        "kind", "port", "max_running_requests", "restarts", "startup_timeout_s", "device", "moe_kernels",
        "quantization", "tp", "ep", "dp", "mem_fraction_static", "memory_saver", "weight_sync", "sync_port",
        "update_bucket_mb", "sglang_module")}
    saved["trainer"] = {"tp": 1, "ep": 1, "dtype": "auto", "moe_kernels": "auto"}
    assert to_dict(from_dict(RLRunConfig, json.loads(json.dumps(saved)))) == to_dict(cfg)


def test_set_engine_field_reaches_a_running_server(tmp_path):
    """The same through a real `k2sys serve` process started by the coordinator's engine handle."""
    from k2sys.models import build_model, k2_tiny, save_hf

    ckpt = save_hf(build_model(k2_tiny(vocab_size=256), seed=0), tmp_path / "tiny")
    cfg = apply_overrides(get_recipe("tiny-k2"), ["engine.device=cpu", "engine.max_total_tokens=2048",
                                                  "engine.block_size=32", "engine.max_running_requests=5",
                                                  "engine.enable_prefix_caching=false", "engine.served_model_name=probe"])
    handle = EngineHandle(cfg.engine, tmp_path / "run")
    try:
        client = handle.start(ckpt, None, torch.float32)
        info = client.server_info()
    finally:
        handle.stop()
    assert (info["max_total_num_tokens"], info["page_size"], info["max_running_requests"],
            info["disable_radix_cache"], info["served_model_name"], info["dtype"], info["device"]) == \
        (2048, 32, 5, True, "probe", "torch.float32", "cpu")
