"""Prefect tasks: thin wrappers, one per pipeline stage (see tasks/stages.py)."""
