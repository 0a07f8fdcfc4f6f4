"""Image -> score grid (Keras): the model registry, the fully convolutional conversion, direct
and tiled inference, row streaming, preprocessing, precision, the plan and the masks.
Nothing here writes files; ``worker.grid.ScoreGrid`` is what it hands on."""
