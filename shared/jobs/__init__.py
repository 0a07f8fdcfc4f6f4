"""The job service's state: the status enum, the tables, the database session and migrations,
the compare-and-set row operations, metrics, the Celery queue and the reconciler."""
