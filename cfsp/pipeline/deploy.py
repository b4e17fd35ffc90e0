"""Deployments of the `sweep` flow, as Prefect runs scheduled work.

`cfsp deploy` registers the sweep with a Prefect server on a process work pool (created when
missing); `prefect worker start --pool <pool>` then runs it, on its schedule or on `prefect
deployment run sweep/<name>`. `cfsp serve` builds the same deployment and runs it from its own
process instead (no pool, no worker).

Every deployment carries the params file as its default parameters, typed by cfsp.config.Params
(the UI shows a form, the server validates a custom run), a cron schedule in a time zone, a
concurrency limit (a run past it waits in line), the folder it was made in as the worker's
working directory (relative paths of params.yaml resolve as for `cfsp run` there), and the
settings that send cfsp's log lines to Prefect and persist results as JSON, never pickle. The
entry point is the installed module `cfsp.pipeline.flows.sweep`: the worker's Python needs cfsp,
not a copy of this checkout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cfsp.config import Params
from cfsp.errors import UsageError

# Settings of the process that runs a deployed sweep (a worker's flow-run process).
RUN_ENV = {
    "PREFECT_LOGGING_EXTRA_LOGGERS": "cfsp",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "PREFECT_RESULTS_DEFAULT_SERIALIZER": "json",
}


@dataclass(frozen=True)
class DeploySpec:
    """What `cfsp deploy` / `cfsp serve` are asked for besides the parameters."""

    name: str = "cfsp-sweep"
    cron: str | None = None  # None: runs only when triggered
    timezone: str = "UTC"
    concurrency: int = 1  # runs of this deployment at once; more wait (ENQUEUE)


def check_names(**names: str) -> None:
    """Deployment and pool names Prefect's server accepts (not empty, none of `/ % & > <`)."""
    from prefect.types.names import BANNED_CHARACTERS

    for option, value in names.items():
        banned = [c for c in BANNED_CHARACTERS if c in value]
        if not value.strip() or banned:
            raise UsageError(
                f"invalid --{option} {value!r}: a Prefect name needs a character and none of "
                f"{' '.join(BANNED_CHARACTERS)}"
            )


def sweep_deployment(params: Params, spec: DeploySpec, pool: str | None = None):
    """The sweep as a Prefect RunnerDeployment, not yet registered: for a work pool `pool`
    (with the worker's working directory and settings), or for `serve` (pool None: the serving
    process's own folder and settings; Prefect refuses job variables there)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from cfsp.pipeline.flows import sweep

    grid = len(params.models) * len(params.budgets) * len(params.methods)
    return sweep.to_deployment(
        name=spec.name,
        schedules=[Cron(spec.cron, timezone=spec.timezone)] if spec.cron else None,
        concurrency_limit=ConcurrencyLimitConfig(
            limit=spec.concurrency, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
        ),
        parameters={"params": params.model_dump(mode="json")},
        description=f"cfsp sweep: {grid} run(s) of {', '.join(params.models)}",
        tags=["cfsp"],
        work_pool_name=pool,
        job_variables={"working_dir": str(Path.cwd()), "env": dict(RUN_ENV)} if pool else None,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def ensure_process_pool(name: str) -> bool:
    """The work pool `name`, of type process; created (True) when missing. A pool of another
    type is refused: its workers would not run a flow from an installed module."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(
                WorkPoolCreate(name=name, type="process", base_job_template=template)
            )
            return True
    if pool.type != "process":
        raise UsageError(
            f"work pool {name!r} is of type {pool.type!r}; cfsp deploys to a process pool: "
            "choose another --pool (it is created when missing)"
        )
    return False


def deploy_to_pool(params: Params, spec: DeploySpec, pool: str) -> tuple[str, bool]:
    """Register (or update) the sweep deployment on `pool`: (deployment id, pool created)."""
    created = ensure_process_pool(pool)
    deployment_id = sweep_deployment(params, spec, pool).apply()
    return str(deployment_id), created
