"""Devices: the one `--device` resolver, the math dtype per device, and `--device` reaching
prune, eval and the pipeline stages. These machines have no GPU: CUDA availability is faked
only inside the resolver's unit tests; everything else runs on the CPU for real."""

import json

import pytest
import torch
from conftest import random_windows, run_cli, tiny_model

from cfsp.config import Params, PruneConfig, validate
from cfsp.devices import (
    bound_host_heap,
    check_device_name,
    math_dtype,
    resolve_device,
    trim_host_heap,
)
from cfsp.engine.capture import capture
from cfsp.engine.driver import prune_model
from cfsp.errors import UsageError


def test_auto_is_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda", 0)


def test_cuda_index_is_checked_against_the_devices_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UsageError, match=r"--device cuda:2: there are 2 CUDA devices \(0\.\.1\)"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="--device cuda:1: no CUDA device is available here"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cuda:-1", "CUDA", "mps", "", "cpu:0"])
def test_unknown_device_names(bad):
    with pytest.raises(UsageError, match="unknown --device"):
        check_device_name(bad)


def test_host_heap_controls_reach_glibc():
    import os
    import platform
    import subprocess
    import sys
    from pathlib import Path

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    code = (
        "import torch\n"
        "from cfsp.devices import bound_host_heap, heap_free_bytes, trim_host_heap\n"
        "print(bound_host_heap())\n"
        "x = [torch.ones(1 << 20) for _ in range(64)]\n"  # 256 MiB of heap chunks (< 64 MiB each)
        "del x[::2]\n"  # every other one freed: 128 MiB free inside the heap
        "free = heap_free_bytes()\n"
        "print(free is not None and free >= 100 << 20)\n"
        "print(trim_host_heap(min_free=1 << 40))\n"  # too little free to be worth a trim
        "print(trim_host_heap(min_free=0))\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.split() == [str(glibc), str(glibc), "False", str(glibc)]
    assert isinstance(bound_host_heap(), bool) and isinstance(trim_host_heap(), bool)


def test_params_device_key():
    assert Params().device == "auto"
    assert validate(Params, {"device": "cuda:3"}, "params").device == "cuda:3"
    with pytest.raises(UsageError, match="device: String should match pattern"):
        validate(Params, {"device": "gpu"}, "params")


def test_math_dtype_per_device(monkeypatch):
    monkeypatch.delenv("CFSP_MATH_DTYPE", raising=False)
    assert math_dtype("cpu") == torch.float32
    assert math_dtype(torch.device("cuda", 0)) == torch.float32  # a name; no GPU needed
    monkeypatch.setenv("CFSP_MATH_DTYPE", "float64")
    assert math_dtype("cpu") == torch.float64
    monkeypatch.setenv("CFSP_MATH_DTYPE", "half")
    with pytest.raises(UsageError, match="CFSP_MATH_DTYPE='half'"):
        math_dtype("cpu")


def _prune_tiny(monkeypatch, dtype: str):
    monkeypatch.setenv("CFSP_MATH_DTYPE", dtype)
    model = tiny_model("llama-gqa")
    windows = random_windows(n=8)
    stats = capture(model, windows, progress=False)
    grams = {b.down.gram.dtype for b in stats.blocks}
    cfg = PruneConfig(budget=0.4, structures="ffn+heads", reconstruct="liar")
    report = prune_model(model, stats, cfg, windows=windows)
    return model, report, grams


def test_float32_math_keeps_the_same_channels_and_outputs(monkeypatch):
    """The CUDA precision policy, run on the CPU: float32 statistics, scores and Cholesky solves
    pick the same heads and channels as float64 and give the same outputs (to float32 noise)."""
    m64, r64, g64 = _prune_tiny(monkeypatch, "float64")
    m32, r32, g32 = _prune_tiny(monkeypatch, "float32")
    assert g64 == {torch.float64} and g32 == {torch.float32}
    assert r64.compute == {"device": "cpu", "math_dtype": "float64"}
    assert r32.compute == {"device": "cpu", "math_dtype": "float32"}
    assert [p.to_dict() for p in r64.plans] == [p.to_dict() for p in r32.plans]
    ids = random_windows(n=2, seed=1).ids
    with torch.no_grad():
        torch.testing.assert_close(m32(ids).logits, m64(ids).logits, atol=1e-4, rtol=1e-4)


def test_cli_refuses_a_device_it_cannot_use_before_any_work(tiny_project):
    cases = [
        ("eval", "--model", "tiny", "--device", "gpu"),
        ("prune", "--model", "tiny", "--device", "cuda:x", "--out", "p"),
        ("stage", "capture", "--model", "tiny", "--tokens", "t", "--out", "c", "--device", "tpu"),
    ]
    if not torch.cuda.is_available():
        cases.append(("eval", "--model", "tiny", "--device", "cuda:0", "--out", "e.json"))
        cases.append(("stage", "evaluate", "--model", "tiny", "--out", "e", "--device", "cuda"))
    for argv in cases:
        code, _, err = run_cli(*argv, cwd=tiny_project)
        assert code == 2, argv
        assert err.count("error:") == 1 and "--device" in err and "Traceback" not in err, err
    assert not any((tiny_project / name).exists() for name in ("p", "c", "e", "e.json"))


def test_eval_and_stages_run_on_the_named_device(tiny_project):
    """--device cpu through `cfsp eval` and `cfsp stage`; the device is recorded."""
    code, out, err = run_cli(
        "eval", "--model", "tiny", "--data", "file:text.txt", "--seqlen", "16", "--limit", "2",
        "--device", "cpu", "--out", "e.json", cwd=tiny_project,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((tiny_project / "e.json").read_text())["device"] == "cpu"
    code, _, err = run_cli("stage", "prepare", "--model", "tiny", "--out", "t", cwd=tiny_project)
    assert code == 0, err
    code, _, err = run_cli(
        "stage", "capture", "--model", "tiny", "--tokens", "t", "--out", "c", "--device", "cpu",
        cwd=tiny_project,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((tiny_project / "c" / "capture.json").read_text())["device"] == "cpu"
