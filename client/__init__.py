"""The client side: an HTTP client of the service and the ``heatmap`` command line.

Its own package because it belongs to neither side of the service: ``shared/`` is what the
API and the worker share, ``worker/`` needs TensorFlow. A laptop that only submits images
needs none of that, so nothing here imports TensorFlow or Keras (tested), and the commands
start in a fraction of a second. ``heatmap infer`` (the engine run locally) is the one
command that loads the worker, lazily.
"""
