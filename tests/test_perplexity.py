"""Perplexity batching: large vocabularies get smaller batches, the number does not change."""

import math

import pytest

from cfsp.evaluation import perplexity as ppl_module
from tests.conftest import random_windows, tiny_model


def test_logits_budget_caps_the_batch_and_keeps_the_perplexity(monkeypatch):
    model = tiny_model("llama-gqa")
    windows = random_windows(n=6, seqlen=16)
    whole = ppl_module.perplexity(model, windows, progress=False)
    assert ppl_module.batch_windows(model, 16, 4096) == 256  # 4096 tokens in windows of 16
    # Logits of 128 vocab x 16 positions x 4 bytes = 8 KiB a window: a 20 KiB budget holds two.
    monkeypatch.setattr(ppl_module, "LOGITS_BYTES", 20 * 1024)
    assert ppl_module.batch_windows(model, 16, 4096) == 2
    capped = ppl_module.perplexity(model, windows, progress=False)
    assert capped["tokens_scored"] == whole["tokens_scored"] == 6 * 15
    assert capped["ppl"] == pytest.approx(whole["ppl"], rel=1e-6)
    assert math.isfinite(capped["ppl"]) and capped["ppl"] > 1
    monkeypatch.setattr(ppl_module, "LOGITS_BYTES", 1)  # never fewer than one window
    assert ppl_module.batch_windows(model, 16, 4096) == 1
