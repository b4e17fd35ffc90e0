"""cfsp: coarse-to-fine structured pruning of causal language models, retraining-free."""

__version__ = "0.1.0"
