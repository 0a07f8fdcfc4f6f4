"""Model input preprocessing, applied exactly as each model was trained.

The naive recipe divides by 255 whatever the model; VGG16 was trained on caffe-style input
(BGR order, ImageNet channel means subtracted, no scaling), so that recipe feeds it inputs it
has never seen. Each model declares its mode in its sidecar; these are the four Keras uses.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from shared.catalog import PREPROCESS_MODES

_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)
_TORCH_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_TORCH_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _none(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32)


def _tf(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32) / 127.5 - 1.0


def _caffe(pixels: np.ndarray) -> np.ndarray:
    return pixels[..., ::-1].astype(np.float32) - _CAFFE_MEAN_BGR


def _torch(pixels: np.ndarray) -> np.ndarray:
    return (pixels.astype(np.float32) / 255.0 - _TORCH_MEAN) / _TORCH_STD


_FUNCTIONS = {"none": _none, "tf": _tf, "caffe": _caffe, "torch": _torch}


def get_preprocess(mode: str) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 RGB (..., 3) -> float32 model input, for one of PREPROCESS_MODES."""
    try:
        return _FUNCTIONS[mode]
    except KeyError:
        raise ValueError(f"unknown preprocess mode {mode!r}; expected one of {', '.join(PREPROCESS_MODES)}") from None
