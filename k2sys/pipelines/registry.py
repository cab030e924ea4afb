"""Dispatch a RunConfig to its pipeline."""

from __future__ import annotations

from k2sys.recipes import RunConfig


def run(cfg: RunConfig):
    if cfg.pipeline == "model-roundtrip":
        from k2sys.pipelines.model_roundtrip import run as go

        return go(cfg)
    raise ValueError(f"pipeline {cfg.pipeline!r} has no runner")
