"""Safe loading and fault handling that cut across stages."""

import re
from pathlib import Path

import pytest
import torch

from cfsp.engine.capture import capture
from cfsp.errors import CfspError
from tests.conftest import random_windows, tiny_model

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("cfsp", "tasks", "flows", "benchmarks") for p in (ROOT / d).rglob("*.py")]


def test_sources_found():
    assert len(SOURCES) > 20


@pytest.mark.parametrize(
    "pattern",
    [
        r"\bimport pickle\b",
        r"\bpickle\.load",
        r"torch\.load\(",
        r"cloudpickle",
        r"weights_only\s*=\s*False",
    ],
)
def test_no_unsafe_loading_in_sources(pattern):
    offenders = [str(p.relative_to(ROOT)) for p in SOURCES if re.search(pattern, p.read_text())]
    assert offenders == []


def test_remote_code_is_never_switched_on_in_code():
    """No call passes trust_remote_code=True literally: it only ever comes from the user."""
    import ast

    offenders = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.keyword)
                and node.arg == "trust_remote_code"
                and isinstance(node.value, ast.Constant)
                and node.value.value is True
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.value.lineno}")
    assert offenders == []


def test_prefect_results_are_json_not_pickle():
    from tasks import stages

    # The stage record (cfsp.pipeline.store) is the cache; Prefect persists nothing, and would
    # persist JSON if it were ever switched on.
    assert stages.STAGE_TASK["result_serializer"] == "json"
    assert stages.STAGE_TASK["persist_result"] is False


def test_non_finite_activations_stop_capture():
    model = tiny_model("llama-gqa")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(CfspError, match="non-finite activations"):
        capture(model, random_windows(), progress=False)


def test_servers_bind_loopback(monkeypatch):
    from cfsp.prefect_env import configure_prefect

    monkeypatch.delenv("PREFECT_SERVER_API_HOST", raising=False)
    configure_prefect()
    import os

    assert os.environ["PREFECT_SERVER_API_HOST"] == "127.0.0.1"
    cli = (ROOT / "cfsp/cli.py").read_text()
    assert re.search(r'"--host",\s*"127\.0\.0\.1"', cli)
