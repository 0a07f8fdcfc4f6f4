"""Several workers on one machine (issue 16): each worker's pool process caps its compute
threads at WORKER_THREADS, and the dev stack shares the cores out among its workers.

The thread checks run in fresh interpreters, as a pool child is one: TensorFlow's thread
pools are fixed by its first op, so they must be set before, in a process that has not
imported TensorFlow yet (this test process may well have)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.devstack import worker_command, worker_threads_for
from shared.settings import Settings

REPO = Path(__file__).resolve().parents[2]

# What the pool child does in worker_process_init (get_context -> configure_accelerator),
# then real ops: does the worker's TensorFlow compute on one core?
TENSORFLOW_CHILD = """
import json, os, resource, time
import worker.tasks as tasks

assert "tensorflow" not in __import__("sys").modules  # the pool child imports it only now
import tensorflow as tf

threading = tf.config.threading
seen = {}
tasks.configure_threads(0)  # 0: TensorFlow's default, nothing set
seen["zero"] = [threading.get_intra_op_parallelism_threads(), "OMP_NUM_THREADS" in os.environ]
tasks.configure_threads(3)
seen["three"] = [threading.get_intra_op_parallelism_threads(), threading.get_inter_op_parallelism_threads()]
tasks.configure_accelerator()  # WORKER_THREADS=1 from the environment, as in the pool child
seen["env"] = [
    threading.get_intra_op_parallelism_threads(),
    threading.get_inter_op_parallelism_threads(),
    os.environ["OMP_NUM_THREADS"],
]
x = tf.random.uniform((1500, 1500))
matmul = tf.function(lambda a: a @ a)
matmul(x).numpy()
start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
for _ in range(10):
    matmul(x).numpy()
after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
busy = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
seen["cores_busy"] = busy / wall
tasks.configure_threads(2)  # too late now: a warning, not an error, and the cap stays
seen["after_ops"] = threading.get_intra_op_parallelism_threads()
print(json.dumps(seen))
"""

JAX_CHILD = """
import json, os
import worker.tasks as tasks

tasks.configure_threads()
tasks.configure_threads()  # once is enough: the flags are not repeated
import jax.numpy as jnp  # XLA parses XLA_FLAGS now and dies on one it cannot read

seen = {"flags": os.environ["XLA_FLAGS"], "omp": os.environ["OMP_NUM_THREADS"]}
print(json.dumps(dict(seen, sum=float(jnp.ones(4).sum()))))
"""


def _child(code: str, **env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "OMP_NUM_THREADS")}
    environment.update(PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu", **env)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=environment, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_worker_threads_caps_tensorflow_in_the_pool_child():
    seen = _child(TENSORFLOW_CHILD, WORKER_THREADS="1", KERAS_BACKEND="tensorflow")
    assert seen["zero"] == [0, False]
    assert seen["three"] == [3, 2]  # inter-op threads: min(2, T)
    assert seen["env"] == [1, 1, "1"]
    # Measured, not only asked for: one thread computes (about 1.0; 2 cores' default: 1.7-1.9).
    assert seen["cores_busy"] < 1.4, seen
    assert seen["after_ops"] == 1


def test_worker_threads_on_jax_sets_xla_flags_before_jax_loads():
    seen = _child(JAX_CHILD, WORKER_THREADS="2", KERAS_BACKEND="jax")
    assert seen["flags"] == "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=2"
    assert seen["sum"] == 4.0 and seen["omp"] == "2"


@pytest.mark.parametrize(
    ("workers", "cores", "configured", "expected"),
    [
        (1, 8, None, 8),
        (2, 8, None, 4),
        (3, 8, None, 2),  # rounded down: never more threads than cores in all
        (16, 8, None, 1),  # more workers than cores: one each, never 0
        (1, 1, None, 1),
        (2, 1, 0, 1),  # 0 = not configured
        (0, 4, None, 4),  # no division by zero
        (2, 8, 3, 3),  # WORKER_THREADS wins
    ],
)
def test_devstack_shares_the_cores_among_its_workers(workers, cores, configured, expected):
    assert worker_threads_for(workers, cores, configured) == expected


def test_devstack_workers_get_distinct_node_names():
    settings = Settings(_env_file=None)
    plain = worker_command(settings)
    assert "--hostname" not in plain  # tests/conftest.py appends its own
    named = [worker_command(settings, hostname=f"w{i}@%h") for i in (1, 2)]
    assert [cmd[cmd.index("--hostname") + 1] for cmd in named] == ["w1@%h", "w2@%h"]
    assert all(cmd[: len(plain)] == plain for cmd in named)
