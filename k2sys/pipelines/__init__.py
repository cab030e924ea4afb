"""Pipelines that `k2sys run` executes, one per RunConfig.pipeline value."""
