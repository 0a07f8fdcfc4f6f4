"""The blueprints: thin views over the operations in ``api`` and ``shared`` (jobs, models,
the web UI, the viewer, health and metrics)."""
