"""Speed and memory measurement: the analytic MAC count, and dense-vs-pruned ratios."""

import copy

import pytest
import torch

from cfsp.config import PruneConfig, SpeedConfig
from cfsp.engine.capture import capture
from cfsp.engine.driver import prune_model
from cfsp.evaluation.speed import compare, macs_per_token, measure, peak_memory_mib
from tests.conftest import random_windows, tiny_model

FAST = SpeedConfig(
    enabled=True, batch=2, seqlen=16, decode_tokens=2, warmup=0, repeats=1, dtypes=["float32"]
)


def test_macs_per_token_by_hand():
    model = tiny_model("llama-gqa")  # hidden 48, 6 query heads and 2 kv heads of 8, FFN 96
    per_block = 48 * 48 + 2 * (48 * 16) + 48 * 48 + 3 * (48 * 96)
    lm_head = 48 * 128
    context = 16
    attention = 2 * 48 * (context + 1) // 2
    assert macs_per_token(model, context) == 2 * (per_block + attention) + lm_head


def test_macs_per_token_follow_each_blocks_widths(tiny):
    """Per-block widths, fused projections included: the count is the formula per block, and
    the pruned model (copied, prefilled and decoded with a cache by `measure`) runs."""
    from cfsp.arch import adapter_for

    cfg = PruneConfig(budget=0.4, temperature=0.2, structures="ffn+heads")
    prune_model(tiny, capture(tiny, random_windows(), progress=False), cfg)
    adapter, d, context = adapter_for(tiny), tiny.config.hidden_size, 16
    hd = adapter.head_dim(tiny.config)
    expected = d * tiny.config.vocab_size  # lm_head
    for w in adapter.block_widths(tiny):
        q, kv = w.num_heads * hd, w.num_kv_heads * hd
        expected += d * (2 * q + 2 * kv) + 3 * d * w.intermediate + 2 * q * (context + 1) // 2
    assert macs_per_token(tiny, context) == expected
    figures = measure({"pruned": tiny}, FAST)["float32"]["pruned"]
    assert figures["macs_per_token"] == expected


def _pruned(model, budget=0.5):
    pruned = copy.deepcopy(model)
    stats = capture(pruned, random_windows(), progress=False)
    prune_model(pruned, stats, PruneConfig(budget=budget, structures="ffn+heads"))
    return pruned


def test_compare_reports_ratios_for_each_dtype():
    dense = tiny_model("llama-gqa")
    pruned = _pruned(dense)
    result = compare(dense, pruned, FAST.model_copy(update={"dtypes": ["float32", "bfloat16"]}))
    assert set(result["dtypes"]) == {"float32", "bfloat16"}
    for row in result["dtypes"].values():
        d, p = row["dense"], row["pruned"]
        assert row["ideal_speedup"] == pytest.approx(d["macs_per_token"] / p["macs_per_token"])
        assert row["ideal_speedup"] > 1.2  # half of the block weights are gone
        assert row["params_ratio"] < 1 and 0 < row["memory_ratio"] < 1
        assert d["prefill_tok_s"] > 0 and p["decode_ms_per_token"] > 0
        assert row["prefill_speedup"] == pytest.approx(p["prefill_tok_s"] / d["prefill_tok_s"])
    # bf16 halves the weight bytes: the peak memory of the same model roughly halves too.
    fp32 = result["dtypes"]["float32"]["dense"]["peak_memory_mib"]
    bf16 = result["dtypes"]["bfloat16"]["dense"]["peak_memory_mib"]
    assert 0.4 < bf16 / fp32 < 0.6


def test_measure_does_not_touch_the_models():
    dense = tiny_model("llama-gqa")
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    measure({"model": dense}, FAST.model_copy(update={"dtypes": ["bfloat16"]}))
    after = dense.state_dict()
    assert all(
        after[k].dtype == torch.float32 and torch.equal(after[k], v) for k, v in before.items()
    )


def test_peak_memory_counts_weights_and_activations():
    model = tiny_model("llama-gqa")
    weights = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    small = peak_memory_mib(model, torch.zeros(1, 8, dtype=torch.long))
    large = peak_memory_mib(model, torch.zeros(8, 128, dtype=torch.long))
    assert weights <= small < large


def test_peak_memory_ignores_other_threads():
    """The flow evaluates models in parallel threads: their tensors must not be counted."""
    import threading

    model, other = tiny_model("llama-gqa"), tiny_model("llama-mha")
    ids = torch.zeros(2, 32, dtype=torch.long)
    alone = peak_memory_mib(model, ids)
    stop = threading.Event()

    def busy():
        with torch.no_grad():
            while not stop.is_set():
                other(torch.zeros(8, 64, dtype=torch.long), use_cache=False)

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        together = [peak_memory_mib(model, ids) for _ in range(5)]
    finally:
        stop.set()
        worker.join()
    assert together == [alone] * 5
