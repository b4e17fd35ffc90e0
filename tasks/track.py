"""Entry point: MLflow tracking lives in cfsp.pipeline.tracking (installed with cfsp); this
top-level module only re-exports it."""

from cfsp.pipeline.tracking import check_tracking_uri, lineage_tags, preflight, track

__all__ = ["check_tracking_uri", "lineage_tags", "preflight", "track"]
