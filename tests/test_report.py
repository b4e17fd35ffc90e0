"""Reports: the sweep table, the plots and the HTML, from run summaries."""

from cfsp.report import results_table, run_report, sweep_report


def _summary(method: str, budget: float, ppl: float, speed: float | None) -> dict:
    metrics = {
        "params/removed_fraction": budget,
        "params/kept_fraction": 1 - 0.8 * budget,
        "params/count": 100,
    }
    if speed is not None:
        metrics.update(
            {"speed/prefill_fp32": speed, "speed/ideal_fp32": speed + 0.1, "speed/memory_fp32": 0.8}
        )
    return {
        "name": f"m__{method}__p{budget}",
        "method": method,
        "budget": budget,
        "seqlen": 128,
        "metrics": metrics,
        "ppl": {"wikitext2": ppl, "botchan": ppl / 2},
        "dense_ppl": {"wikitext2": 50.0, "botchan": 25.0},
        "keep_ratios": [1 - budget + 0.05, 1 - budget - 0.05],
    }


def test_sweep_report_has_every_run_and_three_plots(tmp_path):
    runs = [
        _summary("cfsp", 0.2, 80.0, 1.1),
        _summary("cfsp", 0.5, 200.0, 1.5),
        _summary("flap", 0.2, 120.0, 1.1),
    ]
    files = sweep_report(runs, tmp_path)
    names = {f.name for f in files}
    assert {"report.md", "report.html", "ppl_vs_budget.png", "keep_ratios.png"} <= names
    assert all((tmp_path / n).stat().st_size > 1000 for n in names if n.endswith(".png"))
    page = (tmp_path / "report.md").read_text()
    assert "| m__cfsp__p0.5 | 0.5000 | x0.600 | 50.00 -> 200.00 (x4.00)" in page
    assert "x1.50 (ideal x1.60)" in page and "seqlen 128" in page
    html = (tmp_path / "report.html").read_text()
    assert "<table>" in html and 'src="tradeoff.png"' in html


def test_table_without_speed_or_accuracy_shows_dashes(tmp_path):
    row = _summary("cfsp", 0.3, 90.0, None)
    table = results_table([row])
    assert table.splitlines()[-1].endswith("| - | - | - | - |")
    files = run_report(row, tmp_path)
    assert "## All metrics" in (tmp_path / "report.md").read_text()
    assert {f.name for f in files} == {"report.md", "report.html"}


def test_sweeps_accumulate_and_state_their_protocol(tmp_path):
    """A second sweep into the same folder adds its rows (the newest result per run name wins)
    and its protocol; plots mix only runs evaluated like the newest sweep."""
    first = {"evaluation": "perplexity on botchan:test, first 4 windows of 128 tokens"}
    sweep_report([_summary("cfsp", 0.2, 80.0, None)], tmp_path, {**first, "commit": "aaa"})
    second = [_summary("cfsp", 0.2, 70.0, None), _summary("cfsp", 0.5, 200.0, None)]
    second[1]["checkpoint"] = "/out/store/x/reconstruct"
    files = sweep_report(second, tmp_path, {**first, "commit": "bbb"})
    page = (tmp_path / "report.md").read_text()
    assert page.startswith("# cfsp sweeps: 2 runs from 2 sweeps")
    rows = [line for line in page.splitlines() if line.startswith("| m__")]
    assert len(rows) == 2 and "50.00 -> 70.00" in rows[0] and rows[0].endswith("| 2 |")
    assert page.index("### Sweep 2") < page.index("### Sweep 1")
    assert "- commit: bbb" in page and "- commit: aaa" in page
    assert "- checkpoint m__cfsp__p0.5: /out/store/x/reconstruct" in page  # absolute already
    assert tmp_path / "sweeps.json" in files
    other = _summary("flap", 0.3, 90.0, None)
    sweep_report([other], tmp_path, {"evaluation": "all windows"})
    page = (tmp_path / "report.md").read_text()
    assert "Plots: the 1 runs evaluated like sweep 3." in page


def test_unreadable_history_is_set_aside(tmp_path):
    (tmp_path / "sweeps.json").write_text("{not json")
    sweep_report([_summary("cfsp", 0.2, 80.0, None)], tmp_path)
    assert "1 runs from 1 sweep" in (tmp_path / "report.md").read_text()
    assert [p.name.split("-")[0] for p in tmp_path.glob("sweeps.json.unreadable-*")] == [
        "sweeps.json.unreadable"
    ]


def test_protocol_names_calibration_evaluation_code_and_links():
    from cfsp.config import Params
    from cfsp.report_sweeps import sweep_protocol
    from cfsp.tracking import Sweep

    params = Params(prepare={"nsamples": 8}, evaluate={"limit": 4, "tasks": ["piqa"]})
    local = sweep_protocol(params, Sweep("sqlite:///o/mlflow.db", "3", "abc", 0))
    assert local["calibration"] == "botchan:train, 8 windows x 128 tokens, seed 0"
    assert local["evaluation"].startswith("perplexity on botchan:test, first 4 windows of 128")
    assert "zero-shot piqa (first 200 items each)" in local["evaluation"]
    assert local["code"].startswith("cfsp ") and "commit " in local["code"]
    assert "cfsp dashboard" in local["mlflow"] and "#/experiments/3/runs/abc" in local["mlflow"]
    assert local["prefect"] == "not run by Prefect"
    served = sweep_protocol(params, Sweep("http://127.0.0.1:5001/", "3", "abc", 0))
    assert served["mlflow"] == "http://127.0.0.1:5001/#/experiments/3/runs/abc"
