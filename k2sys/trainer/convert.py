"""Megatron <-> HF checkpoints, offline (`k2sys convert ...`) and in-process.

`hf-to-megatron` writes megatron-core's distributed checkpoint format (dist_checkpointing, torch_dist
backend) of the model weights, which megatron's own `dist_checkpointing.load(sharded_state_dict, DST)`
opens with a GPTModel's `sharded_state_dict()` at any TP/EP layout (megatron reshards on load):

  DST/metadata.json, common.pt, __*.distcp, .metadata   megatron dist checkpoint {"model": GPTModel sharded
                                                         state dict}: weights + the routers' expert_bias;
                                                         no optimizer
  DST/k2sys_megatron.json                                {format: FORMAT_MODEL_DIST, config, tp, ep (the
                                                         layout it was written at), spec: local|te, dtype}
  DST/tokenizer files, remote-code files                 carried from the HF dir (hf_io.copy_checkpoint_extras)

The tp*ep writer ranks each build their rank's GPTModel (MegatronBackend.from_hf reads only that rank's
slices; FP8 block-scaled checkpoints are dequantized exactly) and save its sharded state dict. The ranks
are the processes of a torchrun launch whose WORLD_SIZE is tp*ep, or else tp*ep local processes spawned
here (gloo on CPU, NCCL on GPU). A write is atomic: everything goes to a temp dir beside DST that
replaces DST only after every rank finished; a crash leaves no DST (or the previous one untouched).

Parameter names are the Transformer Engine spec's when the TE spec is in use (`--spec te`, or `auto`
where transformer_engine imports with CUDA; layer norms fused as `...layer_norm_weight`), the local
spec's otherwise; the meta file records which.

`megatron-to-hf` reads, at any written layout, into one process (TP=1/EP=1; megatron reshards):
  model-dist  the format above (either spec; a TE-spec checkpoint is read without transformer_engine)
  dist        a `MegatronBackend.save` directory (model + optimizer; only the model is read)
  per-rank    the old `hf-to-megatron` output (DST/mp_rank_TT[_EEE]/model_optim_rng.pt), read for
              backwards compatibility

Outputs never clobber: an existing non-empty DST is refused unless `--overwrite` (and even then only
when DST is a checkpoint of the kind being written, never an arbitrary directory or a file); DST may
not be SRC, lie inside SRC or contain SRC. The new checkpoint is written to a temp dir beside DST and
renamed over it only when complete.

  k2sys convert hf-to-megatron HF_DIR OUT --tp 2 --ep 2 [--spec auto|local|te] [--overwrite]
  k2sys convert megatron-to-hf MEGATRON_DIR HF_OUT [--format native|bf16|fp8-block128] [--overwrite]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from k2sys.models.config import ConfigError, K2Config
from k2sys.models.hf_io import replace_dir_atomic, write_json_atomic
from k2sys.trainer.formats import FORMAT_DIST, FORMAT_MODEL_DIST, FORMAT_PER_RANK, META
from k2sys.trainer.naming import RULES, megatron_to_hf

SPECS = ("auto", "local", "te")
# The `metadata` GPTModel.sharded_state_dict is built with (megatron's defaults, written out), stored as
# the checkpoint's content metadata so a reader (Megatron-LM included) rebuilds the same sharding.
SHARDED_METADATA = {"singleton_local_shards": False}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class ConvertError(ValueError):
    """A conversion cannot be done as asked; the message names the argument/file and the fix."""


def rank_dir(tp_rank: int, ep_rank: int, ep_size: int) -> str:
    """The old per-rank format's directory of one rank (Megatron-LM's naming)."""
    return f"mp_rank_{tp_rank:02d}" + (f"_{ep_rank:03d}" if ep_size > 1 else "")


# ---- HF -> Megatron dist checkpoint -----------------------------------------------------------------
def resolve_spec(spec: str) -> bool:
    """`--spec` -> use_te. auto = TE where transformer_engine imports with CUDA."""
    from k2sys.trainer.spec import te_available

    if spec not in SPECS:
        raise ConvertError(f"--spec: expected one of {SPECS}, got {spec!r}")
    if spec == "te" and not te_available():
        raise ConvertError("--spec te: the Transformer Engine spec needs transformer_engine and a CUDA device, "
                           "and this machine lacks one; use --spec local (or auto)")
    return spec == "te" or (spec == "auto" and te_available())


def hf_dir_to_megatron(src: str | os.PathLike, dst: str | os.PathLike, tp: int = 1, ep: int = 1,
                       spec: str = "auto", overwrite: bool = False) -> Path:
    """Write HF checkpoint `src` as a megatron dist checkpoint at `dst`, written by a (tp, ep) layout.

    Under torchrun with WORLD_SIZE == tp*ep every rank calls this (each writes its own shards); otherwise
    tp*ep local processes are spawned for the write (or, for tp*ep == 1, this process writes).
    An existing non-empty `dst` is refused unless `overwrite` (see check_output_dir)."""
    src, dst = Path(src), Path(dst)
    for name, v in (("--tp", tp), ("--ep", ep)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConvertError(f"{name}: must be a positive int, got {v!r}")
    check_output_dir(src, dst, overwrite, kind="megatron")
    cfg = _hf_source_config(src)  # config.json and every shard header, before any rank is spawned
    from k2sys.trainer.spec import check_supported  # imports megatron: after the cheap checks

    check_supported(cfg, tp, ep)
    use_te = resolve_spec(spec)
    try:
        import psutil  # noqa: F401
    except ImportError as e:  # without it megatron's writer processes die and the save hangs
        raise ConvertError("hf-to-megatron needs psutil (megatron dist_checkpointing's writer): "
                           "pip install psutil") from e
    world = tp * ep
    job = {"src": str(src), "tp": tp, "ep": ep, "use_te": use_te}

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() == world:
            return _write_in_world(dst, job)
        if "WORLD_SIZE" in os.environ:
            raise ConvertError(f"hf-to-megatron --tp {tp} --ep {ep} needs {world} ranks; this torchrun job has "
                               f"{dist.get_world_size()}. Launch it with --nproc_per_node={world}, or without torchrun")
    elif "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        if int(os.environ["WORLD_SIZE"]) != world:
            raise ConvertError(f"hf-to-megatron --tp {tp} --ep {ep} needs {world} ranks; this torchrun job has "
                               f"WORLD_SIZE={os.environ['WORLD_SIZE']}. Launch it with --nproc_per_node={world}, "
                               "or without torchrun")
        return _write_in_world(dst, job)
    elif world == 1:
        return _write_in_world(dst, job)
    return _write_spawned(dst, job, world)


def _is_megatron_dir(p: Path) -> bool:
    return (p / META).is_file()


def _is_hf_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and (
        (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file())


def _within(a: Path, b: Path) -> bool:
    """a == b or a lies inside b (both resolved)."""
    return a == b or b in a.parents


def check_output_dir(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool, kind: str) -> None:
    """Refuse an output that would clobber data: DST is SRC, inside SRC or contains SRC; DST is an existing
    file; DST is a non-empty directory and `overwrite` is off; or DST is a non-empty directory that is not a
    `kind` checkpoint ("megatron" or "hf"), which --overwrite does not replace either (a mistyped path must
    not delete a home directory). Also checks that DST's parent can be written."""
    src_p, dst_p = Path(src), Path(dst)
    if not src_p.exists():
        raise ConvertError(f"{src_p}: the source checkpoint does not exist")
    if not src_p.is_dir():
        raise ConvertError(f"{src_p}: the source must be a checkpoint directory, not a file")
    s, d = src_p.resolve(), dst_p.resolve()
    if d == s:
        raise ConvertError(f"{dst_p}: the output directory is the input checkpoint; choose another path "
                           "(converting in place would destroy the source weights)")
    if _within(d, s):
        raise ConvertError(f"{dst_p}: the output lies inside the input checkpoint {src_p}; choose a path outside it")
    if _within(s, d):
        raise ConvertError(f"{dst_p}: the output contains the input checkpoint {src_p}; replacing it would delete "
                           "the source. Choose another path")
    label = {"megatron": "k2sys Megatron checkpoint", "hf": "HF checkpoint directory"}[kind]
    article = "an" if kind == "hf" else "a"
    if dst_p.exists() or dst_p.is_symlink():
        if not dst_p.is_dir() or dst_p.is_symlink():
            raise ConvertError(f"{dst_p}: exists and is not a directory; refusing to replace it. Remove it or "
                               "choose another output path")
        entries = sorted(x.name for x in dst_p.iterdir())
        if entries:
            is_kind = _is_megatron_dir(dst_p) if kind == "megatron" else _is_hf_dir(dst_p)
            if not is_kind:
                shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
                raise ConvertError(f"{dst_p}: exists and is not {article} {label} ({len(entries)} entries: {shown}); "
                                   "refusing to replace it, even with --overwrite. Remove it or choose another "
                                   "output path")
            if not overwrite:
                raise ConvertError(f"{dst_p}: exists and is not empty ({article} {label}); pass --overwrite to "
                                   "replace it (the new checkpoint is written beside it and swapped in when "
                                   "complete), or choose another output path")
    parent = d.parent
    while not parent.exists() and parent.parent != parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConvertError(f"{dst_p}: {parent} is a file, so the output directory cannot be created there")
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".k2sys-write-probe-"))
    except OSError as e:
        raise ConvertError(f"{dst_p}: cannot write in {parent} ({e.strerror}); choose a writable output path") from None


