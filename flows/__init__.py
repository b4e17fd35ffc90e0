"""Prefect flows (entry points): `compress`/`sweep` re-exported from cfsp.pipeline.flows, and
`benchmark` (the benchmark suite, a checkout-only flow)."""
