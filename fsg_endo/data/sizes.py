"""Polyp size classes and the regression target scaling (docs/interfaces.md#size-classes)."""

from __future__ import annotations

import numpy as np

SIZE_MIN_MM, SIZE_MAX_MM = 0.5, 20.0
CLASS3_NAMES = ("diminutive", "small", "large")  # <=5, (5, 10), >=10 mm
CLASS2_NAMES = ("<10mm", ">=10mm")


def size_class3(size_mm):
    """Triclass: diminutive ``size <= 5`` -> 0, small ``5 < size < 10`` -> 1, large ``size >= 10`` -> 2."""
    s = np.asarray(size_mm, dtype=float)
    out = np.where(s <= 5.0, 0, np.where(s < 10.0, 1, 2))
    return out if out.ndim else int(out)


def size_class2(size_mm):
    """Binary: ``size < 10`` -> 0, ``size >= 10`` -> 1."""
    s = np.asarray(size_mm, dtype=float)
    out = (s >= 10.0).astype(int)
    return out if out.ndim else int(out)


def scale_size(size_mm):
    """Map mm linearly from [0.5, 20] to [-1, 1] (the training target of ``size_regression``)."""
    return 2.0 * (np.asarray(size_mm, dtype=float) - SIZE_MIN_MM) / (SIZE_MAX_MM - SIZE_MIN_MM) - 1.0


def unscale_size(y):
    """Inverse of :func:`scale_size`: model output in [-1, 1] back to mm."""
    return (np.asarray(y, dtype=float) + 1.0) * (SIZE_MAX_MM - SIZE_MIN_MM) / 2.0 + SIZE_MIN_MM
