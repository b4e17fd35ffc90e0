"""Entry point: the Prefect flows `sweep` and `compress` live in cfsp.pipeline.flows (installed
with cfsp), their deployments in cfsp.pipeline.deploy; this top-level module only re-exports them
for `prefect deploy`-style references such as `flows/compress.py:sweep`.
"""

from cfsp.pipeline.deploy import DeploySpec, deploy_to_pool, sweep_deployment
from cfsp.pipeline.flows import compress, run_sweep, sweep, task_runner

__all__ = [
    "DeploySpec",
    "compress",
    "deploy_to_pool",
    "run_sweep",
    "sweep",
    "sweep_deployment",
    "task_runner",
]
