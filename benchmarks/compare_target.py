"""benchmarks/compare.py with one extra variant suffix, `+norefit`: stats=target without
refitting modules that lost no input (cfsp.engine.dense_target.REFIT_UNPRUNED = False), the
ablation behind that constant's default. Same arguments as compare.py.

  python -m benchmarks.compare_target --variants cfsp+stats=target cfsp+stats=target+norefit ...
"""

from __future__ import annotations

from benchmarks import compare
from cfsp.engine import dense_target

_plain_config = compare.variant_config


def _variant_config(text: str, budget: float):
    """compare.variant_config, after setting REFIT_UNPRUNED from the `+norefit` suffix (the
    prune that follows this call is the variant's)."""
    dense_target.REFIT_UNPRUNED = not text.endswith("+norefit")
    return _plain_config(text.removesuffix("+norefit"), budget)


if __name__ == "__main__":
    compare.variant_config = _variant_config
    compare.main()
