"""Cameras: orbit poses, matrices, rays, progressive view sampling and Zero123 relative poses.

Conventions (PROTOCOL.md section 8, docs/fields.md):

- World: right-handed, Z up, the object faces -Y.
- A camera at elevation e, azimuth a, distance d sits at
  ``(d*cos(e)*sin(a), -d*cos(e)*cos(a), d*sin(e))`` and looks at the origin.
- ``c2w`` is camera-to-world in the OpenGL convention: the camera looks down its -Z axis, +X is
  right and +Y is up in the image. Projection matrices map to OpenGL clip space.
- ``fov_deg`` is the vertical field of view; the horizontal one follows from ``width / height``.
- Images are ``[B, H, W, C]`` with row 0 at the top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

SCENE_BOUND = 1.0
"""Fields (NeuS, DMTet, colour) live in the cube [-SCENE_BOUND, SCENE_BOUND]^3; objects are
normalised into [-0.5, 0.5]^3."""


# ---------------------------------------------------------------------------------------------
# Poses and matrices
# ---------------------------------------------------------------------------------------------


def orbit_positions(elevation_deg_b: Tensor, azimuth_deg_b: Tensor, distance_b: Tensor) -> Tensor:
    """Camera centres ``[B, 3]`` for spherical coordinates (PROTOCOL.md section 8)."""
    elevation = torch.deg2rad(elevation_deg_b)
    azimuth = torch.deg2rad(azimuth_deg_b)
    return torch.stack(
        [
            distance_b * torch.cos(elevation) * torch.sin(azimuth),
            -distance_b * torch.cos(elevation) * torch.cos(azimuth),
            distance_b * torch.sin(elevation),
        ],
        dim=-1,
    )


def orbit_c2w(elevation_deg_b: Tensor, azimuth_deg_b: Tensor, distance_b: Tensor) -> Tensor:
    """Camera-to-world ``[B, 4, 4]`` (OpenGL axes) of cameras on the orbit looking at the origin.

    The image's right axis is ``(cos a, sin a, 0)``: horizontal, and well defined even straight
    above or below the origin (elevation +-90 degrees), where a look-at with world-up breaks down.
    """
    azimuth = torch.deg2rad(azimuth_deg_b)
    eye_bx3 = orbit_positions(elevation_deg_b, azimuth_deg_b, distance_b)
    forward_bx3 = -eye_bx3 / distance_b[:, None]
    right_bx3 = torch.stack([torch.cos(azimuth), torch.sin(azimuth), torch.zeros_like(azimuth)], -1)
    up_bx3 = torch.linalg.cross(right_bx3, forward_bx3, dim=-1)
    c2w_bx4x4 = torch.zeros(eye_bx3.shape[0], 4, 4, dtype=eye_bx3.dtype, device=eye_bx3.device)
    c2w_bx4x4[:, :3, 0] = right_bx3
    c2w_bx4x4[:, :3, 1] = up_bx3
    c2w_bx4x4[:, :3, 2] = -forward_bx3
    c2w_bx4x4[:, :3, 3] = eye_bx3
    c2w_bx4x4[:, 3, 3] = 1.0
    return c2w_bx4x4


def perspective_bx4x4(fov_deg_b: Tensor, aspect: float, near: float, far: float) -> Tensor:
    """OpenGL projection ``[B, 4, 4]`` (camera space -> clip) for a vertical fov and width/height."""
    if not 0.0 < near < far:
        raise ValueError(f"near and far must satisfy 0 < near < far, got near={near}, far={far}")
    focal_b = 1.0 / torch.tan(torch.deg2rad(fov_deg_b) / 2.0)
    proj_bx4x4 = torch.zeros(fov_deg_b.shape[0], 4, 4, dtype=fov_deg_b.dtype, device=fov_deg_b.device)
    proj_bx4x4[:, 0, 0] = focal_b / aspect
    proj_bx4x4[:, 1, 1] = focal_b
    proj_bx4x4[:, 2, 2] = -(far + near) / (far - near)
    proj_bx4x4[:, 2, 3] = -2.0 * far * near / (far - near)
    proj_bx4x4[:, 3, 2] = -1.0
    return proj_bx4x4


@dataclass
class Cameras:
    """A batch of B pinhole cameras on the orbit around the origin, one image size for all."""

    c2w_bx4x4: Tensor
    """Camera-to-world, OpenGL axes (looks down -Z, +Y up in the image)."""
    fov_deg_b: Tensor
    """Vertical field of view in degrees."""
    elevation_deg_b: Tensor
    """Elevation in degrees (PROTOCOL.md section 8)."""
    azimuth_deg_b: Tensor
    """Azimuth in degrees; 0 looks from -Y (the front), 90 from +X."""
    distance_b: Tensor
    """Distance from the origin."""
    height: int
    """Image height in pixels."""
    width: int
    """Image width in pixels."""

    @classmethod
    def from_orbit(
        cls,
        elevation_deg_b: Tensor,
        azimuth_deg_b: Tensor,
        distance_b: Tensor,
        fov_deg_b: Tensor,
        height: int,
        width: int,
    ) -> "Cameras":
        """Cameras looking at the origin from spherical coordinates (all ``[B]``, same device)."""
        _check_image_size(height, width)
        if bool((distance_b <= 0).any()):
            raise ValueError(f"distance must be > 0, got {distance_b.tolist()}")
        if bool(((fov_deg_b <= 0) | (fov_deg_b >= 180)).any()):
            raise ValueError(f"fov_deg must be in (0, 180), got {fov_deg_b.tolist()}")
        return cls(
            c2w_bx4x4=orbit_c2w(elevation_deg_b, azimuth_deg_b, distance_b),
            fov_deg_b=fov_deg_b,
            elevation_deg_b=elevation_deg_b,
            azimuth_deg_b=azimuth_deg_b,
            distance_b=distance_b,
            height=height,
            width=width,
        )

    def __len__(self) -> int:
        return self.c2w_bx4x4.shape[0]

    def __getitem__(self, index: int | slice | Tensor) -> "Cameras":
        """A sub-batch; an int keeps the batch dimension (length 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        return Cameras(
            c2w_bx4x4=self.c2w_bx4x4[index],
            fov_deg_b=self.fov_deg_b[index],
            elevation_deg_b=self.elevation_deg_b[index],
            azimuth_deg_b=self.azimuth_deg_b[index],
            distance_b=self.distance_b[index],
            height=self.height,
            width=self.width,
        )

    @staticmethod
    def cat(cameras: Sequence["Cameras"]) -> "Cameras":
        """Concatenate batches that share one image size."""
        if not cameras:
            raise ValueError("Cameras.cat needs at least one batch, got an empty sequence")
        sizes = {(c.height, c.width) for c in cameras}
        if len(sizes) != 1:
            raise ValueError(f"Cameras.cat needs one image size (height, width), got {sorted(sizes)}")
        return Cameras(
            c2w_bx4x4=torch.cat([c.c2w_bx4x4 for c in cameras]),
            fov_deg_b=torch.cat([c.fov_deg_b for c in cameras]),
            elevation_deg_b=torch.cat([c.elevation_deg_b for c in cameras]),
            azimuth_deg_b=torch.cat([c.azimuth_deg_b for c in cameras]),
            distance_b=torch.cat([c.distance_b for c in cameras]),
            height=cameras[0].height,
            width=cameras[0].width,
        )

    def to(self, device: torch.device | str) -> "Cameras":
        return Cameras(
            c2w_bx4x4=self.c2w_bx4x4.to(device),
            fov_deg_b=self.fov_deg_b.to(device),
            elevation_deg_b=self.elevation_deg_b.to(device),
            azimuth_deg_b=self.azimuth_deg_b.to(device),
            distance_b=self.distance_b.to(device),
            height=self.height,
            width=self.width,
        )

    def with_size(self, height: int, width: int) -> "Cameras":
        """The same poses rendered at another image size."""
        _check_image_size(height, width)
        return Cameras(
            self.c2w_bx4x4, self.fov_deg_b, self.elevation_deg_b, self.azimuth_deg_b,
            self.distance_b, height, width,
        )

    @property
    def device(self) -> torch.device:
        return self.c2w_bx4x4.device

    @property
    def positions_bx3(self) -> Tensor:
        """Camera centres in world space."""
        return self.c2w_bx4x4[:, :3, 3]

    def w2c_bx4x4(self) -> Tensor:
        """World-to-camera (the inverse of the rigid ``c2w``)."""
        rot_bx3x3 = self.c2w_bx4x4[:, :3, :3]
        w2c_bx4x4 = torch.zeros_like(self.c2w_bx4x4)
        w2c_bx4x4[:, :3, :3] = rot_bx3x3.transpose(1, 2)
        w2c_bx4x4[:, :3, 3] = -(rot_bx3x3.transpose(1, 2) @ self.c2w_bx4x4[:, :3, 3:4])[..., 0]
        w2c_bx4x4[:, 3, 3] = 1.0
        return w2c_bx4x4

    def proj_bx4x4(self, near: float = 0.1, far: float = 100.0) -> Tensor:
        """Camera space -> OpenGL clip space."""
        return perspective_bx4x4(self.fov_deg_b, self.width / self.height, near, far)

    def mvp_bx4x4(self, near: float = 0.1, far: float = 100.0) -> Tensor:
        """World -> OpenGL clip space (``proj @ w2c``)."""
        return self.proj_bx4x4(near, far) @ self.w2c_bx4x4()

    def project(self, points_nx3: Tensor) -> tuple[Tensor, Tensor]:
        """Pixel coordinates ``[B, N, 2]`` as (column, row), with pixel centres at integer + 0.5
        and row 0 at the top, and camera-space depth ``[B, N]`` (positive in front)."""
        ones_nx1 = torch.ones_like(points_nx3[:, :1])
        homo_nx4 = torch.cat([points_nx3, ones_nx1], dim=-1)
        clip_bxnx4 = homo_nx4 @ self.mvp_bx4x4().transpose(1, 2)
        ndc_bxnx2 = clip_bxnx4[..., :2] / clip_bxnx4[..., 3:4]
        column = (ndc_bxnx2[..., 0] + 1.0) * 0.5 * self.width
        row = (1.0 - ndc_bxnx2[..., 1]) * 0.5 * self.height
        return torch.stack([column, row], dim=-1), clip_bxnx4[..., 3]

    def rays(self) -> tuple[Tensor, Tensor]:
        """Ray origins and unit directions, each ``[B, H, W, 3]`` in world space, through pixel
        centres, row 0 at the top."""
        dtype, device = self.c2w_bx4x4.dtype, self.c2w_bx4x4.device
        rows = torch.arange(self.height, dtype=dtype, device=device) + 0.5
        cols = torch.arange(self.width, dtype=dtype, device=device) + 0.5
        ndc_y_h = 1.0 - 2.0 * rows / self.height
        ndc_x_w = 2.0 * cols / self.width - 1.0
        tan_half_b = torch.tan(torch.deg2rad(self.fov_deg_b) / 2.0)
        aspect = self.width / self.height
        x_bxhxw = (ndc_x_w[None, None, :] * (tan_half_b * aspect)[:, None, None]).expand(
            -1, self.height, -1
        )
        y_bxhxw = (ndc_y_h[None, :, None] * tan_half_b[:, None, None]).expand(-1, -1, self.width)
        dirs_cam_bxhxwx3 = torch.stack([x_bxhxw, y_bxhxw, -torch.ones_like(x_bxhxw)], dim=-1)
        rot_bx3x3 = self.c2w_bx4x4[:, :3, :3]
        dirs_bxhxwx3 = torch.einsum("bij,bhwj->bhwi", rot_bx3x3, dirs_cam_bxhxwx3)
        dirs_bxhxwx3 = dirs_bxhxwx3 / dirs_bxhxwx3.norm(dim=-1, keepdim=True)
        origins_bxhxwx3 = self.positions_bx3[:, None, None, :].expand_as(dirs_bxhxwx3)
        return origins_bxhxwx3, dirs_bxhxwx3


def _check_image_size(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Ranges, the reference view and sampling
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewPose:
    """One orbit pose (the reference view of a job)."""

    elevation_deg: float
    """Elevation in degrees."""
    azimuth_deg: float
    """Azimuth in degrees."""
    distance: float
    """Distance from the origin."""
    fov_deg: float
    """Vertical field of view in degrees."""


@dataclass(frozen=True)
class CameraRanges:
    """Where training cameras may be: (min, max) per coordinate plus the reference view.

    Built with ``from_params``, each range is widened where needed to contain the reference
    value, so progressive widening (``sample_cameras``) starts exactly at the reference.
    """

    reference: ViewPose
    """The view the reference image was taken from."""
    elevation_deg: tuple[float, float]
    """(min, max) elevation in degrees."""
    azimuth_deg: tuple[float, float]
    """(min, max) azimuth in degrees."""
    distance: tuple[float, float]
    """(min, max) distance."""
    fov_deg: tuple[float, float]
    """(min, max) vertical field of view in degrees."""

    def __post_init__(self) -> None:
        for name in ("elevation_deg", "azimuth_deg", "distance", "fov_deg"):
            low, high = getattr(self, name)
            ref = getattr(self.reference, name)
            if not all(math.isfinite(v) for v in (low, high, ref)):
                raise ValueError(f"camera.{name} must be finite, got ({low}, {high}), reference {ref}")
            if low > high:
                raise ValueError(f"camera.{name} must satisfy min <= max, got ({low}, {high})")
            if not low <= ref <= high:
                raise ValueError(
                    f"camera.{name} ({low}, {high}) must contain the reference value {ref}; "
                    "use CameraRanges.from_params, which widens it"
                )
        if self.distance[0] <= 0:
            raise ValueError(f"camera.distance must be > 0, got {self.distance}")
        if self.fov_deg[0] <= 0 or self.fov_deg[1] >= 180:
            raise ValueError(f"camera.fov_deg must be inside (0, 180), got {self.fov_deg}")

    @classmethod
    def from_params(cls, camera: Any) -> "CameraRanges":
        """From ``protocol.params.CameraParams`` or any object with its attributes:
        ``reference`` (``elevation_deg``, ``azimuth_deg``, ``distance``, ``fov_deg``) and the
        (min, max) pairs ``elevation_deg``, ``azimuth_deg``, ``distance``, ``fov_deg``.
        Each range is extended to contain the reference value."""
        ref = camera.reference
        reference = ViewPose(
            elevation_deg=float(ref.elevation_deg),
            azimuth_deg=float(ref.azimuth_deg),
            distance=float(ref.distance),
            fov_deg=float(ref.fov_deg),
        )

        def containing(name: str) -> tuple[float, float]:
            pair = getattr(camera, name)
            if len(pair) != 2:
                raise ValueError(f"camera.{name} must be a (min, max) pair, got {pair!r}")
            value = getattr(reference, name)
            return (min(float(pair[0]), value), max(float(pair[1]), value))

        return cls(
            reference=reference,
            elevation_deg=containing("elevation_deg"),
            azimuth_deg=containing("azimuth_deg"),
            distance=containing("distance"),
            fov_deg=containing("fov_deg"),
        )

    def widened(self, widen: float) -> "CameraRanges":
        """The ranges at a widening fraction: each interval is
        ``[ref - widen * (ref - min), ref + widen * (max - ref)]``."""
        if not (isinstance(widen, (int, float)) and 0.0 <= widen <= 1.0):
            raise ValueError(f"widen must be a number in [0, 1], got {widen!r}")

        def interval(name: str) -> tuple[float, float]:
            low, high = getattr(self, name)
            ref = getattr(self.reference, name)
            return (ref - widen * (ref - low), ref + widen * (high - ref))

        return CameraRanges(
            reference=self.reference,
            elevation_deg=interval("elevation_deg"),
            azimuth_deg=interval("azimuth_deg"),
            distance=interval("distance"),
            fov_deg=interval("fov_deg"),
        )


def _uniform(low: float, high: float, batch: int, generator: torch.Generator | None) -> Tensor:
    u_b = torch.rand(batch, generator=generator, dtype=torch.float64)
    return (low + (high - low) * u_b).to(torch.float32)


def sample_cameras(
    ranges: CameraRanges,
    batch: int,
    height: int,
    width: int,
    widen: float,
    generator: torch.Generator | None,
    device: torch.device | str,
) -> Cameras:
    """Random training cameras under progressive widening.

    Each coordinate is drawn uniformly (in degrees for angles) from ``ranges.widened(widen)``:
    at ``widen = 0`` every camera is the reference view, at ``widen = 1`` the full ranges; in
    between each interval grows linearly from the reference value towards its min and its max.
    Numbers are drawn on the CPU with ``generator`` (a CPU ``torch.Generator``, or None for the
    global one), so a seed gives the same cameras on every device, then moved to ``device``.
    """
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    current = ranges.widened(widen)
    elevation_b = _uniform(*current.elevation_deg, batch, generator)
    azimuth_b = _uniform(*current.azimuth_deg, batch, generator)
    distance_b = _uniform(*current.distance, batch, generator)
    fov_b = _uniform(*current.fov_deg, batch, generator)
    return Cameras.from_orbit(elevation_b, azimuth_b, distance_b, fov_b, height, width).to(device)


def view_cameras(
    poses: Sequence[ViewPose], height: int, width: int, device: torch.device | str = "cpu"
) -> Cameras:
    """Cameras for explicit poses."""
    if not poses:
        raise ValueError("poses must hold at least one ViewPose, got an empty sequence")

    def column(name: str) -> Tensor:
        return torch.tensor([getattr(p, name) for p in poses], dtype=torch.float32, device=device)

    return Cameras.from_orbit(
        column("elevation_deg"), column("azimuth_deg"), column("distance"), column("fov_deg"),
        height, width,
    )


def reference_camera(
    ranges: CameraRanges, height: int, width: int, device: torch.device | str = "cpu"
) -> Cameras:
    """The reference view as a batch of one camera."""
    return view_cameras([ranges.reference], height, width, device)


def orbit_cameras(
    n: int,
    elevation_deg: float,
    distance: float,
    fov_deg: float,
    height: int,
    width: int,
    *,
    device: torch.device | str = "cpu",
    start_azimuth_deg: float = 0.0,
) -> Cameras:
    """``n`` cameras at one elevation, azimuths ``start + 360 * i / n`` (evenly spaced)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    azimuth_b = start_azimuth_deg + 360.0 * torch.arange(n, dtype=torch.float32, device=device) / n
    full = lambda value: torch.full((n,), float(value), dtype=torch.float32, device=device)  # noqa: E731
    return Cameras.from_orbit(full(elevation_deg), azimuth_b, full(distance), full(fov_deg), height, width)


# ---------------------------------------------------------------------------------------------
# Zero123 conditioning
# ---------------------------------------------------------------------------------------------


def _reference_values(reference: ViewPose | Cameras, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if isinstance(reference, Cameras):
        if len(reference) != 1:
            raise ValueError(f"reference must be one camera, got a batch of {len(reference)}")
        values = (reference.elevation_deg_b, reference.azimuth_deg_b, reference.distance_b)
        return tuple(v.to(like.device, like.dtype) for v in values)  # type: ignore[return-value]
    as_tensor = lambda v: torch.tensor([float(v)], dtype=like.dtype, device=like.device)  # noqa: E731
    return as_tensor(reference.elevation_deg), as_tensor(reference.azimuth_deg), as_tensor(reference.distance)


def relative_pose(cameras: Cameras, reference: ViewPose | Cameras) -> Tensor:
    """Zero123's camera conditioning ``[B, 4]``, relative to the reference view:

    ``(deg2rad((90 - elev) - (90 - ref_elev)), sin(deg2rad(azim - ref_azim)),
    cos(deg2rad(azim - ref_azim)), dist - ref_dist)``

    Zero123's polar angle is ``90 - elevation``, so looking from higher up than the reference
    gives a negative first entry. Our azimuth turns the same way as threestudio's (counter-
    clockwise seen from +Z; our world is threestudio's rotated by -90 degrees about Z), so the
    azimuth difference is used unchanged.
    """
    ref_elev, ref_azim, ref_dist = _reference_values(reference, cameras.elevation_deg_b)
    delta_azim_b = torch.deg2rad(cameras.azimuth_deg_b - ref_azim)
    return torch.stack(
        [
            torch.deg2rad((90.0 - cameras.elevation_deg_b) - (90.0 - ref_elev)),
            torch.sin(delta_azim_b),
            torch.cos(delta_azim_b),
            cameras.distance_b - ref_dist,
        ],
        dim=-1,
    )


def relative_pose_stable_zero123(cameras: Cameras, reference: ViewPose | Cameras) -> Tensor:
    """Stable Zero123's camera conditioning ``[B, 4]``: the first three entries as in
    ``relative_pose``; the fourth is the reference view's absolute polar angle in radians,
    ``deg2rad(90 - ref_elev)``, instead of a distance difference."""
    ref_elev, _, _ = _reference_values(reference, cameras.elevation_deg_b)
    pose_bx4 = relative_pose(cameras, reference)
    ref_polar_b = torch.deg2rad(90.0 - ref_elev).expand(len(cameras))
    return torch.cat([pose_bx4[:, :3], ref_polar_b[:, None]], dim=-1)
