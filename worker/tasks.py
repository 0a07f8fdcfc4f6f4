"""The Celery task: a thin wrapper that hands a job id to `worker.jobrunner.execute`.

Start one worker per GPU (each with its own CUDA_VISIBLE_DEVICES)::

    celery -A worker.tasks worker --pool=prefork --concurrency=1 -Q heatmaps

TensorFlow does not survive a fork, so the main process never imports it: the pool child
loads Keras and warms the models in `worker_process_init`, after the fork. The main process
runs the reconciler thread (it stays up when a child dies).
"""

from __future__ import annotations

import logging
import os

from celery.signals import worker_process_init, worker_ready, worker_shutting_down

from shared.jobs.database import dispose_engines
from shared.jobs.queue import RUN_JOB_TASK, RUN_SHARD_TASK, make_celery
from shared.settings import get_settings

log = logging.getLogger("heatmaps.worker")
settings = get_settings()
app = make_celery(settings)
_context = None
_reconciler_stop = None
_webhook_stop = None


def configure_threads(threads: int | None = None) -> None:
    """Cap this pool process's compute threads at WORKER_THREADS (unset or 0: the backend's
    default, every core), before the backend runs its first op: N workers on one machine
    each default to all cores and oversubscribe them.

    TensorFlow: T intra-op threads (the pool one kernel splits its work over) and
    min(2, T) inter-op threads (those that run independent ops at once). A job is a chain
    of convolutions with little work that could run side by side, and each inter-op thread
    computes too, so T inter-op threads would let up to 2T threads run; two let a small op
    overlap a large one, and one keeps a WORKER_THREADS=1 worker on one core. torch takes
    set_num_threads. JAX reads XLA_FLAGS when it is imported (so this runs first), but only
    as a hint: jaxlib 0.10's CPU matmuls still used every core with these flags (measured),
    so pin JAX workers to cores (taskset) instead. OMP_NUM_THREADS covers OpenMP-built
    libraries loaded after this."""
    threads = settings.worker_threads if threads is None else threads
    if not threads:
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend == "jax":
        flags = os.environ.get("XLA_FLAGS", "")
        if "intra_op_parallelism_threads=" not in flags:
            cap = f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={threads}"
            os.environ["XLA_FLAGS"] = f"{flags} {cap}".strip()
    elif backend == "torch":
        import torch

        torch.set_num_threads(threads)
    else:
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
        except RuntimeError as exc:  # TensorFlow already ran an op in this process
            log.warning("WORKER_THREADS=%d not applied: %s", threads, exc)
            return
    log.info("compute threads of this worker process: %d (%s)", threads, backend)


def configure_accelerator() -> None:
    """Cap the compute threads (configure_threads), then let TensorFlow grow GPU memory as
    needed instead of grabbing all of it."""
    configure_threads()
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised
            pass


def get_context():
    """The per-process worker context: storage, models (loaded once, kept warm)."""
    global _context
    if _context is None:
        configure_accelerator()
        from shared.storage import Storage
        from worker.inference.model_registry import ModelRegistry
        from worker.job_context import WorkerContext

        registry = ModelRegistry(
            settings.model_dirs, settings.vgg16_weights, settings.worker_precision, settings.resolved_model_cache_dir
        )
        _context = WorkerContext(
            settings=settings,
            storage=Storage.from_settings(settings),
            registry=registry,
            name=settings.worker_name or _hostname(),
        )
        for name in settings.preload_models:
            try:
                loaded = registry.load(name)  # in WORKER_PRECISION; other precisions load on first use
                _ = loaded.fcn  # convert once now, not on the first job
            except Exception as exc:  # a model that cannot load fails its jobs, not the worker
                log.warning("could not preload model %s: %s", name, exc)
    return _context


def _hostname() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


@worker_process_init.connect
def _init_child(**_kwargs) -> None:
    from worker.scratch import clean_stale_scratch

    dispose_engines()  # connections inherited through fork must not be shared
    clean_stale_scratch(settings.resolved_scratch_dir)  # a killed pool process's folder, at its replacement
    get_context()


@worker_ready.connect
def _start_reconciler(**_kwargs) -> None:
    global _reconciler_stop
    from worker.scratch import clean_stale_scratch

    clean_stale_scratch(settings.resolved_scratch_dir)  # what killed workers of this stack left
    if settings.worker_reconciler:
        from shared.jobs.reconcile import start_thread

        _reconciler_stop = start_thread(settings)


@worker_ready.connect
def _start_webhook_sender(**_kwargs) -> None:
    """Deliveries run in the main process, so a hanging receiver never holds up the next job."""
    global _webhook_stop
    if settings.webhook_sender and settings.webhook_secret:
        from worker.webhook_delivery import start_thread

        _webhook_stop = start_thread(settings)


_announcer_stop = None


@worker_ready.connect
def _start_announcer(**_kwargs) -> None:
    """Say every few seconds that this worker consumes the queue (shared.jobs.queue), so that
    `shards=auto` splits a large job into as many shards as there are workers."""
    global _announcer_stop
    import threading

    from shared.jobs.queue import WORKER_ANNOUNCE_INTERVAL_S, announce_worker

    stop = threading.Event()
    name = _hostname()

    def _loop() -> None:
        while True:
            try:
                announce_worker(settings, name)
            except Exception as exc:  # Redis away: the record expires, auto plans fewer shards
                log.warning("could not announce worker %s: %s", name, exc)
            if stop.wait(WORKER_ANNOUNCE_INTERVAL_S):
                break
        try:
            announce_worker(settings, name, alive=False)
        except Exception:
            pass

    threading.Thread(target=_loop, name="announcer", daemon=True).start()
    _announcer_stop = stop


@worker_shutting_down.connect
def _stop_reconciler(**_kwargs) -> None:
    if _announcer_stop is not None:
        _announcer_stop.set()
    if _reconciler_stop is not None:
        _reconciler_stop.set()
    if _webhook_stop is not None:
        _webhook_stop.set()


@app.task(name=RUN_JOB_TASK, ignore_result=True)
def run_job(job_id: str) -> str:
    from worker.jobrunner import execute

    return execute(str(job_id), get_context())


@app.task(name=RUN_SHARD_TASK, ignore_result=True)
def run_shard(job_id: str, index: int, backup: bool = False) -> str | None:
    """One shard of a sharded job (worker.shard_runner); any worker runs any shard."""
    from worker.shard_runner import execute_shard

    return execute_shard(str(job_id), int(index), get_context(), bool(backup))
