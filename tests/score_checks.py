"""The one comparison of score maps the engine's exactness tests use: every value within `tol`
of the reference's scale, on a reference that varies (a constant output must not pass)."""

from __future__ import annotations

import numpy as np


def assert_close_scaled(actual, expected, tol: float = 1e-4, min_spread: float = 1e-3) -> None:
    """|actual - expected| <= tol * max|expected| everywhere; the reference's standard deviation
    must exceed `min_spread` of its scale (random-weight models give narrow but real spreads)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = float(np.abs(expected).max())
    assert scale > 0, "reference is all zeros: the comparison would be meaningless"
    assert float(expected.std()) > min_spread * scale, "reference scores are (nearly) constant"
    err = float(np.abs(actual - expected).max())
    assert err <= tol * scale, f"max error {err:.3g} > {tol:g} x scale {scale:.3g}"
