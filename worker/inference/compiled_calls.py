"""The engine's network calls as compiled functions of one fixed input shape.

Calling a Keras model eagerly on TensorFlow dispatches layer by layer from Python; a
``tf.function`` traced once for an input shape runs the same layers as one graph (the issue's
measurement: VGG16 bf16 at 2048x2048, 7.86 s compiled against 8.41 s eager and 10.28 s through
``predict``). Every call site of the engine (trunk tiles, the rows scheme's stages, the head,
tiled batches) goes through ``compiled_call``, which keeps one traced function per
(owner, call site, input shape and dtype) on the owner object itself - the warm model copy the
registry keeps per (model, precision) - so a worker's second job of the same shape reuses the
traced graph instead of tracing again, and the functions are dropped with the model.

The input signature is the exact shape (no ``None`` dimension): TensorFlow then picks its
kernels for that shape, and a different shape is a new trace, bounded per call site by
``MAX_SHAPES_PER_SITE`` (least recently used dropped), so that a mask's many column-run widths
or a worker serving many image sizes never grow the cache without end. ``jit_compile`` stays
off: XLA on CPU was not measured faster for these convolutions, and it would compile per shape.

On JAX the trunk already runs as one ``jax.jit`` program (``worker.inference.fcn.JaxCompiledTrunk``);
the other sites are called as they are there (docs/engine.md). The setting
``COMPILED_CALLS=false`` (``shared.settings``) turns compiled calls off (every site eager), for
comparing the two.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import keras

from shared.settings import get_settings

#: Traced shapes kept per (owner, call site); the least recently used one is dropped beyond it.
MAX_SHAPES_PER_SITE = 16

_ATTRIBUTE = "_compiled_calls"
_LOCK = threading.Lock()
# Traces made in this process (every new shape of every site): the no-retrace test reads it.
_TRACES = {"count": 0}


def compiled_calls_enabled() -> bool:
    """Whether call sites compile (TensorFlow backend, not switched off by the setting ``COMPILED_CALLS``)."""
    return keras.backend.backend() == "tensorflow" and get_settings().compiled_calls


def trace_count() -> int:
    """How many times any call site was traced in this process (a new shape or a new owner)."""
    return _TRACES["count"]


def compiled_call(owner, site: str, fn: Callable, x):
    """``fn(x)`` run as a function compiled for ``x``'s shape and dtype, cached on `owner`.

    `owner` is the long-lived object the function's weights belong to (a model, a converted
    network); `site` names the call within it (one owner may hold several). `fn` must be
    the same computation every time for one (owner, site): only the first one is traced.
    """
    if not compiled_calls_enabled():
        return fn(x)
    import tensorflow as tf

    x = tf.convert_to_tensor(x)
    key = (site, tuple(int(d) for d in x.shape), x.dtype.name)
    sites = _site_cache(owner)
    with _LOCK:
        compiled = sites.get(key)
        if compiled is None:
            compiled = sites[key] = _trace(fn, x)
            _evict(sites, site)
        else:
            sites.move_to_end(key)
    return compiled(x)


def _site_cache(owner) -> OrderedDict:
    """The owner's traced functions; set past Keras' attribute tracking (it is no layer state)."""
    cache = owner.__dict__.get(_ATTRIBUTE)
    if cache is None:
        with _LOCK:
            cache = owner.__dict__.get(_ATTRIBUTE)
            if cache is None:
                cache = OrderedDict()
                object.__setattr__(owner, _ATTRIBUTE, cache)
    return cache


def _trace(fn: Callable, x):
    """A ``tf.function`` of `fn` with `x`'s exact shape as its signature, traced now."""
    import tensorflow as tf

    def body(t):
        _TRACES["count"] += 1  # runs at trace time only
        return fn(t)

    compiled = tf.function(body, input_signature=[tf.TensorSpec(x.shape, x.dtype)], jit_compile=False, autograph=False)
    compiled.get_concrete_function()
    return compiled


def _evict(sites: OrderedDict, site: str) -> None:
    """Drop the least recently used shapes of `site` beyond ``MAX_SHAPES_PER_SITE``."""
    keys = [key for key in sites if key[0] == site]
    for key in keys[: max(0, len(keys) - MAX_SHAPES_PER_SITE)]:
        del sites[key]
