"""The endoscopist's camera path through one colon: cruise along the lumen, approach and inspect each polyp.

Inspection distances are drawn partly independent of the polyp's size and partly so as to frame it
(close to small polyps, farther from large ones), as in clinical videos: the box size alone is then
an ambiguous cue for the physical size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.interpolate import PchipInterpolator

from fsg_endo.synth.render import Pose, look_at
from fsg_endo.synth.scene import Polyp, Wall

LOOK_AHEAD_MM = 80.0
FRAMING_PX = (30.0, 110.0)  # apparent diameter the endoscopist aims for at the closest approach
CLOSEST_MM = (4.0, 45.0)


@dataclass(frozen=True)
class CameraPath:
    """Per-frame camera positions, look-at targets and roll angles."""

    positions: np.ndarray  # (T, 3) mm
    targets: np.ndarray  # (T, 3) mm
    rolls: np.ndarray  # (T,) rad

    def __len__(self) -> int:
        return len(self.positions)

    def pose(self, t: int) -> Pose:
        return look_at(self.positions[t], self.targets[t], float(self.rolls[t]))


def closest_distance(rng: np.random.Generator, polyp: Polyp, focal_px: float) -> float:
    """Closest inspection distance (mm): geometric mean of a framing distance and a size-free one."""
    framing = focal_px * polyp.size_mm / rng.uniform(*FRAMING_PX)
    free = np.exp(rng.uniform(*np.log(CLOSEST_MM)))
    return float(np.clip(np.sqrt(framing * free), CLOSEST_MM[0], CLOSEST_MM[1]) + polyp.height_mm * 0.3)


def _axis_point(rng: np.random.Generator, z: float, radius: float, spread: float = 0.25) -> np.ndarray:
    """A point near the lumen axis at ``z`` (the endoscope seldom runs exactly centred)."""
    r, a = radius * spread * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
    return np.array([r * np.cos(a), r * np.sin(a), z])


def _viewpoint(apex: np.ndarray, distance: float, tilt: float, azimuth: float, radius: float) -> np.ndarray:
    """Camera position ``distance`` from the polyp apex, ``tilt`` from the wall normal, kept inside the lumen."""
    inward = -np.array([apex[0], apex[1], 0.0]) / np.hypot(apex[0], apex[1])
    side = np.cross(inward, [0.0, 0.0, 1.0])
    tilt = max(tilt, float(np.arccos(min(1.0, 1.1 * radius / distance))))
    back = np.cos(azimuth) * np.array([0.0, 0.0, -1.0]) + np.sin(azimuth) * side
    return apex + distance * (np.cos(tilt) * inward + np.sin(tilt) * back)


def _aim(rng: np.random.Generator, apex: np.ndarray, distance: float) -> np.ndarray:
    """Look-at point near the apex: the polyp is kept in view, not exactly centred."""
    return apex + rng.normal(0.0, 0.25 * distance, 3)


def _keyframes(
    rng: np.random.Generator, wall: Wall, polyps: list[Polyp], focal_px: float, speed: float
) -> tuple[list[float], list[np.ndarray], list[np.ndarray]]:
    """Times (frames), positions and targets of the path's keyframes."""
    radius = wall.radius_mean
    start = _axis_point(rng, polyps[0].z - rng.uniform(30.0, 50.0), radius)
    times, positions, targets = [0.0], [start], [_axis_point(rng, start[2] + LOOK_AHEAD_MM, radius, 0.5)]

    def add(position: np.ndarray, target: np.ndarray, frames: float | None = None) -> None:
        travel = np.linalg.norm(position - positions[-1]) / speed if frames is None else frames
        times.append(times[-1] + max(float(travel), 2.0))
        positions.append(position)
        targets.append(target)

    for polyp in polyps:
        apex = wall.surface(polyp.z, polyp.theta)[0]
        closest = closest_distance(rng, polyp, focal_px)
        tilt, azimuth = rng.uniform(0.2, 1.0), rng.normal(0.0, 0.4)
        for distance, frames in (
            (closest * rng.uniform(2.5, 4.0), None),
            (closest, rng.uniform(8, 20)),
            (closest * rng.uniform(1.2, 2.0), rng.uniform(4, 10)),
        ):
            add(_viewpoint(apex, distance, tilt, azimuth, radius), _aim(rng, apex, distance), frames)
        leave = _axis_point(rng, polyp.z + rng.uniform(5.0, 15.0), radius)
        add(leave, _axis_point(rng, leave[2] + LOOK_AHEAD_MM, radius, 0.5))
    end = _axis_point(rng, positions[-1][2] + speed * rng.uniform(1, 3), radius)
    add(end, _axis_point(rng, end[2] + LOOK_AHEAD_MM, radius, 0.5))
    return times, positions, targets


def _smooth_noise(rng: np.random.Generator, n: int, scale: float, smooth: float) -> np.ndarray:
    """Gaussian-smoothed white noise of std about ``scale`` (hand tremor, slow roll)."""
    width = max(1, int(3 * smooth))
    kernel = np.exp(-0.5 * (np.arange(-width, width + 1) / smooth) ** 2)
    noise = np.convolve(rng.standard_normal(n + 2 * width), kernel / np.sqrt((kernel**2).sum()), "valid")
    return scale * noise


def plan_path(
    rng: np.random.Generator, wall: Wall, polyps: list[Polyp], focal_px: float, frames: int | None = None
) -> CameraPath:
    """The camera path of one video; ``frames`` resamples it to that many frames (else one per time step)."""
    speed = rng.uniform(6.0, 10.0)
    times, positions, targets = _keyframes(rng, wall, polyps, focal_px, speed)
    n = frames or int(times[-1]) + 1
    t = np.linspace(0.0, times[-1], n)
    pos = PchipInterpolator(times, np.array(positions))(t)
    tgt = PchipInterpolator(times, np.array(targets))(t)
    tremor = np.stack([_smooth_noise(rng, n, 0.6, 2.0) for _ in range(3)], axis=1)
    tgt = tgt + tremor * np.linalg.norm(tgt - pos, axis=1, keepdims=True) * 0.03
    rolls = rng.uniform(-np.pi, np.pi) + _smooth_noise(rng, n, 0.3, 8.0)
    return CameraPath(_inside_lumen(wall, pos), tgt, rolls)


def _inside_lumen(wall: Wall, positions: np.ndarray, margin: float = 3.0) -> np.ndarray:
    """Pull camera positions toward the axis where they would sit in the wall or a fold."""
    theta = np.arctan2(positions[:, 1], positions[:, 0]) % (2 * np.pi)
    rho = np.hypot(positions[:, 0], positions[:, 1])
    limit = np.min([wall.radius_at(positions[:, 2] + dz, theta) for dz in (-2.0, 0.0, 2.0)], axis=0) - margin
    scale = np.where(rho > limit, limit / np.maximum(rho, 1e-9), 1.0)
    out = positions.copy()
    out[:, :2] *= scale[:, None]
    return out
