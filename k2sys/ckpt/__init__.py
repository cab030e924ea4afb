"""Checkpoint engine: plan buckets and reshards, stage, broadcast, apply, commit.

One role per module: types (value types), layout (local<->global tensor maps), plan (reshard
copies), bucket (planning + the one filled-bucket type), apply (native row tables), transport
(broadcast + checksums + agreement), sink (the engine side: protocol, dict and forwarding
sinks), engine_sinks (native engine in-process / across processes, SGLang colocated / NCCL),
pipeline (update_weights, the one entry), startup (checkpoint load), peer (replica restart).
"""

from k2sys.ckpt.bucket import FlattenedBucket, plan_buckets
from k2sys.ckpt.layout import (Layout, LayoutBuilder, engine_layout, engine_tp_layout, hf_layout, hf_param_shapes,
                              split_range)
from k2sys.ckpt.pipeline import TrainerShards, UpdateReport, WeightUpdater, as_sink, update_weights
from k2sys.ckpt.plan import ReshardPlan, plan_reshard, validate_plan
from k2sys.ckpt.sink import BucketSink, NullSink, TensorSink, WeightSink
from k2sys.ckpt.startup import load_checkpoint
from k2sys.ckpt.types import (Box, Bucket, BucketEntry, CopyOp, FaultInjection, Piece, PlanError, TensorSpec,
                              UpdateConfig, UpdateError)

__all__ = [
    "Box", "Bucket", "BucketEntry", "BucketSink", "CopyOp", "FaultInjection", "FlattenedBucket", "Layout",
    "LayoutBuilder", "NullSink", "Piece", "PlanError", "ReshardPlan", "TensorSink", "TensorSpec", "TrainerShards",
    "UpdateConfig", "UpdateError", "UpdateReport", "WeightSink", "WeightUpdater", "as_sink", "engine_layout",
    "engine_tp_layout", "hf_layout", "hf_param_shapes", "load_checkpoint", "plan_buckets", "plan_reshard",
    "split_range", "update_weights", "validate_plan",
]
