"""Every spec of a request is checked before any work: one `error:` line, exit 2, nothing
written, no traceback, no Prefect server started (issue: the main job on a fresh machine)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from cfsp import data
from cfsp.cli import main
from cfsp.data import check_source, load_text
from cfsp.errors import UsageError
from tests.conftest import TEXT, tiny_model


@pytest.fixture
def offline(monkeypatch):
    """No hub and no local data folder: only embedded sources and named files resolve."""
    monkeypatch.setattr(data, "hub_reachable", lambda: False)
    monkeypatch.delenv("CFSP_DATA_DIR", raising=False)


@pytest.fixture(scope="module")
def proj(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("preflight")
    tiny_model("llama-gqa").save_pretrained(root / "tiny")
    tiny_tokenizer.save_pretrained(root / "tiny")
    (root / "text.txt").write_text(TEXT)
    return root


def write_params(root: Path, tmp_path: Path, **changes) -> Path:
    params = {
        "models": [str(root / "tiny")],
        "budgets": [0.3],
        "output": str(tmp_path / "out"),
        "prepare": {"source": f"file:{root / 'text.txt'}", "nsamples": 4, "seqlen": 16},
        "evaluate": {"perplexity": [f"file:{root / 'text.txt'}"], "seqlen": 16, "limit": 2},
    }
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if key:
            params.setdefault(section, {})[key] = value
        else:
            params[section] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def one_error(capsys, argv: list) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def unsupported_model(tmp_path: Path) -> Path:
    """A directory whose config names an architecture cfsp has no adapter for."""
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    save_file({"wte.weight": torch.zeros(4, 4)}, str(folder / "model.safetensors"))
    return folder


# -- the run: every source, task, model and output before Prefect starts -------------------------
@pytest.mark.parametrize(
    "change,match",
    [
        ({"evaluate__perplexity": ["wikitext2"]}, "wikitext2: the hub is not reachable and CFSP"),
        ({"evaluate__perplexity": ["c4"]}, "c4: the hub is not reachable and CFSP_DATA_DIR"),
        ({"evaluate__perplexity": ["self"]}, "'self' text is for calibration only"),
        ({"evaluate__perplexity": ["wikitext3"]}, "unknown text source 'wikitext3'"),
        ({"evaluate__perplexity": ["botchan:dev"]}, "botchan:dev: unknown part"),
        ({"prepare__source": "file:/nonexistent.txt"}, "file /nonexistent.txt does not exist"),
        ({"prepare__source": "hf:wikitext"}, "'hf:wikitext' needs the hub"),
        ({"evaluate__tasks": ["piqa"]}, "zero-shot evaluation needs the local data folder"),
        ({"evaluate__tasks": ["mmlu"]}, "unknown zero-shot task(s) mmlu"),
        ({"recover__enabled": True, "recover__source": "c4"}, "c4: the hub is not reachable"),
        ({"models": ["/no/such/model"]}, "model '/no/such/model' not found"),
        ({"models": ["org/some-model"]}, "and the hub is not reachable"),
    ],
    ids=[
        "wikitext2",
        "c4",
        "self-eval",
        "unknown",
        "botchan-part",
        "file",
        "hub-dataset",
        "task-data",
        "task-name",
        "recover-text",
        "model-path",
        "hub-model",
    ],
)
def test_bad_request_fails_before_any_work(proj, tmp_path, capsys, offline, change, match):
    params = write_params(proj, tmp_path, **change)
    line = one_error(capsys, ["run", "--params", params])
    assert match in line
    assert not (tmp_path / "out").exists()  # no store, no MLflow database, no report


def test_unsupported_architecture_fails_from_its_config(proj, tmp_path, capsys, offline):
    model = unsupported_model(tmp_path)
    params = write_params(proj, tmp_path, models=[str(model)])
    assert "unsupported architecture 'gpt2'" in one_error(capsys, ["run", "--params", params])
    start = time.perf_counter()
    line = one_error(capsys, ["prune", "--model", model, "--out", tmp_path / "p"])
    assert "unsupported architecture 'gpt2'" in line
    assert time.perf_counter() - start < 10  # from config.json, no weights read
    assert not (tmp_path / "p").exists()


def test_output_that_is_a_file(proj, tmp_path, capsys, offline):
    (tmp_path / "out").write_text("not a folder")
    params = write_params(proj, tmp_path)
    assert "is not writable" in one_error(capsys, ["run", "--params", params])
    assert (tmp_path / "out").read_text() == "not a folder"


def test_prune_and_eval_check_their_sources_first(proj, tmp_path, capsys, offline):
    out = tmp_path / "p"
    args = ["prune", "--model", proj / "tiny", "--calib", "wikitext2", "--out", out]
    assert "wikitext2: the hub is not reachable" in one_error(capsys, args)
    assert not out.exists()
    args = ["eval", "--model", proj / "tiny", "--data", f"file:{proj / 'text.txt'},c4"]
    assert "c4: the hub is not reachable" in one_error(capsys, args)
    assert "zero-shot" in one_error(capsys, ["eval", "--model", proj / "tiny", "--tasks", "piqa"])


# -- sources --------------------------------------------------------------------------------------
def test_data_dir_is_never_guessed(monkeypatch, tmp_path):
    """Only CFSP_DATA_DIR names the local data: not the working directory, not the checkout."""
    (tmp_path / "shared" / "data" / "wikitext2").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "wikitext2" / "wiki.test.raw").write_text("x")
    monkeypatch.chdir(tmp_path / "shared")
    monkeypatch.delenv("CFSP_DATA_DIR", raising=False)
    assert data.local_data_dir() is None
    monkeypatch.setenv("CFSP_DATA_DIR", str(tmp_path / "shared" / "data"))
    assert data.local_data_dir() == tmp_path / "shared" / "data"


def test_local_copy_is_used_when_named(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "hub_reachable", lambda: False)
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.test.raw").write_text(" = A = \n\n text \n")
    monkeypatch.setenv("CFSP_DATA_DIR", str(tmp_path))
    check_source("wikitext2", "evaluation")
    assert load_text("wikitext2").origin == str(tmp_path / "wikitext2" / "wiki.test.raw")
    with pytest.raises(UsageError, match="has no wikitext2/tokens/valid.txt"):
        check_source("wikitext2:valid", "evaluation")


@pytest.mark.slow
def test_botchan_parts_are_disjoint_and_cover_the_novel():
    whole, train, test = (load_text(s) for s in ("botchan", "botchan:train", "botchan:test"))
    assert train.text + test.text == whole.text
    lines = whole.text.splitlines()
    assert len(train.text.splitlines()) == int(0.8 * len(lines))
    assert "lines 1-" in train.origin and test.origin.endswith(f"of {len(lines)})")
    assert test.text.strip() and not whole.text.startswith(test.text)


def test_which_texts_overlap():
    assert not data.texts_overlap("botchan:train", "botchan:test")
    assert data.texts_overlap("botchan", "botchan:test")
    assert data.texts_overlap("c4", "c4")
    assert not data.texts_overlap("self", "botchan:test")
    assert not data.texts_overlap("c4", "wikitext2")


def test_usage_errors_are_not_retried():
    """A bad request fails once; a transient failure gets its retry (real Prefect tasks)."""
    from prefect import task

    from tasks.stages import retry_unless_usage_error

    calls = []

    def failing(kind: type[Exception]) -> None:
        calls.append(kind)
        raise kind("boom")

    run = task(retries=1, retry_delay_seconds=0, retry_condition_fn=retry_unless_usage_error)(
        failing
    )
    with pytest.raises(UsageError):
        run(UsageError)
    assert calls == [UsageError]
    with pytest.raises(OSError):
        run(OSError)
    assert calls == [UsageError, OSError, OSError]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_device_without_cuda_fails_before_any_work(proj, tmp_path, capsys, offline):
    params = write_params(proj, tmp_path, device="cuda:0")
    line = one_error(capsys, ["run", "--params", params])
    assert "--device cuda:0: no CUDA device is available here" in line
    assert not (tmp_path / "out").exists()
