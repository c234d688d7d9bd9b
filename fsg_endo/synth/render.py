"""Render one endoscope frame: a fisheye camera with its light source inside a textured colon tube.

The colon wall is a tube ``r = R(z, theta)`` stored as tables over (z, theta) (see
:mod:`fsg_endo.synth.scene`). Every pixel's ray is marched to its first crossing of the wall, then
shaded with the light at the camera: inverse-square fall-off, vignetting, Lambert diffuse, wet
specular highlights, auto-exposure, depth-dependent defocus, motion blur, sensor noise and the
circular field of view.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from fsg_endo.synth.scene import Wall

TWO_PI = 2.0 * np.pi


@lru_cache(maxsize=4)
def _rays(width: int, height: int, focal: float, fov_deg: float) -> np.ndarray:
    """Pixel ray directions of an equidistant fisheye (read-only, shared between renderers)."""
    u, v = np.meshgrid(np.arange(width) - (width - 1) / 2.0, np.arange(height) - (height - 1) / 2.0)
    rho = np.hypot(u, v)
    angle = np.minimum(rho / focal, np.radians(fov_deg / 2.0 + 5.0))
    scale = np.sin(angle) / np.maximum(rho, 1e-9)
    rays = np.stack([u * scale, v * scale, np.cos(angle)]).astype(np.float32)
    rays.flags.writeable = False
    return rays


@dataclass(frozen=True)
class Camera:
    """Equidistant fisheye (``r = f * angle``), as endoscopes are; the image circle fills the frame height."""

    width: int
    height: int
    fov_deg: float = 140.0

    @property
    def radius(self) -> float:
        """Radius of the field-of-view circle in pixels."""
        return 0.5 * min(self.width, self.height)

    @property
    def focal(self) -> float:
        """Pixels per radian off the optical axis (the pinhole focal length at the image centre)."""
        return self.radius / np.radians(self.fov_deg / 2.0)

    @property
    def center(self) -> tuple[float, float]:
        return (self.width - 1) / 2.0, (self.height - 1) / 2.0

    def rays(self) -> np.ndarray:
        """Unit ray direction of every pixel in camera coordinates (x right, y down, z forward), (3, H, W)."""
        return _rays(self.width, self.height, self.focal, self.fov_deg)

    def project(self, points: np.ndarray) -> np.ndarray:
        """Pixel coordinates (N, 2) of camera-frame points (N, 3); points behind the camera give NaN."""
        x, y, z = np.asarray(points, dtype=float).T
        lateral = np.hypot(x, y)
        angle = np.arctan2(lateral, z)
        scale = self.focal * angle / np.maximum(lateral, 1e-12)
        cx, cy = self.center
        uv = np.stack([cx + x * scale, cy + y * scale], axis=1)
        uv[angle > np.radians(89.0)] = np.nan
        return uv

    def fov_mask(self) -> np.ndarray:
        """Soft circular field-of-view mask in [0, 1], (H, W) float32."""
        cx, cy = self.center
        u, v = np.meshgrid(np.arange(self.width) - cx, np.arange(self.height) - cy)
        return np.clip(self.radius - np.hypot(u, v), 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class Pose:
    """Camera position (mm, world frame: z along the colon) and rotation whose columns are the camera axes."""

    origin: np.ndarray
    rotation: np.ndarray

    def to_camera(self, points: np.ndarray) -> np.ndarray:
        """World points (N, 3) in camera coordinates."""
        return (np.asarray(points, dtype=float) - self.origin) @ self.rotation


def look_at(origin: np.ndarray, target: np.ndarray, roll: float = 0.0) -> Pose:
    """The pose at ``origin`` looking at ``target``, rolled by ``roll`` radians about the view axis."""
    origin = np.asarray(origin, dtype=float)
    forward = np.asarray(target, dtype=float) - origin
    forward /= np.linalg.norm(forward)
    helper = np.array([0.0, 0.0, 1.0]) if abs(forward[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    right = np.cross(helper, forward)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c, s = np.cos(roll), np.sin(roll)
    right, down = c * right + s * down, -s * right + c * down
    return Pose(origin, np.stack([right, down, forward], axis=1))


@dataclass(frozen=True)
class Optics:
    """Light, exposure and lens of one video (a patient's colon through one endoscope)."""

    gain: float = 1.0
    white_balance: tuple[float, float, float] = (1.0, 1.0, 1.0)  # BGR
    reference_mm: float = 20.0  # distance at which the light gives unit irradiance
    specular: float = 0.6
    shininess: float = 200.0
    focus_mm: float = 20.0
    defocus: float = 0.6
    vignetting: float = 1.5
    noise: float = 0.01
    exposure_target: float = 0.35
    exposure_strength: float = 0.7
    max_depth_mm: float = 150.0
    march_depth_mm: float = 100.0


@dataclass
class Frame:
    """A rendered frame: BGR uint8 image, and per pixel the polyp coverage, depth (mm) and wall z (mm)."""

    image: np.ndarray
    polyp: np.ndarray
    depth: np.ndarray
    hit_z: np.ndarray


@dataclass
class Hits:
    """Where the pixel rays meet the wall: directions, distances, table coordinates, hit angle cos/sin."""

    d: np.ndarray  # (3, H, W) world ray directions
    t: np.ndarray  # (H, W) mm
    map_x: np.ndarray  # theta in table columns
    map_y: np.ndarray  # z in table rows
    cos: np.ndarray
    sin: np.ndarray


class Renderer:
    """Renders the frames of one video in order: a camera, its optics and the colon wall of that video.

    Stateful only through the auto-exposure, which adapts over frames as an endoscope's does.
    """

    def __init__(self, camera: Camera, wall: Wall, optics: Optics, noise_seed: int = 0):
        self.camera, self.wall, self.optics = camera, wall, optics
        self._rays = camera.rays()
        self._vignette = np.maximum(self._rays[2], 0.0) ** optics.vignetting * optics.reference_mm**2
        self._mask = camera.fov_mask()
        self._mask3 = cv2.merge([self._mask * 255.0] * 3)
        noise_rng = np.random.default_rng(noise_seed)
        self._noise = noise_rng.standard_normal((2 * camera.height, 2 * camera.width, 3), np.float32) * optics.noise
        self._exposure: float | None = None

    def trace(self, pose: Pose) -> Hits:
        """Intersect every pixel ray with the wall.

        The first crossing is found by marching on a half-resolution grid, interpolated on smooth
        surfaces and marched again at full resolution where that grid's depth jumps (silhouettes of
        folds and polyps).
        """
        o = pose.origin.astype(np.float32)
        d = np.einsum("ij,jhw->ihw", pose.rotation.astype(np.float32), self._rays)
        inner = self.wall.inner_radius(float(o[2]), self.optics.march_depth_mm)
        coarse_d = np.ascontiguousarray(d[:, ::2, ::2])
        coarse = self._march(o, coarse_d, _cylinder_hit(o, coarse_d, inner))
        size = (self.camera.width, self.camera.height)
        t = cv2.resize(coarse, size, interpolation=cv2.INTER_LINEAR).ravel()
        kernel = np.ones((3, 3), np.uint8)
        low, high = cv2.erode(coarse, kernel), cv2.dilate(coarse, kernel)
        edges = cv2.resize((high - low > 0.25 * low + 1.0).astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        index = np.flatnonzero(edges)
        if index.size:
            # At a silhouette the nearer surface lies near the smallest coarse depth around it.
            near = cv2.resize(low, size, interpolation=cv2.INTER_NEAREST).ravel()[index]
            rays = d.reshape(3, -1)[:, index]
            t[index] = self._march(o, rays, np.maximum(_cylinder_hit(o, rays, inner), 0.8 * near))
        return self._locate(o, d, np.clip(t.reshape(d.shape[1:]), 0.5, self.optics.max_depth_mm))

    def _march(self, o: np.ndarray, d: np.ndarray, start: np.ndarray, iterations: int = 16) -> np.ndarray:
        """Distance to the first wall crossing along each ray, by conservative stepping.

        While inside the lumen a ray advances by two thirds of its radial gap to the wall (a fold or
        polyp thinner than that may be stepped over), at least a few percent of its distance; a
        crossing is located by linear interpolation between the last two steps. Rays leave the work
        set once done; rays still in the lumen at ``march_depth_mm`` are dark and stop there.
        Rays (``d``: 3 x N) start at ``start`` (mm, at least 1), where no wall is nearer.
        """
        wall, far = self.wall, self.optics.march_depth_mm
        to_col, to_row = np.float32(wall.n_theta / TWO_PI), np.float32(1.0 / wall.dz)
        row0 = np.float32((o[2] - wall.z0) / wall.dz)
        start = np.maximum(start, 1.0)
        hit = np.full(d[0].size, self.optics.max_depth_mm, np.float32)
        active = np.arange(d[0].size)
        # rows: dx, dy, dz in table rows per mm, t, t_prev, g_prev
        state = np.concatenate(
            [
                d[:2].reshape(2, -1),
                d[2].reshape(1, -1) * to_row,
                start.reshape(1, -1),
                start.reshape(1, -1),
                np.full((1, d[0].size), -1.0, np.float32),
            ]
        )
        for _ in range(iterations):
            dx, dy, dz, t, t_prev, g_prev = state
            g, theta = cv2.cartToPolar(o[0] + t * dx, o[1] + t * dy)
            theta *= to_col
            g = g.ravel()
            g -= _lookup(wall.radius, theta.ravel(), row0 + t * dz)
            crossed = g >= 0
            if crossed.any():
                gp, tp = g_prev[crossed], t_prev[crossed]
                hit[active[crossed]] = tp + gp / np.minimum(gp - g[crossed], -1e-6) * (t[crossed] - tp)
            state[4], state[5] = t, g
            state[3] += np.maximum(g * np.float32(-1 / 1.5), t * np.float32(0.06) + np.float32(0.1))
            keep = (g < 0) & (state[4] < far)
            if not keep.all():
                if not keep.any():
                    break
                active, state = active[keep], state[:, keep]
        return hit.reshape(d.shape[1:])

    def _locate(self, o: np.ndarray, d: np.ndarray, t: np.ndarray) -> Hits:
        """Table coordinates and angle of the points at distance ``t`` along the rays."""
        wall = self.wall
        x, y = o[0] + t * d[0], o[1] + t * d[1]
        rho, theta = cv2.cartToPolar(x, y)
        rho = np.maximum(rho, 1e-6)
        map_y = np.clip((o[2] + t * d[2] - wall.z0) / wall.dz, 0.0, wall.radius.shape[0] - 1.0)
        return Hits(d, t, theta * np.float32(wall.n_theta / TWO_PI), map_y, x / rho, y / rho)

    def render(self, pose: Pose, rng: np.random.Generator, motion_px: np.ndarray | None = None) -> Frame:
        """Render the frame seen from ``pose``; ``motion_px`` is the image motion (dx, dy) during exposure."""
        wall = self.wall
        hits = self.trace(pose)
        radius, slope_z, slope_s, coverage = cv2.split(
            cv2.remap(wall.geometry, hits.map_x, hits.map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)
        )
        surface = cv2.split(
            cv2.remap(wall.albedo, hits.map_x, hits.map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)
        )
        image = self._shade(hits, slope_z, slope_s, surface)
        image = self._defocus(image, hits.t)
        if motion_px is not None:
            image = motion_blur(image, motion_px)
        return Frame(self._finish(image, rng), coverage, hits.t, hits.map_y * wall.dz + wall.z0)

    def _shade(self, hits: Hits, slope_z: np.ndarray, slope_s: np.ndarray, surface: list[np.ndarray]) -> np.ndarray:
        """Linear radiance through the camera's tone curve, (H, W, 3) in [0, 1].

        The outward wall normal is ~ r_hat - dR/dz z_hat - dR/ds theta_hat; light and eye are both at
        the camera, so the diffuse and the (Blinn) specular term depend on the same cosine.
        """
        opt, d = self.optics, hits.d
        radial = hits.cos * d[0] + hits.sin * d[1]
        tangential = hits.cos * d[1] - hits.sin * d[0]
        facing = (radial - slope_z * d[2] - slope_s * tangential) / np.sqrt(1.0 + slope_z * slope_z + slope_s * slope_s)
        facing = np.clip(facing, 0.0, 1.0)
        light = self._vignette / (hits.t * hits.t)
        diffuse = light * (0.03 + facing)
        spec = (opt.specular * light) * np.exp(opt.shininess * (facing - 1.0)) * surface[3]
        exposure = self._auto_exposure(diffuse * surface[2])
        gains = np.asarray(opt.white_balance) * (-opt.gain * exposure / 255.0)
        return cv2.merge(
            [1.0 - np.exp((albedo * diffuse + spec) * np.float32(k)) for albedo, k in zip(surface[:3], gains)]
        )

    def _auto_exposure(self, red: np.ndarray) -> float:
        """Endoscope auto gain: partly compensates the mean (red) brightness, smoothed over frames."""
        mean = float(np.mean(red[::4, ::4] * self._mask[::4, ::4])) / 255.0 + 1e-3
        target = float(np.clip((self.optics.exposure_target / mean) ** self.optics.exposure_strength, 0.1, 3.0))
        self._exposure = target if self._exposure is None else 0.6 * self._exposure + 0.4 * target
        return self._exposure

    def _defocus(self, image: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Thin-lens defocus: blur grows with |focus/t - 1|; blends the image with two pyramid blurs."""
        opt = self.optics
        level = np.clip(opt.defocus * np.abs(opt.focus_mm / t - 1.0), 0.0, 2.0)
        low, high = cv2.merge([np.minimum(level, 1.0)] * 3), cv2.merge([np.maximum(level - 1.0, 0.0)] * 3)
        half = cv2.pyrDown(image)
        soft = cv2.pyrUp(half, dstsize=image.shape[1::-1])
        blurred = cv2.pyrUp(cv2.pyrUp(cv2.pyrDown(half), dstsize=half.shape[1::-1]), dstsize=image.shape[1::-1])
        return image + low * (soft - image) + high * (blurred - soft)

    def _finish(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Sensor noise (a random window of a fixed noise bank), display gamma, FOV mask, 8 bits."""
        h, w = self.camera.height, self.camera.width
        y, x = rng.integers(0, h), rng.integers(0, w)
        image = np.clip(image + self._noise[y : y + h, x : x + w], 0.0, 1.0)
        np.sqrt(image, out=image)
        image *= self._mask3
        image += 0.5
        return image.astype(np.uint8)


def _lookup(table: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, width: int = 1024) -> np.ndarray:
    """Bilinear lookup of a (z, theta) table at 1-D coordinates (OpenCV caps rows and columns at 32767)."""
    n = map_x.size
    if n >= 32767:
        pad = -n % width
        map_x, map_y = np.pad(map_x, (0, pad)).reshape(-1, width), np.pad(map_y, (0, pad)).reshape(-1, width)
    return cv2.remap(table, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP).ravel()[:n]


def _cylinder_hit(o: np.ndarray, d: np.ndarray, radius: np.ndarray | float) -> np.ndarray:
    """Distance along rays ``d`` from ``o`` (inside) to the cylinder ``x^2 + y^2 = radius^2``; 0 if outside."""
    a = d[0] * d[0] + d[1] * d[1] + 1e-6
    b = o[0] * d[0] + o[1] * d[1]
    disc = np.maximum(b * b - a * (o[0] * o[0] + o[1] * o[1] - np.square(radius)), 0.0)
    return np.maximum((np.sqrt(disc) - b) / a, 0.0).astype(np.float32)


def motion_blur(image: np.ndarray, motion_px: np.ndarray) -> np.ndarray:
    """Blur along the image motion during the exposure (a line kernel of that length and direction)."""
    length = float(np.hypot(*motion_px))
    if length < 1.5:
        return image
    size = int(min(np.ceil(length), 9)) | 1
    kernel = np.zeros((size, size), np.float32)
    c = size // 2
    dx, dy = np.asarray(motion_px) / length * (size - 1) / 2.0
    cv2.line(kernel, (round(c - dx), round(c - dy)), (round(c + dx), round(c + dy)), 1.0, 1, cv2.LINE_AA)
    return cv2.filter2D(image, -1, kernel / kernel.sum(), borderType=cv2.BORDER_REFLECT)
