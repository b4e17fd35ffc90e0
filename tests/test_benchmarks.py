"""A smoke run of the benchmark suite on a tiny model: every output, the targets, the resume."""

from pathlib import Path

import pytest

from benchmarks.ablation import main as ablation
from benchmarks.compare import variant_config
from benchmarks.suite import Suite, main, parse_args, result_config, settings_key
from benchmarks.targets import check_targets
from cfsp.errors import UsageError
from cfsp.io import read_json, write_json
from tests.conftest import tiny_suite_argv


def _interrupted(*args, **kwargs):
    raise KeyboardInterrupt


def test_suite_smoke_run_writes_everything_and_resumes(tmp_path, tiny_tokenizer, monkeypatch):
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

    # A row measured under another config of its method (a default changed since) is redone.
    stale = tmp_path / "rows" / "flap+liar-p0.2.json"
    edited = read_json(stale)
    edited["config"]["damping"] = 0.5
    write_json(stale, edited)
    stamps.pop(stale.name)
    main(argv)
    assert (
        read_json(stale)["config"]["damping"]
        == variant_config("flap+reconstruct=liar", 0.2).damping
    )
    assert {
        p.name: p.stat().st_mtime_ns for p in (tmp_path / "rows").iterdir() if p != stale
    } == stamps

    # A run stopped part-way still publishes every row measured under its settings.
    (tmp_path / "rows" / "wanda_sp-p0.5.json").unlink()
    monkeypatch.setattr(Suite, "row", _interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    published = read_json(tmp_path / "suite.json")["rows"]
    assert [(r["method"], r["budget"]) for r in published] == [
        (r["method"], r["budget"]) for r in rows[:-1]
    ]
    monkeypatch.undo()

    # Zero-shot columns are added by a later run without recomputing the rest of a row.
    from cfsp.data import local_data_dir

    data = local_data_dir()
    if data is None or not (data / "arc/ARC-Easy-Test.jsonl").is_file():
        return  # no local zero-shot data on this machine: the part above is the smoke test
    argv[argv.index("--tasks") + 1] = "arc_easy,boolq"
    argv += ["--task-limit", "3"]
    partly = main([*argv, "--task-methods", "default"])  # dense and the default only
    assert {r["method"] for r in partly if r["zeroshot"]} == {"dense", "default"}
    assert "; dense and default rows only" in (tmp_path / "BENCHMARKS.md").read_text()
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


def test_lowest_perplexity_counts_a_tie_with_the_same_plan():
    dense = {**_row("dense", 0.0, 0.42, 0.50), "params": 10}
    ours = _row("default", 0.5, 0.5, 0.5) | {"keep_ratios": [0.5, 0.5]}
    same = _row("uniform+cfsp", 0.5, 0.5, 0.5) | {"keep_ratios": [0.5, 0.5]}
    lower = _row("flap", 0.5, 0.5, 0.5) | {"ppl": {"wikitext2": 9.5}}
    text = "default has the lowest WikiText-2 perplexity at every budget"
    tie = {t["target"]: t for t in check_targets([dense, ours, same], "generic")}[text]
    assert tie["met"] is True and "(a tie: the same widths in every block)" in tie["numbers"]
    beaten = {t["target"]: t for t in check_targets([dense, ours, same, lower], "generic")}[text]
    assert beaten["met"] is False and "vs flap 9.50" in beaten["numbers"]


def test_zero_shot_targets():
    dense = {**_row("dense", 0.0, 0.42, 0.50), "params": 10}
    rows = [dense, _row("default", 0.2, 0.63, 0.45), _row("flap+liar", 0.2, 0.40, 0.52)]
    targets = {t["target"]: t for t in check_targets(rows)}
    best = targets["default zero-shot average is the best or within 0.5 points of the best"]
    assert best["met"] is True and best["numbers"] == "p=0.2: 51.0 vs best other flap+liar 48.0"
    drop = targets["p=0.2: zero-shot average within 1.5 points of dense"]
    assert drop["met"] is True and "(+3.7 points against dense)" in drop["numbers"]  # 47.3 -> 51.0
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
    settings |= {"tasks": "piqa,boolq", "task_limit": 100, "task_methods": "['default']"}
    page = render_markdown([payload | {"versions": {}}], tmp_path)
    assert "over the first 100 items each (lm-eval, acc; dense and default rows only)" in page
    assert "--tasks 'piqa,boolq' --task-limit 100 --task-methods default" in page


def _compare_result(path, calib_hash: str, rows: list[tuple[str, float, float]]) -> None:
    write_json(
        path,
        {
            "calibration": {"hash": calib_hash},
            "evaluation": {"valid": {"hash": "v1"}},
            "rows": [
                {"variant": v, "budget": b, "ppl": {"valid": p}, "time_ratio": 1.5}
                for v, b, p in [("dense", 0.0, 10.0), *rows]
            ],
        },
    )


def test_ablation_sets_runs_side_by_side_and_refuses_other_windows(tmp_path):
    _compare_result(
        tmp_path / "a.json", "c1", [("cfsp", 0.2, 20.0), ("cfsp+reconstruct=none", 0.2, 30.0)]
    )
    _compare_result(
        tmp_path / "b.json", "c1", [("cfsp", 0.2, 20.0), ("cfsp+control=0.5", 0.2, 19.0)]
    )
    page = ablation([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--source", "valid"])
    lines = [line for line in page.splitlines() if line.startswith("| 0.2")]
    assert len(lines) == 3  # the default once, then the variants, best first
    assert "default" in lines[0] and "20.00" in lines[0] and lines[0].endswith("| 1.50 |")
    assert "control 0.5" in lines[1] and "-5.0%" in lines[1]
    assert "LIAR off" in lines[2] and "+50.0%" in lines[2]

    _compare_result(tmp_path / "d.json", "c1", [("cfsp+stats=sequential", 0.5, 40.0)])
    paths = [str(tmp_path / name) for name in ("a.json", "d.json")]
    with pytest.raises(UsageError, match="no 'cfsp' row at budget 0.5"):
        ablation([*paths, "--source", "valid"])
    page = ablation([*paths, "--source", "valid", "--budgets", "0.2"])  # 0.5 left out
    assert "| 0.2 |" in page and "| 0.5 |" not in page

    _compare_result(tmp_path / "c.json", "c2", [("cfsp", 0.2, 21.0)])
    with pytest.raises(UsageError, match="not comparable"):
        ablation([str(tmp_path / "a.json"), str(tmp_path / "c.json"), "--source", "valid"])
    with pytest.raises(UsageError, match="not evaluated"):
        ablation([str(tmp_path / "a.json"), "--source", "wikitext2"])


def test_result_config_keeps_what_a_method_reads():
    default = result_config(variant_config("cfsp", 0.2))
    assert default["control"] == "auto" and default["damping"] == 0.1 and "seed" not in default
    steeper = result_config(variant_config("cfsp+control=2", 0.2))
    assert steeper != default  # a changed allocation default redoes the CFSP rows...
    for method in ("wanda_sp", "flap", "cfsp+allocation=uniform"):
        assert result_config(variant_config(method, 0.2)) == result_config(
            variant_config(method + "+control=2", 0.2)
        )  # ...and not those whose allocation never reads it
    assert "damping" not in result_config(variant_config("magnitude", 0.2))
    assert "damping" not in result_config(variant_config("flap", 0.2))  # bias-only: no solve
    assert "damping" in result_config(variant_config("flap+reconstruct=liar", 0.2))
    assert "damping" in result_config(variant_config("cfsp+criterion=obs+reconstruct=none", 0.2))
    assert "seed" in result_config(variant_config("random", 0.2))
    # the held-out windows count only for the rows that choose their control on them
    assert default["heldout"] == 16 and result_config(variant_config("cfsp", 0.2), 8) != default
    assert "heldout" not in result_config(variant_config("cfsp+control=0.5", 0.2))
    assert "heldout" not in result_config(variant_config("cfsp+stats=sequential", 0.2))


def test_committed_suite_rows_match_their_settings_key():
    """The rows in benchmarks/results were measured under the key the suite computes for the
    settings they record, so a re-run reuses them instead of redoing hours of rows."""
    repo = Path(__file__).resolve().parent.parent
    for name in ("suite.json", "gemma3_suite.json"):
        settings = read_json(repo / "benchmarks" / "results" / name)["settings"]
        argv = []
        for key in ("model", "calib", "nsamples", "seqlen", "seed", "wikitext", "botchan"):
            argv += [f"--{key}", settings[key]]
        for key in ("wikitext_windows", "botchan_windows", "round_to", "speed_batch"):
            argv += [f"--{key.replace('_', '-')}", settings[key]]
        argv += [
            f"--{k.replace('_', '-')}"
            for k in ("no_speed", "no_rounded")
            if settings.get(k) == "True"
        ]
        key = settings_key(parse_args(argv))
        rows = repo / settings["rows"]  # recorded relative to the repository
        assert read_json(rows / "dense.json")["settings"] == key, name


def test_recorded_paths_render_from_any_checkout(tmp_path):
    """Paths inside the repository are recorded relative to its root, so the committed result
    links the same files wherever it is rendered; paths outside stay absolute."""
    from benchmarks.suite import HERE, _portable
    from benchmarks.targets import REPO, _link

    inside = HERE / "results" / "suite_rows"
    assert _portable(inside) == "benchmarks/results/suite_rows"
    assert _portable(tmp_path / "rows") == str(tmp_path / "rows") and _portable(8) == "8"
    assert _link("benchmarks/results/suite_rows", REPO) == "benchmarks/results/suite_rows"
    assert _link(str(tmp_path / "out" / "x.png"), tmp_path / "out") == "x.png"
