"""The paper's training augmentation of a uint8 crop, in one affine warp and a few array operations.

Rotation +-30 deg (zero fill), horizontal and vertical flips, colour jitter (brightness, contrast, saturation
+-15 %, hue +-0.01, in random order, as torchvision's ``ColorJitter``) and Gaussian noise of std 0.01 of the
range. The same steps as albumentations' ``Rotate``, flips, ``ColorJitter`` and ``GaussNoise``; on the
64 px crops of the CPU default, albumentations' per-call bookkeeping costs about five times the pixel work
(benchmarks/README.md), and every training item is augmented once per epoch.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable
from monai.utils import MAX_SEED

ROTATION_DEG = 30.0
JITTER = 0.15  # brightness, contrast and saturation factors in [1 - JITTER, 1 + JITTER]
HUE = 0.01  # hue shift, a fraction of the colour circle
NOISE_STD = 0.01 * 255.0
_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma, as torchvision


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
    return AugmentParams(angle, hflip, vflip, b, c, s, float(rng.uniform(-HUE, HUE)),
                         tuple(int(i) for i in rng.permutation(4)), True, int(rng.integers(MAX_SEED)))


def warp(image: np.ndarray, angle: float, hflip: bool, vflip: bool) -> np.ndarray:
    """Rotate by ``angle`` degrees about the centre (bilinear, zero fill), then mirror: one ``warpAffine``."""
    h, w = image.shape[:2]
    rotate = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
    if hflip:  # x -> (w - 1) - x after the rotation
        rotate[0] = [-rotate[0, 0], -rotate[0, 1], w - 1 - rotate[0, 2]]
    if vflip:
        rotate[1] = [-rotate[1, 0], -rotate[1, 1], h - 1 - rotate[1, 2]]
    return cv2.warpAffine(image, rotate, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


def _grey(x: np.ndarray) -> np.ndarray:
    """The luma of an RGB float32 image, (H, W)."""
    return cv2.transform(x, _GREY[None])


def _hue(x: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue by ``shift`` of the colour circle, in float HSV (OpenCV: hue in degrees)."""
    hsv = cv2.cvtColor(x * (1.0 / 255.0), cv2.COLOR_RGB2HSV)
    hue = hsv[..., 0]
    hue += 360.0 * shift
    np.mod(hue, 360.0, out=hue)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0


def jitter(x: np.ndarray, p: AugmentParams) -> np.ndarray:
    """Colour jitter of a float32 RGB image in [0, 255], clipped after each step (torchvision's blends:
    contrast towards the mean grey level, saturation towards each pixel's grey). OpenCV's arithmetic: on
    arrays this small, numpy's broadcasting costs several times more."""
    for step in p.order:
        if step == 0:
            x = cv2.addWeighted(x, p.brightness, x, 0.0, 0.0)
        elif step == 1:
            x = cv2.addWeighted(x, p.contrast, x, 0.0, (1.0 - p.contrast) * cv2.mean(_grey(x))[0])
        elif step == 2:
            x = cv2.addWeighted(x, p.saturation, cv2.cvtColor(_grey(x), cv2.COLOR_GRAY2RGB), 1.0 - p.saturation, 0.0)
        elif p.hue:
            x = _hue(x, p.hue)
        np.clip(x, 0.0, 255.0, out=x)
    return x


def noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Gaussian noise of std :data:`NOISE_STD`, from its own seed (torch's generator: twice numpy's speed)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).mul_(NOISE_STD).numpy()


def augment(image: np.ndarray, p: AugmentParams) -> np.ndarray:
    """``image`` (uint8 HWC RGB) augmented by the draw ``p``: warp, jitter, noise, back to uint8."""
    out = warp(image, p.angle, p.hflip, p.vflip)
    if not p.photometric:
        return out
    x = jitter(out.astype(np.float32), p)
    x += noise(x.shape, p.noise_seed)
    return np.rint(np.clip(x, 0.0, 255.0, out=x)).astype(np.uint8)


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

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None
                         ) -> PaperAugmentd:
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
