"""The stage registry is the one declaration of the pipeline: dvc.yaml, the `cfsp stage`
commands and the cache keys agree with it."""

import re
from pathlib import Path

import pytest
import yaml

from cfsp.config import Params
from cfsp.pipeline import store
from cfsp.pipeline.registry import (
    STAGES,
    TRACK,
    TRACK_CODE,
    TRACK_PARAMS,
    content_hash,
    enabled,
    sections,
)

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _outs(stage: dict) -> list[str]:
    return [o if isinstance(o, str) else next(iter(o)) for o in stage.get("outs", [])]


def test_dvc_declares_the_registered_stages():
    assert list(DVC) == [*STAGES, TRACK]


def test_dvc_track_stage_agrees_with_the_registry():
    track = DVC[TRACK]
    assert track["cmd"] == f"cfsp stage {TRACK}" and "outs" not in track
    assert sorted(track["deps"]) == sorted([*TRACK_CODE, "metrics"])  # every evaluation's
    assert sorted(track["params"]) == sorted(TRACK_PARAMS)
    assert all((ROOT / path).exists() for path in TRACK_CODE)


@pytest.mark.parametrize("name", list(STAGES))
def test_store_folders_are_dvc_outs(name):
    """`cfsp run` writes each stage where dvc.yaml declares its output (one store)."""
    [out] = _outs(DVC[name])
    rendered = store.folder(name, "${item.model}", "${item.budget}", "${item.method}")
    assert out == f"${{output}}/dvc/{rendered}"
    side = [next(iter(m)) for m in DVC[name].get("metrics", []) + DVC[name].get("plots", [])]
    expected = store.side_output(name, "${item.model}", "${item.budget}", "${item.method}")
    assert side == ([expected] if expected else [])
    assert all(next(iter(m.values()))["cache"] is False
               for m in DVC[name].get("metrics", []) + DVC[name].get("plots", []))  # fmt: skip


def test_store_paths_stay_inside_the_output():
    assert store.stage_dir("out", "allocate", "tiny", 0.4, "cfsp") == Path(
        "out/dvc/tiny/cfsp-p0.4/allocate"
    )
    odd = store.stage_dir("out", "prepare", "/abs/../model dir", None, None)
    assert odd.parent.parent == Path("out/dvc") and ".." not in odd.parts


@pytest.mark.parametrize("name", list(STAGES))
def test_dvc_stage_agrees_with_the_registry(name):
    stage, dvc = STAGES[name], DVC[name]
    producer = {out: other for other, d in DVC.items() for out in _outs(d)}
    deps = [d for d in dvc["deps"] if not d.startswith("${output}")]
    upstream = [producer[d] for d in dvc["deps"] if d.startswith("${output}")]
    assert sorted(deps) == sorted(stage.code)
    assert sorted(upstream) == sorted(stage.inputs)
    assert sorted(dvc["params"]) == sorted(stage.params)
    assert len(_outs(dvc)) == 1
    assert ("method" in dvc["matrix"]) == stage.per_method
    assert dvc["cmd"].startswith(f"cfsp stage {stage.command} ")
    # params.yaml's device reaches every stage that declares it, on DVC's command line too
    assert ("--device ${device}" in dvc["cmd"]) == ("device" in stage.params)
    assert all((ROOT / path).exists() for path in stage.code)


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_has_a_cli_command(name):
    from cfsp.cli import stage_app

    commands = {c.name for c in stage_app.registered_commands}
    assert STAGES[name].command in commands


def test_record_keys_follow_the_declared_sections():
    base = Params()
    other_eval = base.model_copy(update={"evaluate": base.evaluate.model_copy(update={"limit": 3})})
    run = {"method": "cfsp", "budget": 0.3}

    def key(name, params, run):
        return store.stage_key(name, ["k"], sections(name, params), run)

    for name in STAGES:
        same = key(name, base, run) == key(name, other_eval, run)
        assert same == ("evaluate" not in STAGES[name].params), name
    assert key("allocate", base, run) != key("allocate", base, {})
    assert key("capture", base, run) == key("capture", base, {})
    assert key("evaluate", base, run) == key("evaluate", base, None)  # reads no run config
    assert store.stage_key("capture", ["other"], sections("capture", base), None) != key(
        "capture", base, None
    )
    assert set(sections("recover", base)) == {
        "recover", "allocate.temperature", "allocate.control", "dtype", "device"
    }  # fmt: skip
    on_cpu = base.model_copy(update={"device": "cpu"})
    for name in STAGES:  # the device is part of the key of every stage that runs the model
        moved = key(name, base, run) != key(name, on_cpu, run)
        assert moved == (name != "prepare"), name
    assert not enabled("recover", base) and enabled("prune", base)


def test_checkpoint_hash_covers_every_shard(tmp_path):
    from cfsp.export import MANIFEST, file_hashes
    from cfsp.io import write_json

    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (tmp_path / shard).write_bytes(b"weights " + shard.encode())

    def record() -> str:
        write_json(tmp_path / MANIFEST, {"files_sha256": file_hashes(tmp_path)})
        return content_hash("reconstruct", tmp_path)

    first = record()
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"other weights")
    assert re.fullmatch(r"[0-9a-f]{20}", first) and record() != first


def test_library_defaults_are_the_configs():
    """The engine functions' own defaults (used by library callers that pass no config) are the
    ones PruneConfig and params.yaml declare, so moving a default moves it everywhere."""
    import inspect

    from cfsp.config import AllocateConfig, ReconstructConfig
    from cfsp.engine.allocate import DEFAULT_CONTROL, cfsp_keep_ratios, coarse_scores
    from cfsp.engine.reconstruct import fold
    from cfsp.pipeline.stages import recover_stage

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    control, damping = AllocateConfig().control, ReconstructConfig().damping
    assert params["allocate"]["control"] == control == "auto"
    assert params["reconstruct"]["damping"] == damping
    for fn in (coarse_scores, cfsp_keep_ratios, recover_stage):
        assert default(fn, "control") == DEFAULT_CONTROL, fn.__name__  # what auto falls back to
    assert default(fold, "damping") == damping
