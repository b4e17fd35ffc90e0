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
