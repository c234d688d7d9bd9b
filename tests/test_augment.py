"""The paper's augmentation (``fsg_endo.data.augment``) against albumentations' steps with the same parameters."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pytest

from fsg_endo.data.augment import NOISE_STD, AugmentParams, PaperAugmentd, augment, draw_params, jitter, warp

RNG = np.random.default_rng(0)
CROP = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
TISSUE = np.clip(
    np.stack(
        [
            180 + 30 * RNG.standard_normal((64, 64)),
            90 + 20 * RNG.standard_normal((64, 64)),
            70 + 15 * RNG.standard_normal((64, 64)),
        ],
        -1,
    ),
    0,
    255,
).astype(np.uint8)


def albumentations(steps: list, image: np.ndarray) -> np.ndarray:
    return A.Compose(steps, seed=0, strict=True)(image=image)["image"]


def fixed_jitter(**factors: tuple[float, float]) -> A.ColorJitter:
    """albumentations' ColorJitter with every factor fixed (identity unless given)."""
    ranges = {"brightness": (1.0, 1.0), "contrast": (1.0, 1.0), "saturation": (1.0, 1.0), "hue": (0.0, 0.0)}
    return A.ColorJitter(**(ranges | factors), p=1.0)


@pytest.mark.parametrize(
    ("angle", "hflip", "vflip"), [(0.0, False, False), (17.0, False, False), (-25.0, True, False), (10.0, True, True)]
)
def test_warp_is_albumentations_rotation_then_flips(angle, hflip, vflip):
    steps = [A.Rotate(limit=(angle, angle), border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0)]
    steps += [A.HorizontalFlip(p=1.0)] * hflip + [A.VerticalFlip(p=1.0)] * vflip
    diff = np.abs(albumentations(steps, CROP).astype(int) - warp(CROP, angle, hflip, vflip).astype(int))
    assert diff.max() <= 1 and diff.mean() < 1e-2


@pytest.mark.parametrize(
    ("name", "value", "step"),
    [("brightness", 1.12, 0), ("contrast", 0.88, 1), ("saturation", 1.13, 2), ("hue", -0.007, 3)],
)
def test_each_jitter_factor_is_albumentations_colour_jitter(name, value, step):
    params = AugmentParams(**{name: value}, order=(step,), photometric=True)
    reference = albumentations([fixed_jitter(**{name: (value, value)})], TISSUE)
    assert np.array_equal(jitter(TISSUE, params), reference)


def test_jitter_applies_its_steps_in_the_drawn_order():
    params = AugmentParams(
        brightness=1.14, contrast=0.86, saturation=1.1, hue=0.008, order=(3, 1, 0, 2), photometric=True
    )
    steps = [
        fixed_jitter(hue=(0.008, 0.008)),
        fixed_jitter(contrast=(0.86, 0.86)),
        fixed_jitter(brightness=(1.14, 1.14)),
        fixed_jitter(saturation=(1.1, 1.1)),
    ]
    assert np.array_equal(jitter(TISSUE, params), albumentations(steps, TISSUE))
    assert not np.array_equal(
        jitter(TISSUE, params),
        jitter(
            TISSUE,
            AugmentParams(
                brightness=1.14, contrast=0.86, saturation=1.1, hue=0.008, order=(0, 1, 2, 3), photometric=True
            ),
        ),
    )


def test_noise_is_added_as_albumentations_adds_it_to_uint8():
    """albumentations' GaussNoise of std 0.01 of the range adds N(0, 2.55) truncated towards zero."""
    grey = np.full((64, 64, 3), 128, np.uint8)
    params = AugmentParams(photometric=True, noise_seed=7)
    ours = augment(grey, params).astype(float) - 128
    reference = albumentations([A.GaussNoise(std_range=(0.01, 0.01), p=1.0)], grey).astype(float) - 128
    expected = np.trunc(np.random.default_rng(0).normal(0.0, NOISE_STD, 10**6)).std()
    assert abs(ours.mean()) < 0.1 and abs(ours.std() - expected) < 0.1 and abs(reference.std() - expected) < 0.1
    assert np.array_equal(augment(grey, params), augment(grey, params))
    assert not np.array_equal(augment(grey, params), augment(grey, AugmentParams(photometric=True, noise_seed=8)))


def test_draws_cover_the_papers_ranges():
    rng = np.random.default_rng(1)
    draws = [draw_params(rng) for _ in range(2000)]
    angles = np.array([d.angle for d in draws])
    assert angles.min() >= -30 and angles.max() <= 30 and angles.min() < -29 and angles.max() > 29
    assert 0.45 < np.mean([d.hflip for d in draws]) < 0.55 and 0.45 < np.mean([d.vflip for d in draws]) < 0.55
    for name, half in (("brightness", 0.15), ("contrast", 0.15), ("saturation", 0.15), ("hue", 0.01)):
        values = np.array([getattr(d, name) for d in draws])
        centre = 0.0 if name == "hue" else 1.0
        assert np.all(np.abs(values - centre) <= half) and np.abs(values - centre).max() > 0.95 * half
    assert len({d.order for d in draws}) == 24  # every order of the four jitter steps
    geometric = draw_params(np.random.default_rng(1), photometric=False)
    assert not geometric.photometric and geometric.angle == draws[0].angle


def test_the_transform_is_reproducible_by_seed_and_geometric_only_keeps_the_pixels():
    aug = PaperAugmentd("image", seed=3)
    first, second = aug({"image": CROP})["image"], aug({"image": CROP})["image"]
    assert not np.array_equal(first, second)  # the next draw differs
    assert np.array_equal(aug.set_random_state(seed=3)({"image": CROP})["image"], first)
    flat = np.full((64, 64, 3), (200, 50, 30), np.uint8)
    geometric = PaperAugmentd("image", photometric=False, seed=0)({"image": flat})["image"]
    assert np.array_equal(geometric[24:40, 24:40], flat[24:40, 24:40])  # the centre survives any rotation
