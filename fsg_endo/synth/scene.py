"""The procedural colon of one video: wall geometry, mucosa texture and polyps, as (z, theta) tables.

All lengths are physical (mm). Texture scales are physical too, but drawn per patient (vessel spacing
and calibre, mucosal grain) and per polyp (pit scale and pattern), so no texture is a ruler of one
fixed length across videos: the size must be read from the scene, not from one texel.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

TEXEL_MM = 0.2
THETA_STEP = 120  # n_theta is a multiple of this, so periodic noise cells divide it
SCALE_RANGE = (0.7, 1.4)  # log-uniform factor of a patient's texture scales and vessel calibre


def log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """A draw whose logarithm is uniform between log ``low`` and log ``high``."""
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


@dataclass(frozen=True)
class Patient:
    """Anatomy and mucosa appearance of one colon (one video)."""

    radius_mm: float
    mucosa: tuple[float, float, float]  # linear BGR albedo
    vessel: tuple[float, float, float]
    vessel_contrast: float
    fold_height_mm: float
    fold_spacing_mm: float
    texture_scale: float = 1.0  # multiplies every mucosal texture cell (vessel spacing, grain, relief)
    vessel_calibre: float = 1.0  # multiplies the vessel line width


@dataclass(frozen=True)
class Polyp:
    """A sessile polyp on the wall: an elliptic dome whose largest diameter is ``size_mm``."""

    lesion_id: str
    size_mm: float
    z: float
    theta: float
    height_mm: float
    aspect: float  # minor / major axis
    orientation: float  # major axis angle on the unrolled wall
    color: tuple[float, float, float]  # linear BGR albedo
    histology: str = "AD"
    pit_mm: float = 0.6  # cell of the pit pattern on the dome
    pit_contrast: float = 0.2
    pit_lines: float = 0.0  # surface pattern: 0 round pits (spots) ... 1 gyrus-like lines


@dataclass
class Wall:
    """Tables over (z, theta) of one colon: radius, slopes and polyp coverage, albedo near and far."""

    z0: float
    dz: float
    n_theta: int
    radius_mean: float
    radius: np.ndarray  # (Nz, Ntheta) mm
    geometry: np.ndarray  # (Nz, Ntheta, 4): radius, dR/dz, dR/ds, polyp coverage
    albedo: np.ndarray  # (Nz, Ntheta, 4) uint8: linear BGR albedo and wetness (specular strength), x255
    row_min: np.ndarray  # (Nz,) smallest radius of each row

    def inner_radius(self, z: float, ahead_mm: float) -> float:
        """Smallest wall radius between ``z - 10`` and ``z + ahead_mm``: no ray from the axis meets the wall sooner."""
        lo = int(np.clip((z - 10.0 - self.z0) / self.dz, 0, len(self.row_min) - 1))
        hi = int(np.clip((z + ahead_mm - self.z0) / self.dz, lo + 1, len(self.row_min)))
        return float(self.row_min[lo:hi].min())

    def radius_at(self, z: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """Wall radius (mm) at axial positions ``z`` and angles ``theta`` (nearest texel)."""
        z, theta = np.atleast_1d(z).astype(float), np.atleast_1d(theta).astype(float)
        row = np.clip(np.round((z - self.z0) / self.dz).astype(int), 0, self.radius.shape[0] - 1)
        col = np.round(theta / (2 * np.pi) * self.n_theta).astype(int) % self.n_theta
        return self.radius[row, col].astype(float)

    def surface(self, z: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """World points (N, 3) on the wall at axial positions ``z`` and angles ``theta``."""
        z, theta = np.atleast_1d(z).astype(float), np.atleast_1d(theta).astype(float)
        r = self.radius_at(z, theta)
        return np.stack([r * np.cos(theta), r * np.sin(theta), z], axis=1)


def sample_patient(rng: np.random.Generator) -> Patient:
    """Draw one colon's anatomy and colours (patients differ in calibre, folds, mucosa tint, vessels,
    texture scale and vessel calibre)."""
    mucosa = np.array([0.12, 0.22, 0.85]) * rng.uniform(0.85, 1.15, 3)
    vessel = np.array([0.05, 0.04, 0.35]) * rng.uniform(0.7, 1.3, 3)
    return Patient(
        radius_mm=float(rng.uniform(17.0, 24.0)),
        mucosa=tuple(mucosa),
        vessel=tuple(vessel),
        vessel_contrast=float(rng.uniform(0.6, 1.0)),
        fold_height_mm=float(rng.uniform(2.5, 6.0)),
        fold_spacing_mm=float(rng.uniform(20.0, 32.0)),
        texture_scale=log_uniform(rng, *SCALE_RANGE),
        vessel_calibre=log_uniform(rng, *SCALE_RANGE),
    )


def _divisor_near(n: int, target: float) -> int:
    """The divisor of ``n`` closest to ``target`` (in log scale)."""
    divisors = np.array([k for k in range(1, n + 1) if n % k == 0])
    return int(divisors[np.argmin(np.abs(np.log(divisors / max(target, 1.0))))])


def periodic_noise(rng: np.random.Generator, shape: tuple[int, int], cell_mm: float) -> np.ndarray:
    """Smooth value noise of unit std with features of ``cell_mm``, periodic along axis 1 (theta)."""
    nz, nt = shape
    cz = max(1, round(cell_mm / TEXEL_MM))
    ct = _divisor_near(nt, cell_mm / TEXEL_MM)
    coarse = rng.standard_normal((-(-nz // cz) + 4, nt // ct)).astype(np.float32)
    if cz == 1 and ct == 1:
        return coarse[:nz]
    coarse = np.concatenate([coarse[:, -2:], coarse, coarse[:, :2]], axis=1)
    fine = cv2.resize(coarse, (coarse.shape[1] * ct, coarse.shape[0] * cz), interpolation=cv2.INTER_CUBIC)
    fine = fine[2 * cz : 2 * cz + nz, 2 * ct : 2 * ct + nt]
    return fine / max(float(fine.std()), 1e-6)


def _fold_relief(
    rng: np.random.Generator, patient: Patient, z: np.ndarray, theta: np.ndarray, polyps: list[Polyp]
) -> np.ndarray:
    """Haustral folds: circumferential ridges between three taeniae, wavy, of varying height.

    No fold crosses a polyp (its dome would be cut), so every polyp sits in a haustrum.
    """
    relief = np.zeros((z.size, theta.size), np.float32)
    between = np.abs(np.sin(1.5 * (theta - rng.uniform(0, 2 * np.pi)))) ** 0.4
    pos = float(z[0]) + rng.uniform(0, patient.fold_spacing_mm)
    while pos < z[-1] + 10.0:
        height = patient.fold_height_mm * rng.uniform(0.5, 1.3)
        width = rng.uniform(1.5, 3.0)
        wave = rng.uniform(1.0, 4.0) * np.sin(theta + rng.uniform(0, 2 * np.pi))
        rows = np.nonzero(np.abs(z - pos) < 4 * width + 5.0)[0]
        clear = all(abs(pos - p.z) > p.size_mm / 2 + 4 * width + 5.0 for p in polyps)
        if rows.size and clear:
            dist = z[rows, None] - (pos + wave)[None, :]
            relief[rows] += (height * between * np.exp(-0.5 * (dist / width) ** 2)).astype(np.float32)
        pos += patient.fold_spacing_mm * rng.uniform(0.7, 1.3)
    return relief


def _polyp_coverage(polyp: Polyp, z: np.ndarray, theta: np.ndarray, base_radius: float) -> np.ndarray:
    """Normalised elliptic distance q (q < 1 inside the polyp) over a (z, theta) grid, in mm on the wall."""
    ds = ((theta[None, :] - polyp.theta + np.pi) % (2 * np.pi) - np.pi) * base_radius
    dz = z[:, None] - polyp.z
    c, si = np.cos(polyp.orientation), np.sin(polyp.orientation)
    major = polyp.size_mm / 2.0
    u, v = (c * dz + si * ds) / major, (-si * dz + c * ds) / (major * polyp.aspect)
    return np.sqrt(u * u + v * v)


def polyp_points(wall: Wall, polyp: Polyp, n: int = 12) -> np.ndarray:
    """World points (2n + 1, 3) on a polyp: its base outline, a ring on the dome at 60 % radius, the apex."""
    phi = np.linspace(0, 2 * np.pi, n, endpoint=False)
    c, si = np.cos(polyp.orientation), np.sin(polyp.orientation)
    major = polyp.size_mm / 2.0
    base_radius = float(wall.radius_at(polyp.z, polyp.theta)[0]) + polyp.height_mm
    z, theta = [np.array([polyp.z])], [np.array([polyp.theta])]
    for q in (1.0, 0.6):
        u, v = q * major * np.cos(phi), q * major * polyp.aspect * np.sin(phi)
        z.append(polyp.z + c * u - si * v)
        theta.append(polyp.theta + (si * u + c * v) / base_radius)
    return wall.surface(np.concatenate(z), np.concatenate(theta))


def _vessels(rng: np.random.Generator, shape: tuple[int, int], cell_mm: float, width: float) -> np.ndarray:
    """Vessel-like lines at the zero crossings of smooth noise, faded in and out by a second noise."""
    lines = np.exp(-((periodic_noise(rng, shape, cell_mm) / width) ** 2))
    fade = np.clip(0.6 + 0.5 * periodic_noise(rng, shape, 4 * cell_mm), 0.0, 1.0)
    return lines * fade


def _pit_pattern(rng: np.random.Generator, shape: tuple[int, int], polyp: Polyp) -> np.ndarray:
    """The dome's surface pattern: round pits (noise) blended with gyrus-like lines, zero mean, ~unit std."""
    spots = periodic_noise(rng, shape, polyp.pit_mm)
    lines = 3.0 * (np.exp(-((periodic_noise(rng, shape, 2.0 * polyp.pit_mm) / 0.3) ** 2)) - 0.2)
    return np.float32(1.0 - polyp.pit_lines) * spots + np.float32(polyp.pit_lines) * lines


