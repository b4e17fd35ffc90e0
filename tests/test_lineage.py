"""The one store's stage records and when a run's lineage can be recorded in DVC (our own
logic, no flow: the flow and DVC together are tests/test_pipeline.py's)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from cfsp.config import Params
from cfsp.pipeline import lineage, store


def _allocation(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "allocation.json").write_text(text)
    return folder


def test_a_record_is_reused_only_while_key_and_content_match(tmp_path):
    out = _allocation(tmp_path / "allocate", '{"keep_ratios": [0.5]}')
    written = store.write_record(out, "allocate", "key-1", 0.1, {"keep_ratios": [0.5]})
    assert store.fresh_record(out, "allocate", "key-1") == written
    assert store.fresh_record(out, "allocate", "key-2") is None  # other inputs or params
    (out / "allocation.json").write_text('{"keep_ratios": [0.7]}')  # same size, new content
    assert store.fresh_record(out, "allocate", "key-1") is None
    (out / "allocation.json").write_text('{"keep_ratios": [0.5]}')  # content back, new mtime
    os.utime(out / "allocation.json", ns=(1, 1))
    assert store.fresh_record(out, "allocate", "key-1")["hash"] == written["hash"]
    (out / store.RECORD).write_text("{not json")
    assert store.fresh_record(out, "allocate", "key-1") is None
    assert store.fresh_record(tmp_path / "missing", "allocate", "key-1") is None


def _project(root: Path, params: Params) -> Params:
    (root / ".dvc").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
    return params


def test_lineage_is_recorded_only_for_what_dvc_lock_would_describe(tmp_path):
    params = Params(models=["tiny"], budgets=[0.4])
    assert "not a DVC project" in lineage.plan(params, root=tmp_path).reason
    _project(tmp_path, params)
    assert lineage.plan(params, [("tiny", 0.4, "cfsp")], root=tmp_path).root == tmp_path

    overridden = params.model_copy(update={"budgets": [0.3]})  # `cfsp run -S budgets=[0.3]`
    why = lineage.plan(overridden, root=tmp_path)
    assert why.root is None and "budgets" in why.reason and "dvc exp run" in why.reason
    outside = lineage.plan(params, [("tiny", 0.3, "cfsp")], root=tmp_path)  # `compress`
    assert outside.root is None and "not in params.yaml's sweep" in outside.reason

    odd = _project(tmp_path / "paths", Params(models=["../models/tiny"]))
    assert "not a plain name" in lineage.plan(odd, root=tmp_path / "paths").reason


def test_lineage_tags_read_dvc_lock_or_say_none(tmp_path):
    params = _project(tmp_path, Params(models=["tiny"], budgets=[0.4]))
    out = "out/dvc/tiny/cfsp-p0.4"
    outs = {"reconstruct": ("reconstructed", "a.dir"), "evaluate": ("evaluate", "b.dir")}
    lock = {
        "stages": {
            f"{stage}@tiny-0.4-cfsp": {"outs": [{"path": f"{out}/{folder}", "md5": md5}]}
            for stage, (folder, md5) in outs.items()
        }
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    recorded = lineage.plan(params, root=tmp_path)
    tags = lineage.run_tags(recorded, "out", "tiny", 0.4, "cfsp", healed=False)
    assert tags["dvc.lineage"] == "dvc.lock" and len(tags["dvc.lock.sha256"]) == 64
    assert tags["dvc.checkpoint.stage"] == "reconstruct@tiny-0.4-cfsp"
    assert (tags["dvc.checkpoint.md5"], tags["dvc.evaluate.md5"]) == ("a.dir", "b.dir")
    none = lineage.run_tags(lineage.Lineage(None, "why"), "out", "tiny", 0.4, "cfsp", False)
    assert set(none) == set(tags) and none["dvc.lineage"] == "none (why)"
    assert none["dvc.checkpoint.md5"] == "none"
    assert lineage.grid_targets([("tiny", 0.4, "cfsp")])[:3] == [
        "prepare@tiny",
        "capture@tiny",
        "evaluate-dense@tiny",
    ]


def test_a_failed_commit_is_a_warning_and_unrecorded_lineage(tmp_path, caplog):
    params = _project(tmp_path, Params(models=["tiny"]))
    result = lineage.commit(lineage.plan(params, root=tmp_path), ["prepare@tiny"])
    assert result.root is None and result.reason.startswith("dvc commit failed: ERROR")
    assert "not a git repository" in result.reason  # DVC's own error line
    assert "lineage not recorded" in caplog.text


def test_track_before_the_stages_ran_is_one_usage_error(tmp_path, monkeypatch, capsys):
    from cfsp.cli import main

    monkeypatch.chdir(tmp_path)
    _project(tmp_path, Params(models=["tiny"]))
    code = main(["stage", "track"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1
    assert "out/dvc/tiny/prepare holds no stage record; run the pipeline first" in err[0]
    assert not (tmp_path / "out").exists()  # no MLflow database, no parent run


def test_a_stage_record_is_not_an_unrecorded_checkpoint_file(tmp_path):
    from cfsp.export import MANIFEST, file_hashes, verify_checkpoint
    from cfsp.io import write_json

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    write_json(tmp_path / MANIFEST, {"files_sha256": file_hashes(tmp_path)})
    store.write_record(tmp_path, "reconstruct", "key", 0.1, {})
    assert verify_checkpoint(tmp_path) == []
    (tmp_path / "extra.json").write_text("{}")  # any other loadable file still is
    assert verify_checkpoint(tmp_path) == ["extra.json: not recorded in the manifest"]
