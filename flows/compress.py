"""Entry point: the Prefect flows `sweep` and `compress` live in cfsp.pipeline.flows (installed
with cfsp); this top-level module only re-exports them for `prefect deploy`-style references
such as `flows/compress.py:sweep`.
"""

from cfsp.pipeline.flows import compress, deploy_sweep, run_sweep, sweep, task_runner

__all__ = ["compress", "deploy_sweep", "run_sweep", "sweep", "task_runner"]
