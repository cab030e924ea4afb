"""Checkpoint engine: plan buckets and reshards, stage, broadcast, apply, commit.

One role per module: types (value types), layout (local<->global tensor maps), plan (reshard
copies), bucket (packing), apply (native row tables), transport (broadcast + checksums +
agreement), receiver (targets), pipeline (the overlapped update), startup (checkpoint load).
"""

from k2sys.ckpt.bucket import plan_buckets
from k2sys.ckpt.layout import (Layout, LayoutBuilder, engine_layout, engine_tp_layout, hf_layout, hf_param_shapes,
                              split_range)
from k2sys.ckpt.pipeline import TrainerShards, UpdateReport, WeightUpdater, update_weights
from k2sys.ckpt.plan import ReshardPlan, plan_reshard, validate_plan
from k2sys.ckpt.receiver import EngineReceiver, InProcessReceiver, StagedReceiver, WeightReceiver
from k2sys.ckpt.startup import load_checkpoint
from k2sys.ckpt.types import (Box, Bucket, BucketEntry, CopyOp, FaultInjection, Piece, PlanError, TensorSpec,
                              UpdateConfig, UpdateError)

__all__ = [
    "Box", "Bucket", "BucketEntry", "CopyOp", "EngineReceiver", "FaultInjection", "InProcessReceiver", "Layout",
    "LayoutBuilder", "Piece", "PlanError", "ReshardPlan", "StagedReceiver", "TensorSpec", "TrainerShards",
    "UpdateConfig", "UpdateError", "UpdateReport", "WeightReceiver", "WeightUpdater", "engine_layout", "engine_tp_layout",
    "hf_layout", "hf_param_shapes", "load_checkpoint", "plan_buckets", "plan_reshard", "split_range",
    "update_weights", "validate_plan",
]
