"""The flat metric schema and the one table renderer (cfsp.metrics)."""

import re

from cfsp.metrics import flatten, group, render_table

NAME = re.compile(r"^(params|ppl|zeroshot|speed|time|recover)/[A-Za-z0-9._-]+$")


def _evaluation(params: int, ppl: float, acc: float | None, speed: bool) -> dict:
    figures = {"prefill_tok_s": 900.0, "decode_ms_per_token": 4.0, "peak_memory_mib": 80.0,
               "macs_per_token": 1e6}  # fmt: skip
    row = {"pruned": figures, "prefill_speedup": 1.4, "decode_speedup": 1.2,
           "ideal_speedup": 1.6, "memory_ratio": 0.7}  # fmt: skip
    return {
        "params": params,
        "seqlen": 128,
        "perplexity": {"botchan:test": {"ppl": ppl}, "wikitext2": {"ppl": 2 * ppl}},
        "zeroshot": None if acc is None else {"tasks": {"piqa": {"acc": acc}}, "average_acc": acc},
        "speed": {"dtypes": {"bfloat16": row}} if speed else None,
    }


def test_flatten_names_every_figure_in_the_schema():
    dense = _evaluation(1000, 10.0, 0.7, False)
    ours = _evaluation(600, 15.0, 0.6, True)
    recover = {"trainable_params": 42, "losses": [3.0, 2.5]}
    flat = flatten(ours, dense, 0.4, {"capture": 1.5, "capture_pass": 1.0}, recover)
    assert all(NAME.match(k) for k in flat), [k for k in flat if not NAME.match(k)]
    assert flat["ppl/botchan-test_s128"] == 15.0 and flat["ppl/wikitext2_s128"] == 30.0
    assert flat["ppl/botchan-test_s128_ratio"] == 1.5
    assert flat["params/kept_fraction"] == 0.6 and flat["params/removed_fraction"] == 0.4
    assert abs(flat["zeroshot/piqa_ratio"] - 0.6 / 0.7) < 1e-12
    assert flat["speed/prefill_bf16"] == 1.4 and flat["speed/prefill_tok_s_bf16"] == 900.0
    assert flat["time/capture_s"] == 1.5 and flat["recover/final_loss"] == 2.5
    assert group(flat, "speed")["ideal_bf16"] == 1.6


def test_flatten_of_a_lone_evaluation_has_no_ratios():
    flat = flatten(_evaluation(1000, 10.0, None, False))
    assert flat == {"params/count": 1000.0, "ppl/botchan-test_s128": 10.0,
                    "ppl/wikitext2_s128": 20.0}  # fmt: skip


def test_render_table_fills_gaps_and_escapes_pipes():
    table = render_table([{"run": "a|b", "ppl": 1.23456789}, {"run": "c", "acc": None}])
    lines = table.splitlines()
    assert lines[0] == "| run | ppl | acc |" and lines[1] == "|---|---|---|"
    assert lines[2] == "| a\\|b | 1.23457 | - |" and lines[3] == "| c | - | - |"
