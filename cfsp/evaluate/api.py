"""Evaluation entry points that load what they need from specs (used by the CLI and tasks)."""

from __future__ import annotations

import logging
import time

from cfsp import __version__
from cfsp.data import evaluation_windows
from cfsp.evaluate.perplexity import perplexity
from cfsp.models import load_model

log = logging.getLogger(__name__)


def evaluate_perplexity(
    model_spec: str,
    sources: list[str],
    seqlen: int,
    limit: int | None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> dict:
    """Load the model once and score each text source; return a JSON-ready result."""
    start = time.perf_counter()
    loaded = load_model(model_spec, dtype=dtype, trust_remote_code=trust_remote_code)
    # Build every window set first: a bad source fails before minutes of scoring.
    windows = {
        s: evaluation_windows(s, loaded.tokenizer, seqlen, limit, loaded.model) for s in sources
    }
    rows = {}
    for source, win in windows.items():
        rows[source] = perplexity(loaded.model, win, desc=f"ppl {source}")
        rows[source]["fingerprint"] = win.fingerprint
        log.info(
            "%s: ppl %.4f over %d windows of %d tokens",
            source,
            rows[source]["ppl"],
            rows[source]["windows"],
            seqlen,
        )
    return {
        "model": model_spec,
        "model_path": loaded.path,
        "revision": loaded.revision,
        "dtype": dtype,
        "seqlen": seqlen,
        "limit": limit,
        "perplexity": rows,
        "cfsp_version": __version__,
        "wall_s": round(time.perf_counter() - start, 3),
    }
