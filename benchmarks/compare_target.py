"""benchmarks/compare.py with two extra variant suffixes for stats=target's ablations
(cfsp.engine.dense_target): `+norefit`, no refit of modules that lost no input
(REFIT_UNPRUNED = False); `+weighted`, tokens weighted by 1 / mean square of their dense target
(TOKEN_WEIGHTED = True). Same arguments as compare.py.

  python -m benchmarks.compare_target --variants cfsp+stats=target cfsp+stats=target+norefit ...
"""

from __future__ import annotations

from benchmarks import compare
from cfsp.engine import dense_target

_plain_config = compare.variant_config


def _variant_config(text: str, budget: float):
    """compare.variant_config, after setting REFIT_UNPRUNED from a `+norefit` suffix and
    TOKEN_WEIGHTED from a `+weighted` one (the prune that follows this call is the variant's)."""
    dense_target.REFIT_UNPRUNED = "+norefit" not in text
    dense_target.TOKEN_WEIGHTED = "+weighted" in text
    return _plain_config(text.replace("+norefit", "").replace("+weighted", ""), budget)


if __name__ == "__main__":
    compare.variant_config = _variant_config
    compare.main()
