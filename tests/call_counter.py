"""Counting a network's executions inside the engine's compiled calls (tests only).

The engine runs its networks as ``tf.function`` traced per shape on TensorFlow
(``worker.inference.compiled_calls``): a wrapper's Python code runs once per trace, not once
per call. ``record_call`` puts the record into the graph as a ``py_function``, so every
execution is counted; on other backends (calls not compiled) it records directly.
"""

from __future__ import annotations

import keras
import numpy as np


def record_call(record, x) -> None:
    """Call ``record(shape)`` (a tuple of ints) each time this point runs, traced or eager."""
    if keras.backend.backend() != "tensorflow":
        record(tuple(int(v) for v in np.shape(x)))
        return
    import tensorflow as tf

    def run(shape):
        record(tuple(int(v) for v in np.asarray(shape)))
        return np.int32(0)

    tf.py_function(run, [tf.shape(x)], tf.int32)
