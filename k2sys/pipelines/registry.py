"""Dispatch a RunConfig to its pipeline."""

from __future__ import annotations

import json

from k2sys.recipes import RunConfig


def run(cfg):
    if cfg.pipeline == "model-roundtrip":
        from k2sys.pipelines.model_roundtrip import run as go

        return go(cfg)
    if cfg.pipeline == "sft-rl":
        from k2sys import console
        from k2sys.coordinator.driver import RecipeRunner

        console.setup(console.verbose_requested())  # a no-op after the CLI's own setup
        report = RecipeRunner(cfg).run()
        print(json.dumps(report, indent=2))
        return report
    raise ValueError(f"pipeline {cfg.pipeline!r} has no runner")
