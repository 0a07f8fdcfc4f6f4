"""The NAIVE "seed" recipes, re-implemented faithfully - kept ONLY as the benchmark baseline.

Do not use these anywhere else. They reproduce, on purpose, every defect listed in
``DESIGN.md`` ("Known defects of the naive recipe") that the engine (``worker.inference.tiled``,
``worker.inference.direct``) does not have:

* pixels scaled by ``/255`` whatever the model expects (VGG16 wants caffe-style BGR mean
  subtraction, ``worker.inference.preprocess.get_preprocess("caffe")``);
* windows at the right and bottom edges skipped (``range(0, H - window, stride)``: exclusive
  upper bound, and no window flush with the border);
* overlapping windows overwrite each other instead of being combined;
* an ``H x W x num_classes`` float32 output (4 GB at 1024x1024 with 1000 classes);
* one ``model.predict`` call per window (no batching; per-call overhead every window);
* the whole image through the fully convolutional model in one pass, so activations grow
  with the image (VGG16 block1 at 8192x8192 is 17 GB per tensor): out of memory on large
  images.
"""

from __future__ import annotations

import numpy as np


def seed_sliding_window(
    model, image_uint8: np.ndarray, window: int = 224, stride: int = 112, num_classes: int = 1000
) -> tuple[np.ndarray, int]:
    """Naive sliding window: returns ``(heatmap (H, W, num_classes) float32, windows run)``."""
    image = image_uint8 / 255  # wrong preprocessing for VGG16 (and float64), as in the seed
    height, width = image.shape[:2]
    heatmap = np.zeros((height, width, num_classes), dtype=np.float32)
    count = 0
    for y in range(0, height - window, stride):  # edge windows skipped
        for x in range(0, width - window, stride):
            crop = image[y : y + window, x : x + window]
            scores = model.predict(crop[None], verbose=0)[0]  # one predict per window
            heatmap[y : y + window, x : x + window] = scores  # overlaps overwrite
            count += 1
    return heatmap, count


def seed_whole_image_direct(fcn_model, image_uint8: np.ndarray) -> np.ndarray:
    """Naive direct mode: the whole image /255 through the FCN in one ``predict`` call."""
    image = image_uint8 / 255
    return fcn_model.predict(image[None], verbose=0)[0]
