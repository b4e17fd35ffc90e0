"""A smoke run of the benchmark suite on a tiny model: every output, the targets, the resume."""

from benchmarks.suite import main
from benchmarks.targets import check_targets
from cfsp.io import read_json
from tests.conftest import tiny_suite_argv


def test_suite_smoke_run_writes_everything_and_resumes(tmp_path, tiny_tokenizer):
    methods = ["default", "flap+liar", "wanda_sp"]
    argv = tiny_suite_argv(tmp_path, tiny_tokenizer, ["0.2", "0.5"], methods)
    rows = main(argv)
    assert [r["method"] for r in rows] == ["dense"] + ["default"] * 2 + ["flap+liar"] * 2 + [
        "wanda_sp"
    ] * 2
    result = read_json(tmp_path / "suite.json")
    for row in result["rows"][1:]:
        assert abs(row["achieved"] - row["budget"]) < 0.1
        assert row["ppl"]["wikitext2"] > 1 and row["time_ratio"] > 0
        assert row["speed_bf16"]["ideal"] > 1 and row["speed_bf16"]["rounded_ideal"] > 1
        assert row["rounded"]["ppl_wikitext2"] > 1
    targets = {t["target"]: t for t in result["targets"]}
    flap = targets["p=0.5: perplexity at least 30% lower than flap+liar"]
    assert flap["met"] in (True, False) and "vs" in flap["numbers"]
    assert (
        targets["default zero-shot average is the best or within 0.5 points of the best"]["met"]
        is None
    )  # no tasks in this run: reported as not measured, not as met
    page = (tmp_path / "BENCHMARKS.md").read_text()
    assert "### Targets" in page and "| 0.5 | default |" in page and "ppl.png" in page
    assert (tmp_path / "ppl.png").stat().st_size > 1000

    # --render-only rewrites the page from the JSON result, without a model.
    (tmp_path / "BENCHMARKS.md").unlink()
    assert [r["ppl"] for r in main([*argv, "--render-only"])] == [r["ppl"] for r in rows]
    assert (tmp_path / "BENCHMARKS.md").read_text() == page

    # A second run reuses every finished row.
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "rows").iterdir()}
    again = main(argv)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "rows").iterdir()} == stamps
    assert [r["ppl"] for r in again] == [r["ppl"] for r in rows]

    # Zero-shot columns are added by a later run without recomputing the rest of a row.
    from cfsp.data import local_data_dir

    data = local_data_dir()
    if data is None or not (data / "arc/ARC-Easy-Test.jsonl").is_file():
        return  # no local zero-shot data on this machine: the part above is the smoke test
    argv[argv.index("--tasks") + 1] = "arc_easy,boolq"
    argv += ["--task-limit", "3"]
    scored = main(argv)
    assert [r["ppl"] for r in scored] == [r["ppl"] for r in rows]
    assert all(0 <= r["zeroshot"]["arc_easy"] <= 1 for r in scored)
    assert all(r["zeroshot"]["key"] == "arc_easy,boolq:3" for r in scored)
    page = (tmp_path / "BENCHMARKS.md").read_text()
    assert "### Zero-shot accuracy per task" in page and "| average without boolq |" in page


def _row(method: str, budget: float, boolq: float, other: float) -> dict:
    zero = {"piqa": other, "boolq": boolq, "hellaswag": other}
    zero["average"] = (boolq + 2 * other) / 3
    return {"method": method, "budget": budget, "ppl": {"wikitext2": 10.0}, "zeroshot": zero} | {
        "time_ratio": 1.5
    }


def test_zero_shot_targets():
    dense = {**_row("dense", 0.0, 0.42, 0.50), "params": 10}
    rows = [dense, _row("default", 0.2, 0.63, 0.45), _row("flap+liar", 0.2, 0.40, 0.52)]
    targets = {t["target"]: t for t in check_targets(rows)}
    best = targets["default zero-shot average is the best or within 0.5 points of the best"]
    assert best["met"] is True and best["numbers"] == "p=0.2: 51.0 vs best other flap+liar 48.0"
    drop = targets["p=0.2: zero-shot average within 1.5 points of dense"]
    assert drop["met"] is True and "(-3.7 points lost)" in drop["numbers"]  # 47.3 -> 51.0
    rows[1] = _row("default", 0.2, 0.42, 0.45)  # without the BoolQ gain it falls behind
    targets = {t["target"]: t for t in check_targets(rows)}
    assert (
        targets["default zero-shot average is the best or within 0.5 points of the best"]["met"]
        is False
    )


def test_generic_targets_and_a_section_without_speed_or_rounded(tmp_path):
    """A model other than SmolLM2 (--targets generic, --no-speed, --no-rounded): only the
    model-independent targets, and its rows render with '-' where nothing was measured."""
    from benchmarks.targets import render_markdown

    dense = {
        **_row("dense", 0.0, 0.42, 0.50),
        "params": 10,
        "ppl": {"wikitext2": 9.0, "botchan": 8.0},
    }
    ours = {**_row("default", 0.5, 0.5, 0.5), "ppl": {"wikitext2": 20.0, "botchan": 18.0}}
    ours |= {"achieved": 0.5, "params": 5, "speed_bf16": None, "rounded": None}
    rows = [dense, ours]
    targets = check_targets(rows, "generic")
    assert [t["target"] for t in targets] == [
        "default has the lowest WikiText-2 perplexity at every budget",
        "default zero-shot average is the best or within 0.5 points of the best",
        "pruning time at most 2.0x one dense forward",
    ]
    settings = {"model": "gemma3-270m", "calib": "c4", "nsamples": 32, "seqlen": 128, "seed": 0}
    settings |= {"wikitext_windows": 64, "botchan_windows": 32, "tasks": "", "task_limit": 200}
    settings |= {"no_speed": "True", "no_rounded": "True", "round_to": 64, "targets": "generic"}
    settings |= {k: str(tmp_path / k) for k in ("rows", "out", "plot")}
    payload = {"settings": settings, "rows": rows, "targets": targets, "threads": 2}
    page = render_markdown([payload | {"versions": {}}], tmp_path)
    assert "## Model gemma3-270m" in page and "Speed: not measured (--no-speed)." in page
    assert "| 0.5 | default | 0.5000 | 5 | 20.00 | 18.00 | 50.0 | 1.50 | - | - |" in page
    assert "--model gemma3-270m" in page and "--no-speed --no-rounded --targets generic" in page
