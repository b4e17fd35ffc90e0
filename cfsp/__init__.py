"""cfsp: coarse-to-fine structured pruning of causal language models, retraining-free.

Python API (the CLI runs the same code):

    import cfsp

    model, tokenizer, report = cfsp.prune("smollm2-135m", budget=0.3, calibration="c4")
    cfsp.save_pruned(model, tokenizer, "out/pruned", report)
    model = cfsp.load_pruned("out/pruned")
    result = cfsp.evaluate(model, tokenizer, perplexity=["botchan:test"])

prune        spec or loaded model (+ tokenizer), calibration spec / list of str / Dataset,
             budget, method preset and any PruneConfig option -> Pruned(model, tokenizer, report)
save_pruned  a cfsp checkpoint directory (safetensors, per-block widths, manifest)
load_pruned  any cfsp checkpoint, or the save_pretrained output of a pruned model
evaluate     perplexity / zero-shot / speed of a spec or loaded model -> dict
PruneConfig  every pruning parameter, validated; CRITERIA, ALLOCATIONS, RECONSTRUCTIONS and
             PRESETS name what a config may choose.

Names are imported on first use, so `import cfsp` (and `cfsp --help`) stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_EXPORTS = {
    "prune": "cfsp.python_api",
    "save_pruned": "cfsp.python_api",
    "evaluate": "cfsp.python_api",
    "Pruned": "cfsp.python_api",
    "load_pruned": "cfsp.export",
    "PruneConfig": "cfsp.config",
    "CRITERIA": "cfsp.engine.registry",
    "ALLOCATIONS": "cfsp.engine.registry",
    "RECONSTRUCTIONS": "cfsp.engine.registry",
    "PRESETS": "cfsp.engine.registry",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cfsp' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