def _hf_source_config(src: Path) -> K2Config:
    """The config of HF checkpoint `src`, after checking config.json and every safetensors header against
    the file sizes (no tensor is read): a truncated or corrupt source is an error naming the file here,
    not a traceback in a writer rank."""
    from k2sys.models.checkpoint import HFCheckpoint

    try:
        ckpt = HFCheckpoint(src)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{src}: a JSON file (config.json or model.safetensors.index.json) is not valid JSON "
                           f"({e}); the checkpoint is truncated or corrupt") from None
    except (UnicodeDecodeError, OSError) as e:
        raise ConvertError(f"{src}: cannot read the checkpoint: {e}") from None
    try:
        return ckpt.config
    finally:
        ckpt.close()


def _make_tmp(dst: Path) -> Path:
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
    except OSError as e:
        raise ConvertError(f"{dst}: cannot create the output beside it ({e}); choose a writable output path") from None
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the checkpoint unreadable to the rest of a cluster group
    return tmp


def _write_in_world(dst: Path, job: dict[str, Any]) -> Path:
    """Every rank of the current world (tp*ep ranks): write into a temp dir, rank 0 renames it to dst."""
    import torch.distributed as dist

    from k2sys.trainer.parallel import init_distributed

    rank, _ = init_distributed()
    box = [str(_make_tmp(dst)) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    tmp = Path(box[0])
    try:
        write_model_shards(tmp=tmp, **job)  # ends with a barrier: every rank's shards are on disk
        if rank == 0:
            replace_dir_atomic(tmp, dst)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return dst


def _write_spawned(dst: Path, job: dict[str, Any], world: int) -> Path:
    """Spawn `world` local writer ranks; rename their temp dir to dst when all succeeded."""
    import torch.multiprocessing as mp

    from k2sys.trainer.parallel import _free_port

    if torch.cuda.is_available() and torch.cuda.device_count() < world:
        raise ConvertError(f"hf-to-megatron --tp {job['tp']} --ep {job['ep']}: {world} writer ranks need {world} "
                           f"GPUs here, found {torch.cuda.device_count()}. Run it under torchrun across nodes, or "
                           "on CPU with CUDA_VISIBLE_DEVICES= (local spec)")
    tmp = _make_tmp(dst)
    try:
        mp.start_processes(_spawned_rank, args=(world, _free_port(), {**job, "tmp": str(tmp)}), nprocs=world,
                           join=True, start_method="spawn")
        replace_dir_atomic(tmp, dst)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        # The rank's last line is its error; its traceback goes to the log only (--debug shows it too).
        import logging

        logging.getLogger("k2sys.convert").debug("writer rank %s failed:\n%s", e.error_index, e)
        raise ConvertError(f"hf-to-megatron: writer rank {e.error_index} of {world} failed, nothing was written to "
                           f"{dst}: {lines[-1] if lines else type(e).__name__}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _spawned_rank(rank: int, world: int, port: int, job: dict[str, Any]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    # When another rank fails, the parent terminates this one: exit through Python so that exit handlers
    # stop megatron's checkpoint-writer Manager process (a plain SIGTERM death leaves it running).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    from k2sys.trainer.parallel import shutdown

    try:
        write_model_shards(**job)
    finally:
        shutdown()


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _writer_backend(src: Path, tp: int, ep: int, use_te: bool):
    from k2sys.trainer.backend import MegatronBackend, TrainerConfig
    from k2sys.trainer.parallel import ParallelConfig

    train = TrainerConfig(moe_kernels="megatron")  # megatron's expert modules: the names megatron loads
    return MegatronBackend.from_hf(src, ParallelConfig(tp=tp, ep=ep), train, use_te=use_te)


def write_model_shards(src: str, tmp: str, tp: int, ep: int, use_te: bool) -> None:
    """One writer rank (of tp*ep): build this rank's model from HF `src`, save its sharded state dict into
    the (existing, empty) dir `tmp`; rank 0 adds the meta file and the checkpoint's extra files."""
    import torch.distributed as dist

    from k2sys.trainer.cpu_compat import ensure_cpu_shims

    ensure_cpu_shims()  # before megatron is imported
    from megatron.core import dist_checkpointing

    src_p, tmp_p = Path(src), Path(tmp)
    backend = _writer_backend(src_p, tp, ep, use_te)
    gpt = backend.model.module
    sharded = {"model": gpt.sharded_state_dict(metadata=dict(SHARDED_METADATA))}
    dist_checkpointing.save(sharded, str(tmp_p), content_metadata=dict(SHARDED_METADATA))
    if dist.get_rank() == 0:
        from k2sys.models.hf_io import copy_checkpoint_extras

        cfg = dataclasses.replace(backend.config, quantization_config=None,  # the weights are dequantized
                                  torch_dtype=_DTYPE_NAMES[backend.dtype])
        hf_config = copy_checkpoint_extras(src_p, tmp_p, cfg.to_hf_dict())
        write_json_atomic(tmp_p / META, {"format": FORMAT_MODEL_DIST, "config": hf_config, "tp": tp, "ep": ep,
                                         "spec": "te" if backend.use_te else "local",
                                         "dtype": _DTYPE_NAMES[backend.dtype]})
    dist.barrier()


# ---- Megatron -> HF -----------------------------------------------------------------------------------
def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    meta = Path(path) / META
    if not meta.exists():
        raise FileNotFoundError(f"{path}: no {META}; not a k2sys Megatron checkpoint (write one with "
                                "`k2sys convert hf-to-megatron` or MegatronBackend.save)")
    try:
        out = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{meta}: not valid JSON ({e}); the checkpoint is truncated or corrupt") from None
    if not isinstance(out, dict) or not isinstance(out.get("config"), dict):
        raise ConvertError(f"{meta}: expected an object with 'format' and 'config'; the checkpoint is corrupt")
    return out


def load_per_rank(path: str | os.PathLike) -> tuple[K2Config, int, int, dict[tuple[int, int], dict[str, torch.Tensor]]]:
    """(config, tp, ep, {(tp_rank, ep_rank): local state}) of an old per-rank checkpoint."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("format") != FORMAT_PER_RANK:
        raise ConvertError(f"{path}: format {meta.get('format')!r} is not {FORMAT_PER_RANK!r}")
    cfg = K2Config.from_hf_dict(meta["config"])
    tp, ep = int(meta["tp"]), int(meta["ep"])
    shards = {}
    for t in range(tp):
        for e in range(ep):
            f = path / rank_dir(t, e, ep) / "model_optim_rng.pt"
            if not f.exists():
                raise FileNotFoundError(f"{path}: missing {f.relative_to(path)} for tp_rank={t} ep_rank={e}")
            shards[(t, e)] = torch.load(f, map_location="cpu", weights_only=True)["model"]
    return cfg, tp, ep, shards


def te_storage_keys(cfg: K2Config) -> dict[str, str]:
    """Local-spec storage key -> TE-spec storage key, for the names that differ (naming.RULES `te=`).

    Layer keys carry the layer index (megatron keeps per-layer keys when MoE and dense layers mix);
    a homogeneous stack (all dense) stores one key per name with a layer axis, `decoder.layers.<name>`."""
    out: dict[str, str] = {}
    L, first = cfg.num_hidden_layers, cfg.first_k_dense_replace
    moe = bool(cfg.n_routed_experts)
    for i in range(L):
        for scope in ("attention", "moe" if moe and i >= first else "dense_mlp"):
            _, mg_pre, rules = RULES[scope]
            for rule in rules:
                if rule.te is not None:
                    out[mg_pre.format(i=i) + rule.mg] = mg_pre.format(i=i) + rule.te[0]
    if not moe or first >= L:
        for scope in ("attention", "dense_mlp"):
            for rule in RULES[scope][2]:
                if rule.te is not None:
                    out["decoder.layers." + rule.mg] = "decoder.layers." + rule.te[0]
    return out


def _stored_layout(src: Path) -> tuple[str, torch.dtype]:
    """(spec, params dtype) of a dist checkpoint, from its tensor metadata (no tensor is read)."""
    from k2sys.trainer.cpu_compat import ensure_cpu_shims

    ensure_cpu_shims()  # before megatron is imported
    from megatron.core import dist_checkpointing

    tensors = dist_checkpointing.load_tensors_metadata(str(src))
    emb = tensors.get("embedding.word_embeddings.weight")
    if emb is None:
        raise ConvertError(f"{src}: the dist checkpoint has no embedding.word_embeddings.weight; not a GPTModel "
                           "checkpoint (or one with pipeline stages, which is not supported)")
    spec = "te" if any(k.endswith(".layer_norm_weight") for k in tensors) else "local"
    return spec, emb.dtype


def read_dist_model(src: str | os.PathLike) -> tuple[K2Config, dict[str, torch.Tensor]]:
    """(config, full HF state dict) of a dist checkpoint (hf-to-megatron or MegatronBackend.save), read
    by a TP=1/EP=1 model in this process: dist_checkpointing reshards from whatever layout wrote it.

    Every rank of the current world (if any) reads the whole model."""
    from k2sys.trainer.parallel import ParallelConfig, init_parallel
    from k2sys.trainer.spec import build_gpt_model, transformer_config

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    src = Path(src)
    meta = read_meta(src)
    if meta.get("format") not in (FORMAT_MODEL_DIST, FORMAT_DIST):
        raise ConvertError(f"{src}: format {meta.get('format')!r} is not a dist checkpoint "
                           f"({FORMAT_MODEL_DIST!r} or {FORMAT_DIST!r})")
    if not dist_checkpointing.check_is_distributed_checkpoint(str(src)):
        raise ConvertError(f"{src}: {META} says {meta['format']} but metadata.json is missing or invalid; "
                           "the checkpoint is incomplete")
    cfg = K2Config.from_hf_dict(meta["config"])
    spec, dtype = _stored_layout(src)
    if meta.get("spec", spec) != spec:
        raise ConvertError(f"{src}: {META} says spec {meta['spec']!r} but the stored names are the {spec!r} spec's")
    if dtype not in _DTYPE_NAMES:
        raise ConvertError(f"{src}: parameters are {dtype}; k2sys reads float32, bfloat16 or float16")
    init_parallel(ParallelConfig())
    # The local spec reads either spec's checkpoint: the TE spec differs only in the names of the fused
    # layer norms (same shapes, replicated), renamed here; TE's _extra_state objects are not needed.
    gpt = build_gpt_model(cfg, transformer_config(cfg, 1, 1, _DTYPE_NAMES[dtype]), use_te=False)
    content = dist_checkpointing.load_content_metadata(str(src))
    sharded = gpt.sharded_state_dict(metadata=dict(content) if content else None)
    sharded = {k: v for k, v in sharded.items() if not isinstance(v, ShardedObject)}
    if spec == "te":
        renames = te_storage_keys(cfg)
        for v in sharded.values():
            if getattr(v, "key", None) in renames:
                v.key = renames[v.key]
    state = dist_checkpointing.load({"model": sharded}, str(src))["model"]
    local = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    del gpt, sharded
    return cfg, megatron_to_hf({(0, 0): local}, cfg, 1, 1)


def write_hf(state: Mapping[str, torch.Tensor], cfg: K2Config, dst: str | os.PathLike,
             extras_from: str | os.PathLike | None = None, format: str = "native") -> Path:
    """An HF checkpoint directory from a full HF state dict, atomically (hf_io.write_hf_dir): config.json
    (auto_map only with its files), safetensors, the tokenizer/remote-code files of `extras_from`."""
    from k2sys.models.hf_io import write_hf_dir

    return write_hf_dir(dict(state), cfg, dst, format=format, extras_from=extras_from)


def megatron_dir_to_hf(src: str | os.PathLike, dst: str | os.PathLike, format: str = "native",
                       overwrite: bool = False) -> Path:
    """Convert a Megatron checkpoint directory (model-dist, dist or old per-rank) to an HF directory.

    Under a multi-rank world every rank reads; rank 0 writes. An existing non-empty `dst` is refused
    unless `overwrite` (see check_output_dir); the HF directory is written beside it and renamed."""
    src = Path(src)
    check_output_dir(src, dst, overwrite, kind="hf")
    meta = read_meta(src)
    fmt = meta.get("format")
    if fmt not in (FORMAT_PER_RANK, FORMAT_MODEL_DIST, FORMAT_DIST):
        raise ConvertError(f"{src}: unknown checkpoint format {fmt!r} in {META}; expected one of "
                           f"{[FORMAT_MODEL_DIST, FORMAT_DIST, FORMAT_PER_RANK]}")
    from k2sys.models.checkpoint import CheckpointError

    try:
        if fmt == FORMAT_PER_RANK:
            cfg, tp, ep, shards = load_per_rank(src)
            state = megatron_to_hf(shards, cfg, tp, ep)
        else:
            cfg, state = read_dist_model(src)
    except (ConvertError, ConfigError, CheckpointError, FileNotFoundError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - damaged files fail in torch/megatron readers with anything,
        # torch.distributed.checkpoint's CheckpointException (a BaseException) included
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConvertError(f"{src}: cannot read the {fmt} checkpoint ({type(e).__name__}: {first}); a file in it "
                           "is truncated or corrupt. Rewrite the checkpoint (rerun with --debug for the "
                           "traceback)") from e
    import torch.distributed as dist

    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not multi or dist.get_rank() == 0:
        write_hf(state, cfg, dst, extras_from=src, format=format)
    if multi:
        dist.barrier()
    return Path(dst)


# ---- CLI ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from k2sys.models.hf_io import EXPORT_FORMATS

    p = argparse.ArgumentParser(prog="k2sys convert", description="Megatron <-> HF DeepseekV3 / Kimi-K2 checkpoints")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-megatron", help="HF dir -> megatron dist checkpoint (loadable at any TP/EP)",
                       description="Write an HF checkpoint (bf16/fp32, or FP8 block-128 as released: dequantized "
                                   "exactly) as a megatron-core dist checkpoint (torch_dist) of the model weights. "
                                   "--tp/--ep: the layout of the tp*ep writer ranks (spawned here, or the ranks "
                                   "of a torchrun launch with WORLD_SIZE=tp*ep); megatron reshards on load.")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--ep", type=int, default=1)
    a.add_argument("--spec", choices=SPECS, default="auto",
                   help="parameter names: te (Transformer Engine spec), local, or auto (te where "
                        "transformer_engine imports with CUDA)")
    a.add_argument("--overwrite", action="store_true",
                   help="replace an existing Megatron checkpoint at DST (written beside it, swapped in when complete)")
    b = sub.add_parser("megatron-to-hf", help="Megatron checkpoint (model-dist, dist or per-rank) -> HF dir")
    b.add_argument("src")
    b.add_argument("dst")
    b.add_argument("--format", choices=EXPORT_FORMATS, default="native",
                   help="HF weights: native (as stored), bf16, or fp8-block128 (the release format)")
    b.add_argument("--overwrite", action="store_true",
                   help="replace an existing HF checkpoint at DST (written beside it, swapped in when complete)")
    args = p.parse_args(argv)
    from k2sys.models.checkpoint import CheckpointError

    try:
        if args.cmd == "hf-to-megatron":
            out = hf_dir_to_megatron(args.src, args.dst, args.tp, args.ep, args.spec, overwrite=args.overwrite)
        else:
            out = megatron_dir_to_hf(args.src, args.dst, args.format, overwrite=args.overwrite)
    except (ConvertError, ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"k2sys convert: error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
