"""Compute precision of a model copy, and the device it runs on.

A job runs in ``float32`` (exact, the default), ``bfloat16`` or ``float16``. The reduced
precisions use Keras' mixed policies (``mixed_bfloat16``, ``mixed_float16``) on a separate
copy of the model: the weights stay float32 (so the float32 copy and the checkpoint are
untouched, and each layer casts them as it runs), activations and matrix products run in
the reduced type, and the classifier's output layer keeps the ``float32`` policy, as
Keras' mixed-precision guide advises, so that the softmax (or logits) and therefore every
score leave the model as float32. Why the mixed policy rather than casting the weights: it
keeps one source of truth for the weights and the same numbers (weights are rounded to the
compute type either way), and the window-sized head convolution can cast its own kernel.

Where it pays: GPU tensor cores (bf16 and fp16), CPUs with avx512_bf16 or AMX (oneDNN's
bf16 kernels). A CPU without them runs bf16 through conversions around fp32 kernels, which
is slower than float32 (bench/README.md gives the measurement); float16 is refused off a GPU because
CPU kernels for it are emulated and slow, and its range (6e4) can overflow in unnormalised
trunks.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import keras

from shared.jobspec import PRECISIONS

MIXED_POLICIES = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
# CPU flags that give native bf16 matrix products (oneDNN uses them).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def compute_device() -> dict:
    """What this process computes on: backend, kind (``gpu``/``cpu``), name, and for a CPU
    whether it has native bf16 instructions. Recorded in every job's ``summary.json``."""
    backend = keras.backend.backend()
    gpu = _gpu_name(backend)
    if gpu is not None:
        return {"backend": backend, "kind": "gpu", "name": gpu}
    flags = _cpu_flags()
    return {
        "backend": backend,
        "kind": "cpu",
        "name": _cpu_name(),
        "cores": os.cpu_count(),
        "native_bf16": any(flag in flags for flag in CPU_BF16_FLAGS),
    }


def _gpu_name(backend: str) -> str | None:
    """The first GPU's name on the active backend, or None on a CPU-only process."""
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            return None
        return tf.config.experimental.get_device_details(gpus[0]).get("device_name", gpus[0].name)
    if backend == "jax":
        import jax

        devices = [d for d in jax.devices() if d.platform == "gpu"]
        return devices[0].device_kind if devices else None
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return None


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def precision_problem(precision: str) -> str | None:
    """Why `precision` cannot run on this process's device, or None when it can."""
    if precision not in PRECISIONS:
        return f"unknown precision {str(precision)[:20]!r}; one of {', '.join(PRECISIONS)}"
    if precision == "float16" and compute_device()["kind"] != "gpu":
        return "float16 needs a GPU worker; this worker runs on CPU (use bfloat16 or float32)"
    return None


def apply_precision(model: keras.Model, precision: str) -> keras.Model:
    """Put a freshly built model copy under `precision` (in place; returns it).

    Every layer gets the mixed policy except the input layers (they only hold the input's
    dtype) and the layer that produces the output, which stays float32 so that scores are
    float32 and the softmax is not computed on 8-bit mantissas.
    """
    if precision == "float32":
        return model
    policy = MIXED_POLICIES[precision]
    output_layer = model.outputs[0]._keras_history.operation if hasattr(model, "outputs") else None
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, (keras.layers.InputLayer, keras.Model)):
            continue
        layer.dtype_policy = policy
    _keep_output_float32(output_layer)
    return model


def _keep_output_float32(layer) -> None:
    """The output layer (or, for a nested model, its own output layer) computes in float32."""
    while isinstance(layer, keras.Model):
        layer = layer.outputs[0]._keras_history.operation
    if layer is not None and not isinstance(layer, keras.layers.InputLayer):
        layer.dtype_policy = "float32"
