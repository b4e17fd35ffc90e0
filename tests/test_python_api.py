"""The public Python API (cfsp.prune / save_pruned / load_pruned / evaluate) on tiny models."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cfsp
from cfsp.config import PruneConfig
from cfsp.data import Text, calibration_windows
from cfsp.engine.capture import capture
from cfsp.engine.driver import prune_model
from cfsp.errors import UsageError
from tests.conftest import TEXT, tiny_model

# control 0.5: a per-block allocation (auto may pick the uniform one on a tiny random model)
FAST = dict(nsamples=4, seqlen=16, temperature=0.2, control=0.5, structures="ffn+heads")
ROOT = Path(__file__).resolve().parents[1]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _ids():
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def test_public_names_are_exported_lazily():
    public = {"prune", "save_pruned", "load_pruned", "evaluate"}
    assert public <= set(cfsp.__all__) and public <= set(dir(cfsp))
    assert all(callable(getattr(cfsp, name)) for name in public)
    code = "import sys, cfsp; print('torch' in sys.modules, 'pydantic' in sys.modules)"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert run.stdout.split() == ["False", "False"]  # `import cfsp` stays light


def test_prune_a_loaded_model_on_a_list_of_strings(tmp_path, tiny_tokenizer):
    model = tiny_model("llama-gqa")
    pruned, tokenizer, report = cfsp.prune(
        model, tiny_tokenizer, calibration=[TEXT, TEXT], budget=0.4, **FAST
    )
    assert pruned is model and tokenizer is tiny_tokenizer
    assert abs(report["prune"]["achieved_fraction"] - 0.4) < 0.02
    assert report["calibration"]["fingerprint"]["origin"] == "python list"
    widths = model.config.cfsp_layer_widths  # per-block widths, recorded in the config
    assert len({tuple(w.values()) for w in widths}) > 1
    ref = _logits(pruned, _ids())

    # the model's own save_pretrained output loads back with cfsp.load_pruned
    pruned.save_pretrained(tmp_path / "plain")
    torch.testing.assert_close(_logits(cfsp.load_pruned(tmp_path / "plain"), _ids()), ref)

    out = cfsp.save_pruned(pruned, tokenizer, tmp_path / "ckpt", report)
    manifest = json.loads((out / "cfsp_manifest.json").read_text())
    assert manifest["prune"]["kept"] == report["prune"]["kept"]
    assert "model.safetensors" in manifest["files_sha256"]
    torch.testing.assert_close(_logits(cfsp.load_pruned(out), _ids()), ref)
    with pytest.raises(UsageError, match="already exists"):
        cfsp.save_pruned(pruned, tokenizer, out, report)
    cfsp.save_pruned(pruned, tokenizer, out, report, overwrite=True)


def test_prune_equals_the_engine_on_the_same_windows(tiny_tokenizer):
    """The API adds no step of its own: same windows, same weights as capture + prune_model."""
    api_model, _, _ = cfsp.prune(
        tiny_model("qwen3-gqa"), tiny_tokenizer, calibration=[TEXT], budget=0.3, **FAST
    )
    engine_model = tiny_model("qwen3-gqa")
    text = Text(TEXT, "python list (1 texts)", "python list")
    windows = calibration_windows(text, tiny_tokenizer, 4, 16, 0, engine_model)
    cfg = PruneConfig(budget=0.3, temperature=0.2, control=0.5, structures="ffn+heads")
    prune_model(engine_model, capture(engine_model, windows, progress=False), cfg, windows)
    a, b = api_model.state_dict(), engine_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prune_a_spec_streams_it_and_equals_a_loaded_prune(tmp_path, tiny_tokenizer, monkeypatch):
    """A model directory is pruned by the block-streamed engine (cfsp prune's default) and
    loaded back: same kept channels, and weights within float32-Gram tolerance, as pruning
    the loaded model in memory (float64 solves: the engines' own agreement, not float32's)."""
    monkeypatch.setenv("CFSP_MATH_DTYPE", "float64")
    tiny_model("llama-gqa").save_pretrained(tmp_path / "src")
    tiny_tokenizer.save_pretrained(tmp_path / "src")
    streamed, tokenizer, report = cfsp.prune(
        str(tmp_path / "src"), calibration=[TEXT], budget=0.3, **FAST
    )
    assert "stream" in report and "exports" not in report
    loaded = tiny_model("llama-gqa")
    in_memory, _, reference = cfsp.prune(loaded, tiny_tokenizer, [TEXT], budget=0.3, **FAST)
    assert report["prune"]["kept"] == reference["prune"]["kept"]
    a, b = streamed.state_dict(), in_memory.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    assert tokenizer("a b").input_ids == tiny_tokenizer("a b").input_ids


def test_prune_a_dataset_column(tiny_tokenizer):
    from datasets import Dataset

    rows = Dataset.from_dict({"body": [TEXT, TEXT]})
    _, _, report = cfsp.prune(
        tiny_model("llama-mha"), tiny_tokenizer, rows, budget=0.2, text_column="body", **FAST
    )
    assert report["calibration"]["fingerprint"]["origin"] == "datasets.Dataset[body]"
    with pytest.raises(UsageError, match="no column 'text'"):
        cfsp.prune(tiny_model("llama-mha"), tiny_tokenizer, rows, budget=0.2, **FAST)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(calibration=42), "calibration must be a text source spec"),
        (dict(calibration=[]), "non-empty list of strings"),
        (dict(calibration=[TEXT], criterion="magic"), "criterion: Input should be 'cfsp'"),
        (dict(calibration=[TEXT], budget=1.5), "budget: Input should be less than 1"),
        (dict(calibration=[TEXT], colour="red"), "colour: unknown key"),
        (dict(calibration="nowhere:at-all"), "nowhere"),
    ],
)
def test_bad_arguments_fail_before_any_work(tiny_tokenizer, kwargs, message):
    model = tiny_model("llama-mha")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError, match=message):
        cfsp.prune(model, tiny_tokenizer, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_loaded_model_needs_its_tokenizer():
    with pytest.raises(UsageError, match="needs its tokenizer"):
        cfsp.prune(tiny_model("llama-mha"), calibration=[TEXT])


def test_evaluate_a_loaded_model(tmp_path, tiny_tokenizer):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    spec = f"file:{text}"
    result = cfsp.evaluate(
        tiny_model("llama-mha"), tiny_tokenizer, perplexity=[spec], seqlen=16, limit=4
    )
    row = result["perplexity"][spec]
    assert row["windows"] == 4 and 1.0 < row["ppl"] < float("inf")
    assert result["revision"] == "in-memory"
    with pytest.raises(UsageError, match="limit"):
        cfsp.evaluate(tiny_model("llama-mha"), tiny_tokenizer, limit=0)
