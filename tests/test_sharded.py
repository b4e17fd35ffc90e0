"""Sharded checkpoints (`model-0000k-of-0000n.safetensors` + index) in and out: read wherever a
model directory is read, written when the weights exceed --max-shard-size, hashed, verified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cfsp.cli import main
from cfsp.errors import CfspError
from cfsp.export import load_pruned, read_manifest, verify_checkpoint
from cfsp.models import WEIGHTS_INDEX, load_model
from tests.conftest import TEXT, random_windows, tiny_model

SHARD = "30KB"  # the tiny llama-gqa holds about 170 KB of float32 weights: six or so shards


def _shards(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("model-*-of-*.safetensors"))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _prune(capsys, model_dir: Path, text: Path, out: Path, *extra) -> None:
    args = ["prune", "--model", model_dir, "--budget", 0.3, "--calib", f"file:{text}"]
    args += ["--nsamples", 8, "--seqlen", 16, "--out", out, *extra]
    code = main([str(a) for a in args])
    assert code == 0, capsys.readouterr().err


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_tokenizer):
    """The same tiny model saved as one file and as shards, and a calibration text."""
    root = tmp_path_factory.mktemp("sharded")
    model = tiny_model("llama-gqa")
    for name, size in (("single", "1GB"), ("sharded", SHARD)):
        model.save_pretrained(root / name, max_shard_size=size)
        tiny_tokenizer.save_pretrained(root / name)
    (root / "text.txt").write_text(TEXT)
    return root, model


def test_sharded_input_loads_like_the_single_file(sources):
    root, model = sources
    assert len(_shards(root / "sharded")) > 2 and not (root / "sharded/model.safetensors").exists()
    ids = random_windows().ids
    loaded = load_model(str(root / "sharded"))
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(model, ids))


def test_sharded_in_prune_sharded_out_matches_unsharded(sources, tmp_path, capsys, monkeypatch):
    # float64 solves: bit-equal logits are the layout's claim; float32 BLAS results may differ
    # in the last bit between two runs (buffer alignment), which is not what this test checks
    monkeypatch.setenv("CFSP_MATH_DTYPE", "float64")
    root, _ = sources
    one, many = tmp_path / "one", tmp_path / "many"
    _prune(capsys, root / "single", root / "text.txt", one)
    _prune(capsys, root / "sharded", root / "text.txt", many, "--max-shard-size", SHARD)
    assert (one / "model.safetensors").is_file() and not (one / WEIGHTS_INDEX).exists()
    shards = _shards(many)
    assert len(shards) > 1 and not (many / "model.safetensors").exists()
    index = json.loads((many / WEIGHTS_INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    recorded = read_manifest(many)["files_sha256"]
    assert set(shards) | {WEIGHTS_INDEX} <= set(recorded)
    assert set(read_manifest(many)["weights_sha256"]) == set(shards)
    assert verify_checkpoint(many) == [] and verify_checkpoint(one) == []
    assert main(["verify", str(many)]) == 0
    ids = random_windows().ids
    reference = _logits(load_pruned(one), ids)
    torch.testing.assert_close(_logits(load_pruned(many), ids), reference, rtol=0, atol=0)
    torch.testing.assert_close(_logits(load_model(str(many)).model, ids), reference)


def test_verify_names_a_missing_or_changed_shard(sources, tmp_path, capsys):
    root, _ = sources
    out = tmp_path / "many"
    _prune(capsys, root / "sharded", root / "text.txt", out, "--max-shard-size", SHARD)
    first, second = _shards(out)[:2]
    (out / first).unlink()
    data = bytearray((out / second).read_bytes())
    data[-1] ^= 1
    (out / second).write_bytes(bytes(data))
    problems = " ".join(verify_checkpoint(out))
    assert f"{first}: recorded in the manifest but missing" in problems
    assert f"{second}: sha256" in problems
    assert main(["verify", str(out)]) == 1


def _damage_missing(directory: Path) -> None:
    (directory / _shards(directory)[0]).unlink()


def _damage_misplaced(directory: Path) -> None:
    index = json.loads((directory / WEIGHTS_INDEX).read_text())
    first, last = _shards(directory)[0], _shards(directory)[-1]
    tensor = next(t for t, shard in index["weight_map"].items() if shard == first)
    index["weight_map"][tensor] = last
    (directory / WEIGHTS_INDEX).write_text(json.dumps(index))


def _damage_escape(directory: Path) -> None:
    index = json.loads((directory / WEIGHTS_INDEX).read_text())
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (directory / WEIGHTS_INDEX).write_text(json.dumps(index))


def _damage_not_json(directory: Path) -> None:
    (directory / WEIGHTS_INDEX).write_text("{not json")


def _damage_no_map(directory: Path) -> None:
    (directory / WEIGHTS_INDEX).write_text('{"metadata": {}}')


@pytest.mark.parametrize(
    "damage,match",
    [
        (_damage_missing, "names the shard model-00001-of-.*, which is missing"),
        (_damage_misplaced, "places model.embed_tokens.weight in .*, which does not hold them"),
        (_damage_escape, "'../elsewhere.safetensors', not a file name"),
        (_damage_not_json, "is not valid JSON"),
        (_damage_no_map, "has no weight_map"),
    ],
)
def test_damaged_index_is_one_clear_error(sources, tmp_path, capsys, damage, match):
    import shutil

    root, _ = sources
    directory = tmp_path / "model"
    shutil.copytree(root / "sharded", directory)
    damage(directory)
    with pytest.raises(CfspError, match=match):
        load_model(str(directory))
    code = main(["eval", "--model", str(directory), "--data", f"file:{root / 'text.txt'}"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")], err


@pytest.mark.parametrize("size", ["0", "-1GB", "2GiB", "lots"])
def test_bad_max_shard_size_is_a_usage_error(sources, tmp_path, capsys, size):
    root, _ = sources
    args = ["prune", "--model", root / "single", "--calib", f"file:{root / 'text.txt'}"]
    code = main([str(a) for a in [*args, "--out", tmp_path / "out", "--max-shard-size", size]])
    err = capsys.readouterr().err
    assert code == 2 and f"error: max shard size '{size}' is not a positive size" in err
    assert not (tmp_path / "out").exists()
