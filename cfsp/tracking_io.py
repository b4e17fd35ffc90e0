"""What a child run consumed and produced, in MLflow's own terms: the calibration and evaluation
texts as dataset inputs (metadata and fingerprint only, never the text itself), and the checkpoint
as an external logged model (MLflow keeps its path, sha256 and parameters, not the weights)."""

from __future__ import annotations

import re
from pathlib import Path


def _dataset_input(fingerprint: dict, context: str):
    """One token-window set as a metadata-only dataset: named after its text source, with the
    hash of the token ids as digest (so two runs on the same windows share one dataset)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
    from mlflow.utils.validation import MAX_DATASET_DIGEST_SIZE

    described = {k: str(v) for k, v in fingerprint.items() if v is not None}
    source = CodeDatasetSource(tags={"cfsp.source": described.get("source", "?"), **described})
    digest = str(fingerprint.get("hash") or "none")[:MAX_DATASET_DIGEST_SIZE]
    name = f"{fingerprint.get('source', 'tokens')}:{context}"
    dataset = MetaDataset(source, name=name, digest=digest)
    return DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])


def log_datasets(client, run_id: str, calibration: dict | None, evaluation: dict) -> None:
    """calibration: the prepare stage's fingerprint; evaluation: {source: fingerprint}."""
    inputs = [_dataset_input(calibration, "calibration")] if calibration else []
    inputs += [_dataset_input(fp, "evaluation") for fp in evaluation.values() if fp]
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def checkpoint_tags(checkpoint: dict) -> dict[str, str]:
    """checkpoint: {"path", "digest" (cfsp's content hash: a digest of the sha256 of every file,
    however many weight shards)} -> run/model tags, including the sha256 of the manifest, which
    records the hash of every file of the checkpoint."""
    from cfsp.export import MANIFEST
    from cfsp.io import sha256_file

    path = Path(checkpoint["path"]).absolute()
    manifest = path / MANIFEST
    return {
        "checkpoint.path": str(path),
        "checkpoint.uri": path.as_uri(),
        "checkpoint.digest": str(checkpoint.get("digest") or "none"),
        "checkpoint.manifest_sha256": sha256_file(manifest) if manifest.is_file() else "none",
    }


def log_checkpoint(
    client, experiment_id: str, run_id: str, name: str, tags: dict, params: dict
) -> str:
    """An external logged model (READY at once: its files stay where cfsp wrote them) that
    points at the checkpoint; the run lists it as its output. Returns the model id. Its name is
    the run's with `.` as `_` (`tiny-p0_3-cfsp`)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

    model = client.create_logged_model(
        experiment_id,
        name=re.sub(r"[/:.%\"']", "_", name),  # MLflow refuses these in model names
        source_run_id=run_id,
        tags={**tags, MLFLOW_MODEL_IS_EXTERNAL: "true"},
        params=params,
        model_type="cfsp-checkpoint",
    )
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
    return model.model_id
