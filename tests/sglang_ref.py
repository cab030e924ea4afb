"""SGLang's own code as the reference of the SGLang tests (sglang 0.5.23 installed --no-deps with
the pure-Python packages its modules import: requirements/sglang-cpu.txt, scripts/install.sh).

What SGLang does with a request, step by step, with its own classes and functions:
  route      sglang.srt.entrypoints.http_server.app: path, methods, the io_struct request class
  parse      the JSON body -> that msgspec struct through pydantic, as FastAPI does for
             `Annotated[ReqInput, Body()]` (base64 strings -> bytes; unknown fields are dropped
             silently by sglang, so `unknown_fields` reports them)
  deserialize  each TP rank reads serialized_named_tensors[tp_rank] with MultiprocessingSerializer
  load       flattened_bucket: sglang's WeightUpdater._update_weights_from_flattened_bucket (its
             FlattenedTensorMetadata + FlattenedTensorBucket.reconstruct_tensors) hands the tensors
             to model.load_weights, here a recorder; NCCL: its
             WeightUpdater._receive_bucketed_weights_from_distributed (FlattenedTensorBucket.empty +
             one broadcast) on a gloo group

torchvision: sglang's config modules import torchvision.transforms. The only torchvision wheel
matching torch 2.13 is a CUDA build whose C ops cannot load beside the CPU torch, and a broken
torchvision in site-packages would break transformers for everyone, so install.sh puts it in
<venv>/sglang-cpu-site and only these tests add that directory; they declare the schemas of the two
operators torchvision registers fake kernels for, so its pure-Python part imports. On a GPU node
with sglang's full install nothing of this is needed and nothing is done.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import torch

CPU_SITE = Path(sys.prefix) / "sglang-cpu-site"
_prepared = False
_tv_lib = None


def prepare() -> None:
    """Make sglang's server-side modules importable on this machine (see the module doc)."""
    global _prepared, _tv_lib
    if _prepared:
        return
    try:
        import torchvision  # noqa: F401  (a working install: GPU nodes)
    except Exception:  # noqa: BLE001 - absent, or a CUDA wheel beside the CPU torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        if not CPU_SITE.is_dir():
            raise ImportError(f"sglang's modules import torchvision; run scripts/install.sh (it puts a torchvision "
                              f"for them in {CPU_SITE})")
        sys.path.insert(0, str(CPU_SITE))
        if _tv_lib is None:
            _tv_lib = torch.library.Library("torchvision", "DEF")  # noqa: TOR901 - schemas only, no kernels
            _tv_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _tv_lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401,F811
    _prepared = True


def io_struct() -> types.ModuleType:
    prepare()
    from sglang.srt.managers import io_struct as mod

    return mod


def routes() -> dict[str, tuple[set[str], Any]]:
    """{path: (methods, request class or None)} of sglang's HTTP server."""
    prepare()
    from fastapi.routing import APIRoute
    from sglang.srt.entrypoints.http_server import app

    out = {}
    for r in app.routes:
        if isinstance(r, APIRoute):
            body = r.dependant.body_params
            out[r.path] = (set(r.methods), body[0].field_info.annotation if body else None)
    return out


def request_fields(cls: Any) -> set[str]:
    import dataclasses

    import msgspec

    if dataclasses.is_dataclass(cls):  # GenerateReqInput
        return {f.name for f in dataclasses.fields(cls)}
    return {f.name for f in msgspec.structs.fields(cls)}


def parse(cls: Any, body: dict) -> Any:
    """The request object sglang's route handler receives for this JSON body."""
    from pydantic import TypeAdapter

    return TypeAdapter(cls).validate_python(json.loads(json.dumps(body)))


def unknown_fields(cls: Any, body: dict) -> set[str]:
    return set(body) - request_fields(cls)


class RecordingModel(torch.nn.Module):
    """Stands in for sglang's model on the receiving rank: records what load_weights is given."""

    def __init__(self):
        super().__init__()
        self.loaded: list[tuple[str, torch.Tensor]] = []

    def load_weights(self, weights):
        self.loaded += [(n, t.clone()) for n, t in weights]


def _updater_module():
    prepare()
    from sglang.srt.model_executor.model_runner_components import weight_updater

    return weight_updater


def load_tensor_update(body: dict, tp_rank: int) -> list[tuple[str, torch.Tensor]]:
    """What engine TP rank `tp_rank` loads from one /update_weights_from_tensor body, decoded by
    sglang's request class, serializer and flattened-bucket loader."""
    from sglang.srt.utils import MultiprocessingSerializer

    req = parse(io_struct().UpdateWeightsFromTensorReqInput, body)
    data = MultiprocessingSerializer.deserialize(req.serialized_named_tensors[tp_rank])
    model = RecordingModel()
    if req.load_format == "flattened_bucket":
        wu = _updater_module()
        wu.WeightUpdater._update_weights_from_flattened_bucket(types.SimpleNamespace(get_model=lambda: model),
                                                              flattened_tensor_bucket_dict=data)
    elif req.load_format is None:
        model.load_weights(list(data))
    else:
        raise AssertionError(f"load_format {req.load_format!r}: not what our sinks send")
    return model.loaded


def receive_distributed(body: dict, group: Any, device: str = "cpu") -> list[tuple[str, torch.Tensor]]:
    """What an engine rank receives for one /update_weights_from_distributed body: sglang's own
    receive (FlattenedTensorBucket.empty(names, dtypes, shapes) + one broadcast from rank 0)."""
    req = parse(io_struct().UpdateWeightsFromDistributedReqInput, body)
    wu = _updater_module()
    me = types.SimpleNamespace(_model_update_group={req.group_name: group}, device=device)
    assert req.load_format == "flattened_bucket", req.load_format
    got = wu.WeightUpdater._receive_bucketed_weights_from_distributed(
        me, names=req.names, dtypes=req.dtypes, shapes=req.shapes, group_name=req.group_name)
    return [(n, t.clone()) for n, t in got]
