"""The paper's training augmentation of a uint8 crop: one affine warp, then albumentations' pixel functions.

Rotation +-30 deg (zero fill), horizontal and vertical flips, colour jitter (brightness, contrast, saturation
+-15 %, hue +-0.01, in random order, as torchvision's ``ColorJitter``) and Gaussian noise of std 0.01 of the
range: albumentations' ``Rotate``, flips, ``ColorJitter`` and ``GaussNoise``, which the pipeline composed
before (tests/test_augment.py holds them side by side). The parameters are drawn here and the pixels go
through the same OpenCV warp and albumentations' own pixel functions: on the 64 px crops of the CPU default,
the transforms' per-call bookkeeping (parameter checks, seeding, dispatch) was about 40 % of the time per
crop, and every training item is augmented once per epoch (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from albumentations.augmentations.pixel import functional as fpixel
from monai.transforms import MapTransform, Randomizable
from monai.utils import MAX_SEED

ROTATION_DEG = 30.0
JITTER = 0.15  # brightness, contrast and saturation factors in [1 - JITTER, 1 + JITTER]
HUE = 0.01  # hue shift, a fraction of the colour circle
NOISE_STD = 0.01 * 255.0


@dataclass(frozen=True)
class AugmentParams:
    """One draw of the augmentation: the geometry and, when ``photometric``, the jitter factors (applied in
    ``order``) and the noise's seed."""

    angle: float = 0.0
    hflip: bool = False
    vflip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    order: tuple[int, ...] = (0, 1, 2, 3)  # indices into (brightness, contrast, saturation, hue)
    photometric: bool = False
    noise_seed: int = 0


def draw_params(rng: np.random.Generator, photometric: bool = True) -> AugmentParams:
    """A random draw of the paper's augmentation (geometry only when ``photometric`` is False)."""
    angle = float(rng.uniform(-ROTATION_DEG, ROTATION_DEG))
    hflip, vflip = (bool(f) for f in rng.random(2) < 0.5)
    if not photometric:
        return AugmentParams(angle, hflip, vflip)
    b, c, s = (float(f) for f in rng.uniform(1.0 - JITTER, 1.0 + JITTER, size=3))
    return AugmentParams(
        angle,
        hflip,
        vflip,
        b,
        c,
        s,
        float(rng.uniform(-HUE, HUE)),
        tuple(int(i) for i in rng.permutation(4)),
        True,
        int(rng.integers(MAX_SEED)),
    )


def warp(image: np.ndarray, angle: float, hflip: bool, vflip: bool) -> np.ndarray:
    """Rotate by ``angle`` degrees about the centre (bilinear, zero fill), then mirror: one ``warpAffine``."""
    h, w = image.shape[:2]
    rotate = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
    if hflip:  # x -> (w - 1) - x after the rotation
        rotate[0] = [-rotate[0, 0], -rotate[0, 1], w - 1 - rotate[0, 2]]
    if vflip:
        rotate[1] = [-rotate[1, 0], -rotate[1, 1], h - 1 - rotate[1, 2]]
    return cv2.warpAffine(image, rotate, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


# albumentations' pixel functions, given parameters drawn here: the library's uint8 arithmetic, without
# the per-call bookkeeping of its transforms
_JITTER_STEPS = (
    fpixel.adjust_brightness_torchvision,
    fpixel.adjust_contrast_torchvision,
    fpixel.adjust_saturation_torchvision,
    fpixel.adjust_hue_torchvision,
)


def jitter(image: np.ndarray, p: AugmentParams) -> np.ndarray:
    """Colour jitter of a uint8 RGB image: brightness, contrast, saturation and hue in ``p.order``."""
    factors = (p.brightness, p.contrast, p.saturation, p.hue)
    for step in p.order:
        image = _JITTER_STEPS[step](image, factors[step])
    return image


def noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Gaussian noise of std :data:`NOISE_STD` from its own seed (torch's generator: twice numpy's speed)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).mul_(NOISE_STD).numpy()


def augment(image: np.ndarray, p: AugmentParams) -> np.ndarray:
    """``image`` (uint8 HWC RGB) augmented by the draw ``p``: warp, then jitter and noise when photometric.

    The noise is added as albumentations' ``GaussNoise`` adds it to uint8 (each value truncated towards zero,
    so its effective std is about 2.19 rather than 2.55)."""
    out = warp(image, p.angle, p.hflip, p.vflip)
    if not p.photometric:
        return out
    return fpixel.add_noise(jitter(out, p), noise(out.shape, p.noise_seed))


class PaperAugmentd(Randomizable, MapTransform):
    """The paper's augmentation of ``image``, one draw per call from a numpy Generator.

    Reseeded per item by MONAI's ``set_random_state`` (see :mod:`fsg_endo.data.epochs`): a Generator
    costs microseconds, a RandomState about 0.1 ms. ``photometric=False`` keeps the rotation and flips only:
    they leave the brightness, colour and texture energy, which are cues of the distance, as rendered.
    """

    def __init__(self, keys: str | Sequence[Hashable] = "image", photometric: bool = True, seed: int = 0) -> None:
        MapTransform.__init__(self, keys)
        self.photometric = photometric
        self.set_random_state(seed=seed)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> PaperAugmentd:
        """A Generator from ``seed`` (or a draw of ``state``, else fresh entropy)."""
        if seed is None:
            seed = int((state if state is not None else np.random.RandomState()).randint(MAX_SEED))
        self.rng = np.random.default_rng(int(seed) % MAX_SEED)
        return self

    def randomize(self, data: Any = None) -> None:
        self.params = draw_params(self.rng, self.photometric)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        self.randomize()
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = augment(np.asarray(d[key]), self.params)
        return d
