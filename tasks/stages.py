"""Entry point: the Prefect tasks, one per registered stage, live in cfsp.pipeline.tasks
(installed with cfsp); this top-level module only re-exports them."""

from cfsp.pipeline.tasks import STAGE_TASK, TASKS, retry_unless_usage_error

__all__ = ["STAGE_TASK", "TASKS", "retry_unless_usage_error"]
