"""Prefect tasks (entry points re-exported from cfsp.pipeline.tasks and .tracking)."""
