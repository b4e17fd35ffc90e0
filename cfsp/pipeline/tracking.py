"""The Prefect side of MLflow tracking (the logic is in cfsp.tracking): the sweep's parent run
is opened and closed by the flow; each model x budget x method gets a new child run here."""

from __future__ import annotations

from prefect import task

from cfsp.pipeline.tasks import retry_unless_usage_error
from cfsp.tracking import RunRecord, Sweep, log_child
from cfsp.tracking import check_tracking_uri as check_tracking_uri  # re-exported
from cfsp.tracking import preflight as preflight  # re-exported for the flows


def lineage_tags() -> dict[str, str]:
    """This execution's Prefect flow run (the DVC lineage tags: cfsp.pipeline.lineage)."""
    from prefect.runtime import flow_run

    return {"prefect.flow_run_id": str(flow_run.get_id() or "none")}


@task(
    name="track",
    task_run_name="track-{record[name]}",  # track-smollm2-135m-p0.3-cfsp
    persist_result=False,  # a side effect, not a cacheable result; never pickled either
    result_serializer="json",
    retries=2,
    retry_delay_seconds=3,
    retry_condition_fn=retry_unless_usage_error,
)
def track(sweep: dict, record: dict) -> str:
    """A new child run of the sweep's parent run; returns its run id (a retry after a failure
    half-way leaves that attempt's run FAILED and makes a new one)."""
    return log_child(Sweep(**sweep), RunRecord(**record))
