"""Prefect flows: `compress` (one model x budget x method) and `sweep` (the grid)."""
