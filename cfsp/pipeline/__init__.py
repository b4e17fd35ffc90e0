"""The pipeline around the engine: stage functions (stages), their registry (registry), the
Prefect tasks and flows built from it (tasks, flows), cache keys (keys), MLflow (tracking).

The repository's top-level `flows/` and `tasks/` folders are thin entry points into this
package; only `cfsp` is installed.
"""
