"""benchmarks/gpu_check.sh in its quick CPU mode (the CUDA run is the same code on another
device), and the verdict logic that makes it fail."""

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_check import compare

ROOT = Path(__file__).resolve().parents[1]


def test_quick_cpu_mode_of_the_script(tiny_project, tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, CFSP_GPU_MODEL=str(tiny_project / "tiny"))
    env["CFSP_GPU_WHEELS"] = str(tmp_path / "no-wheels")  # pydantic is here: none needed
    out = tmp_path / "check"
    args = ["--device", "cpu", "--quick", "--calib", f"file:{tiny_project / 'text.txt'}"]
    args += ["--eval-data", f"file:{tiny_project / 'text.txt'}"]
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kept indices equal: True (0 differ)" in proc.stdout
    assert "gpu check passed" in proc.stdout
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["verdict"]["ppl_relative_diff"] == 0.0
    assert {r["math_dtype"] for r in summary["runs"].values()} == {"float32"}
    scale = summary["scale"]
    assert scale["shape"] == "tiny" and scale["peak_device_mib"] is None  # CPU: no device peak
    assert scale["prune_s"] > 0 and scale["dense_forward_s"] > 0 and scale["peak_rss_mib"] > 0


def test_missing_model_is_one_error_line(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, CFSP_GPU_MODEL=str(tmp_path / "none"))
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "o")],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1
    assert "no converted SmolLM2 folder" in proc.stderr


def _run(ppl: float, channels: list[int]) -> dict:
    return {"ppl": ppl, "kept": [{"heads": [0, 1], "kv_heads": [0], "channels": channels}]}


def test_verdict_fails_on_other_channels_or_perplexity():
    same = compare({"device": _run(10.0, [1, 2, 3]), "cpu": _run(10.04, [1, 2, 3])})
    assert same["kept_equal"] and same["ppl_within_tolerance"]
    moved = compare({"device": _run(10.0, [1, 2, 4]), "cpu": _run(10.0, [1, 2, 3])})
    assert not moved["kept_equal"] and moved["kept_differing"] == 2
    far = compare({"device": _run(10.1, [1, 2, 3]), "cpu": _run(10.0, [1, 2, 3])})
    assert not far["ppl_within_tolerance"]