def build_wall(rng: np.random.Generator, patient: Patient, z_start: float, z_end: float, polyps: list[Polyp]) -> Wall:
    """Tables of the colon between ``z_start`` and ``z_end`` (mm), with the polyps on its wall."""
    n_theta = THETA_STEP * max(1, round(2 * np.pi * patient.radius_mm / TEXEL_MM / THETA_STEP))
    radius_mean = n_theta * TEXEL_MM / (2 * np.pi)
    z = np.arange(z_start, z_end, TEXEL_MM, dtype=np.float32)
    theta = np.arange(n_theta, dtype=np.float32) * np.float32(2 * np.pi / n_theta)
    shape = (z.size, n_theta)

    profile = periodic_noise(rng, (z.size, THETA_STEP), 40.0)[:, :1]
    twist = periodic_noise(rng, (z.size, THETA_STEP), 60.0)[:, :1]
    radius = radius_mean * (1.0 + 0.12 * profile + 0.06 * np.cos(3 * theta[None, :] + 0.3 * twist))
    radius -= _fold_relief(rng, patient, z, theta, polyps)
    k, w = patient.texture_scale, patient.vessel_calibre
    radius -= 0.12 * periodic_noise(rng, shape, 2.4 * k) + 0.05 * periodic_noise(rng, shape, 0.6 * k)

    shade = 1.0 + 0.10 * periodic_noise(rng, shape, 6.0 * k) + 0.06 * periodic_noise(rng, shape, 0.6 * k)
    veins = np.maximum(_vessels(rng, shape, 4.8 * k, 0.12 * w), 0.6 * _vessels(rng, shape, 1.2 * k, 0.15 * w))
    veins *= np.float32(patient.vessel_contrast)
    planes = [
        np.float32(m) * shade * (1.0 - veins) + np.float32(v) * veins for m, v in zip(patient.mucosa, patient.vessel)
    ]
    wetness = np.clip(0.75 + 0.25 * periodic_noise(rng, shape, 3.0), 0.3, 1.0)

    coverage = np.zeros(shape, np.float32)
    for polyp in polyps:
        rows = np.nonzero(np.abs(z - polyp.z) < polyp.size_mm / 2 + 1.0)[0]
        centre = (round((polyp.z - z[0]) / TEXEL_MM), round(polyp.theta / (2 * np.pi) * n_theta) % n_theta)
        q = _polyp_coverage(polyp, z[rows], theta, float(radius[centre]))
        radius[rows] -= polyp.height_mm * np.clip(1.0 - q * q, 0.0, 1.0)
        inside = np.clip((1.0 - q) / 0.15, 0.0, 1.0)
        coverage[rows] = np.maximum(coverage[rows], inside)
        pits = 1.0 + polyp.pit_contrast * _pit_pattern(rng, (rows.size, n_theta), polyp)
        for plane, color in zip(planes, polyp.color):
            plane[rows] += inside * (pits * np.float32(color) - plane[rows])
        wetness[rows] = np.maximum(wetness[rows], inside)

    radius = radius.astype(np.float32)
    slope_z = np.gradient(radius, TEXEL_MM, axis=0).astype(np.float32)
    slope_s = (np.roll(radius, -1, axis=1) - np.roll(radius, 1, axis=1)) / np.float32(2 * TEXEL_MM)
    albedo = cv2.merge([cv2.convertScaleAbs(plane, alpha=255.0) for plane in (*planes, wetness)])
    return Wall(
        float(z[0]),
        TEXEL_MM,
        n_theta,
        float(radius_mean),
        radius,
        cv2.merge([radius, slope_z, slope_s, coverage]),
        albedo,
        radius.min(axis=1),
    )
