"""Oracle guidance of a known mesh: exact denoisers of its renders, so the pipeline's quality is a number.

    load_oracle_models(spec, device, roles=ROLES, vae=None) -> GuidanceModels
        spec = "oracle:MESH[,TEXTURE]" (what `--models` takes); every role's name is the spec
    OracleObject.load(mesh_path, texture_path, device)   the mesh, framed as the pipeline sees it
    OraclePrior2D     the 2D prior: camera-aware, answers for the camera in `cond.cameras`; also
                      the texture role (BSD runs on it: no texture model to load)
    OracleZero123     answers for the reference pose composed with the relative pose `cond.pose_bx4`
    oracle_depth      a depth estimator returning the reference view's true inverse depth

The data distribution, for a camera c: the object's render x*_k(c) for one of K = 2 looks (its
colours — the texture, or when untextured a grey clay lit by a light fixed in the world (`clay_rgb`),
what a reference picture of an untextured object shows — and its normal-shaded render, what the
geometry stage shows the prior), over a plain background: of any colour b for
the 2D prior (the pipeline shows it random backgrounds), white for Zero123 (its training renders
are all over white, and the pipeline composites its inputs over white).
Its optimal noise prediction, with x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε:

    b̂     = clamp(Σ (1 − m)·x_t / (√ᾱ_t·Σ (1 − m)))       per channel, m the object's mask (Zero123: 1)
    x_k   = m·x*_k(c) + (1 − m)·b̂
    w_k   = softmax_k(−‖x_t − √ᾱ_t·x_k‖² / (2·(1 − ᾱ_t)))  the posterior of the look
    x̂₀    = Σ_k w_k·x_k
    ε*    = (x_t − √ᾱ_t·x̂₀) / √(1 − ᾱ_t)

(exact but for b̂, the least-squares background colour, which is sharp when the background covers
many pixels). Through a VAE (`vae=`), x_k = E(m·x*_k + (1 − m)·white) and the background is white.
Score distillation against ε* pulls every view towards the ground truth: the noise cancels, and
SDS's gradient is √ᾱ_t·√(1 − ᾱ_t)·(x₀ − x̂₀). Text is ignored (the object is known), and the
unconditional branch answers like the conditional one, so classifier-free guidance changes nothing.

Renders: on the CPU the object is ray-cast with Embree (embreex; a ray through every pixel
centre, vertex normals and UVs interpolated at the hit), about a hundred times faster than the
PyTorch rasteriser, whose output it matches (tests/backend/guidance/test_oracle.py); on CUDA
the rasteriser (nvdiffrast) renders it, as the reconstruction bench does.

The object is framed the way the pipeline will see it: normalised to the unit box, then scaled
and moved across the reference view so that its render from `REFERENCE_POSE` is what
`prepare_reference` makes of it (centred, the border it leaves). Metrics compare against this mesh
(`OracleObject.verts_vx3`). Zero123 and the depth estimator assume the reference image was taken
from `REFERENCE_POSE`, the pipeline's default reference view.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from backend.cameras import Cameras, ViewPose, view_cameras
from backend.config import CameraConfig
from backend.guidance.denoiser import Conditioning, images_to_x0, x0_to_images
from backend.guidance.errors import ModelLoadError

SPEC_PREFIX = "oracle:"
REFERENCE_POSE = ViewPose(*CameraConfig().reference)
"""The view the oracles take the reference image to be from: the pipeline's default reference."""
PRIOR_RESOLUTION = 64
"""Image size of the oracle 2D prior (pixel space, as DeepFloyd IF's first stage)."""
ZERO123_RESOLUTION = 64
"""Image size of the oracle Zero123."""
FRAMING_SIZE = 256
"""Render size used to frame the object like a prepared reference image."""
FRAMING_ROUNDS = 3
"""Scale-and-shift rounds of the framing (each makes the perspective error smaller)."""

CLAY_LIGHT = (0.4, -0.6, 0.7)
"""Direction towards the clay's light, world frame (Z up, the reference camera on -Y): above, in
front, a little to the right; fixed in the world, so the shading is the same from every camera."""
CLAY_LIGHT_3 = torch.nn.functional.normalize(torch.tensor(CLAY_LIGHT), dim=0)
"""`CLAY_LIGHT` as a unit vector."""
CLAY_ALBEDO, CLAY_AMBIENT = 0.8, 0.35
"""Grey of the clay and the share of its light that reaches every side."""


def clay_rgb(normal_bxhxwx3: torch.Tensor, mask_bxhxwx1: torch.Tensor) -> torch.Tensor:
    """An untextured object as a reference picture shows it: grey clay, Lambert-shaded by
    `CLAY_LIGHT` plus ambient light, [B, H, W, 3] in [0, 1], 0 where empty. The shading is a
    function of the surface alone (view-independent), as a colour field can hold it."""
    lambert_bxhxwx1 = (normal_bxhxwx3 * CLAY_LIGHT_3.to(normal_bxhxwx3)).sum(-1, keepdim=True).clamp(min=0.0)
    grey_bxhxwx1 = CLAY_ALBEDO * (CLAY_AMBIENT + (1.0 - CLAY_AMBIENT) * lambert_bxhxwx1) * mask_bxhxwx1
    return grey_bxhxwx1.repeat_interleave(3, dim=-1)


def oracle_alphas_cumprod(device: torch.device) -> torch.Tensor:
    """ᾱ_t of Stable Diffusion's schedule (scaled linear β from 0.00085 to 0.012, T = 1000)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)


# 1. The known object ------------------------------------------------------------------------------


@dataclass
class OracleObject:
    """The ground-truth mesh in the scene frame, and how to render it."""

    verts_vx3: torch.Tensor
    """Positions, framed like the prepared reference (module docstring), float32 [V, 3]."""
    faces_fx3: torch.Tensor
    """Triangles, int32 [F, 3]."""
    uvs_fx3x2: torch.Tensor | None
    """Per-corner UVs, or None."""
    texture_rgb: np.ndarray | None
    """Base colour uint8 [H, W, 3], or None (the object is rendered in clay)."""
    rasterizer: Any
    """The rasteriser of `device`."""
    _scene: Any = field(default=None, repr=False)
    """The Embree scene of the current vertices (CPU renders), built on first use."""

    @classmethod
    def load(cls, mesh_path: Path, texture_path: Path | None, device: torch.device) -> "OracleObject":
        """Load, validate and frame the mesh; ModelLoadError (one line naming the file) if unusable."""
        from backend.meshio import MeshError, load_mesh, load_texture, normalize_to_unit_box
        from backend.raster import get_rasterizer

        spec = f"{SPEC_PREFIX}{mesh_path}" + (f",{texture_path}" if texture_path else "")
        try:
            mesh = load_mesh(mesh_path)
            texture = load_texture(texture_path) if texture_path is not None else mesh.texture_rgb
        except MeshError as error:
            raise ModelLoadError("prior2d", spec, f"--models {spec}: {error}") from None
        if texture is not None and mesh.uvs_fx3x2 is None:
            raise ModelLoadError("prior2d", spec, f"--models {spec}: {mesh_path.name} has no texture "
                                 f"coordinates to map {texture_path.name if texture_path else 'its texture'} with")
        unit_vx3, _, _ = normalize_to_unit_box(mesh.verts_vx3)
        uvs = None if mesh.uvs_fx3x2 is None else torch.as_tensor(mesh.uvs_fx3x2, device=device)
        obj = cls(torch.as_tensor(unit_vx3, device=device), torch.as_tensor(mesh.faces_fx3, device=device), uvs,
                  texture, get_rasterizer(device))
        for _ in range(FRAMING_ROUNDS):
            obj.verts_vx3, obj._scene = obj._framed_verts(), None
        return obj

    def render(self, cameras: Cameras):
        """Colours, mask, depth and normals of the object (`backend.bench_reconstruct.Views`):
        ray-cast on the CPU, rasterised elsewhere; an untextured object in clay (`clay_rgb`)."""
        views = self.raycast(cameras) if self.verts_vx3.device.type == "cpu" else self.rasterize(cameras)
        if self.texture_rgb is None:
            views = dataclasses.replace(views, rgb=clay_rgb(views.normal, views.mask))
        return views

    def rasterize(self, cameras: Cameras):
        """The renders through the rasteriser (`backend.bench_reconstruct.render_ground_truth`)."""
        from backend.bench_reconstruct import render_ground_truth

        with torch.no_grad():
            return render_ground_truth(self.rasterizer, self.verts_vx3, self.faces_fx3, self.uvs_fx3x2,
                                       self.texture_rgb, cameras)

    @torch.no_grad()
    def raycast(self, cameras: Cameras):
        """The same renders by Embree ray casting through the pixel centres (CPU tensors)."""
        from backend.bench_reconstruct import Views
        from backend.raster import vertex_normals
        from backend.texture import sample_texture

        if self._scene is None:
            from embreex import mesh_construction, rtcore_scene

            self._scene = rtcore_scene.EmbreeScene()
            corners = self.verts_vx3[self.faces_fx3.long()].numpy().astype(np.float32)
            mesh_construction.TriangleMesh(self._scene, corners)
        origins, directions = cameras.rays()
        shape = origins.shape[:3]
        hits = self._scene.run(origins.reshape(-1, 3).numpy().astype(np.float32),
                               directions.reshape(-1, 3).numpy().astype(np.float32), output=1)
        face_bxhxw = torch.from_numpy(hits["primID"].astype(np.int64)).view(shape)
        hit_bxhxwx1 = (face_bxhxw >= 0)[..., None]
        face_bxhxw = face_bxhxw.clamp(min=0)
        u, v = (torch.from_numpy(hits[key]).float().view(shape) for key in ("u", "v"))
        weights_bxhxwx3x1 = torch.stack([1.0 - u - v, u, v], dim=-1)[..., None]  # Embree: (1−u−v)·p0 + u·p1 + v·p2
        faces = self.faces_fx3.long()
        normals = (weights_bxhxwx3x1 * vertex_normals(self.verts_vx3, self.faces_fx3)[faces[face_bxhxw]]).sum(-2)
        normal = torch.nn.functional.normalize(normals, dim=-1, eps=1e-12) * hit_bxhxwx1
        forward_bx3 = -cameras.c2w_bx4x4[:, :3, 2]
        cos_bxhxw = (directions * forward_bx3[:, None, None]).sum(-1)
        distance = torch.from_numpy(hits["tfar"]).float().view(shape)
        depth = torch.where(hit_bxhxwx1[..., 0], distance * cos_bxhxw, torch.zeros_like(distance))[..., None]
        if self.texture_rgb is not None:
            uv_bxhxwx2 = (weights_bxhxwx3x1 * self.uvs_fx3x2[face_bxhxw]).sum(-2)
            rgb = torch.zeros(*shape, 3)
            rgb[hit_bxhxwx1[..., 0]] = sample_texture(uv_bxhxwx2[hit_bxhxwx1[..., 0]], self.texture_rgb)
        else:
            rgb = (normal + 1.0) * 0.5 * hit_bxhxwx1
        return Views(cameras, rgb, hit_bxhxwx1.float(), depth, normal)

    def reference_rgba(self, size: int) -> np.ndarray:
        """The reference image: the object from `REFERENCE_POSE`, alpha = its mask, uint8 [S, S, 4]."""
        views = self.render(view_cameras([REFERENCE_POSE], size, size, self.verts_vx3.device))
        rgba = torch.cat([views.rgb, views.mask], dim=-1)[0]
        return (rgba.clamp(0, 1) * 255.0).round().byte().cpu().numpy()

    def _framed_verts(self) -> torch.Tensor:
        """One framing round: scale and shift so the reference render matches its prepared self."""
        from backend.guidance.reference import prepare_reference

        rgba = self.reference_rgba(FRAMING_SIZE)
        prepared = prepare_reference(rgba, size=FRAMING_SIZE).mask_hxwx1[..., 0].cpu().numpy()
        (raw_rows, raw_cols), (new_rows, new_cols) = _box(rgba[..., 3] > 127), _box(prepared > 0.5)
        scale = max(new_rows[1] - new_rows[0], new_cols[1] - new_cols[0]) / max(
            raw_rows[1] - raw_rows[0], raw_cols[1] - raw_cols[0])
        camera = view_cameras([REFERENCE_POSE], FRAMING_SIZE, FRAMING_SIZE, self.verts_vx3.device)
        right, up = camera.c2w_bx4x4[0, :3, 0], camera.c2w_bx4x4[0, :3, 1]
        per_pixel = 2.0 * REFERENCE_POSE.distance * math.tan(math.radians(REFERENCE_POSE.fov_deg) / 2.0) / FRAMING_SIZE

        def centre(rows, cols) -> torch.Tensor:  # the box centre on the plane through the origin
            dx = (sum(cols) / 2.0 - FRAMING_SIZE / 2.0) * per_pixel
            dy = -(sum(rows) / 2.0 - FRAMING_SIZE / 2.0) * per_pixel
            return right * dx + up * dy

        return (self.verts_vx3 - centre(raw_rows, raw_cols)) * scale + centre(new_rows, new_cols)


def _box(mask_hxw: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    """(top, bottom) and (left, right) of a mask's bounding box (ends exclusive)."""
    rows, cols = np.nonzero(mask_hxw)
    if len(rows) == 0:
        raise ValueError("the object is not in view of the reference camera")
    return (int(rows.min()), int(rows.max()) + 1), (int(cols.min()), int(cols.max()) + 1)


# 2. The denoisers -------------------------------------------------------------------------------------


class _OracleDenoiser:
    """The exact denoiser of the object's renders (module docstring); subclasses say which camera."""

    unet = None
    """No weights: BSD's LoRAs have nothing to adapt."""
    balance = "oracle"
    """Its row of the hybrid balance table (backend.config.HYBRID_BALANCE)."""
    white_background = False
    """True: the data's background is white (Zero123's); False: any plain colour, estimated."""

    def __init__(self, name: str, obj: OracleObject, resolution: int, vae: Any = None) -> None:
        device = obj.verts_vx3.device
        self.name = name
        self.object = obj
        self.resolution = resolution
        self.vae = vae
        self.kind = "pixel" if vae is None else "latent"
        self.latent_scale = 1.0 if vae is None else float(vae.config.scaling_factor)
        self.alphas_cumprod_t = oracle_alphas_cumprod(device)
        self.device = device
        self.dtype = torch.float32

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod_t.shape[0])

    def encode(self, rgb_bxhxwx3: torch.Tensor) -> torch.Tensor:
        return images_to_x0(rgb_bxhxwx3, self.resolution, self.vae, self.latent_scale)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return x0_to_images(x0, self.vae, self.latent_scale)

    def cameras_for(self, cond: Conditioning) -> Cameras:
        raise NotImplementedError

    @torch.no_grad()
    def predict_noise(self, x_t: torch.Tensor, t_b: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """ε* of the object seen from `cameras_for(cond)`."""
        cameras = self.cameras_for(cond).with_size(self.resolution, self.resolution)
        alpha_bar = self.alphas_cumprod_t[t_b].view(-1, 1, 1, 1)
        x0_hat = self.posterior_mean(x_t.float(), alpha_bar, cameras)
        return (x_t.float() - alpha_bar.sqrt() * x0_hat) / (1.0 - alpha_bar).sqrt()

    def posterior_mean(self, x_t: torch.Tensor, alpha_bar: torch.Tensor, cameras: Cameras) -> torch.Tensor:
        """E[x₀ | x_t] over the looks and the background colour."""
        views = self._render_unique(cameras)
        mask_bxhxwx1 = views.mask
        looks = [views.rgb, (views.normal + 1.0) * 0.5 * mask_bxhxwx1]  # [B, H, W, 3] in [0, 1], 0 outside
        root = alpha_bar.sqrt()
        if self.vae is None:
            mask = mask_bxhxwx1.permute(0, 3, 1, 2)
            if self.white_background:
                background = torch.ones_like(x_t[:, :, :1, :1])
            else:
                outside = (1.0 - mask).sum(dim=(2, 3), keepdim=True)
                background = ((1.0 - mask) * x_t).sum(dim=(2, 3), keepdim=True) / (root * outside).clamp_min(1e-8)
                background = torch.where(outside > 0, background.clamp(-1.0, 1.0), torch.ones_like(background))
            candidates = [(look.permute(0, 3, 1, 2) * 2.0 - 1.0) * mask + background * (1.0 - mask) for look in looks]
        else:
            candidates = [self.encode(look + (1.0 - mask_bxhxwx1)) for look in looks]
        stack_kxbxcxhxw = torch.stack(candidates)
        distance_kxb = ((x_t[None] - root[None] * stack_kxbxcxhxw) ** 2).flatten(2).sum(-1)
        weights_kxb = torch.softmax(-distance_kxb / (2.0 * (1.0 - alpha_bar.view(1, -1))), dim=0)
        return (weights_kxb[..., None, None, None] * stack_kxbxcxhxw).sum(0)

    def _render_unique(self, cameras: Cameras):
        """Renders of the cameras; a batch made of two equal halves (guidance's pair) renders once."""
        half = len(cameras) // 2
        if len(cameras) % 2 == 0 and half > 0 and torch.equal(cameras.c2w_bx4x4[:half], cameras.c2w_bx4x4[half:]) \
                and torch.equal(cameras.fov_deg_b[:half], cameras.fov_deg_b[half:]):
            views = self.object.render(cameras[:half])
            return type(views)(cameras, *(torch.cat([part, part]) for part in (views.rgb, views.mask, views.depth,
                                                                                views.normal)))
        return self.object.render(cameras)


class OraclePrior2D(_OracleDenoiser):
    """The 2D prior: the object seen from each sample's own camera (`cond.cameras`)."""

    def __init__(self, name: str, obj: OracleObject, resolution: int = PRIOR_RESOLUTION, vae: Any = None) -> None:
        super().__init__(name, obj, resolution, vae)
        self.prompt_cache: dict = {}

    def embed_texts(self, texts: list[str], max_tokens: int) -> torch.Tensor:
        """[N, 1, 1] zeros: the oracle knows its object and reads no text."""
        return torch.zeros(len(texts), 1, 1, device=self.device)

    def cameras_for(self, cond: Conditioning) -> Cameras:
        if cond.cameras is None:
            raise ValueError("cond.cameras: the oracle 2D prior is camera-aware and needs each sample's camera")
        return cond.cameras


@dataclass
class OracleReference:
    """What the oracle Zero123 keeps of the reference image (it knows the object already)."""

    rgb_hxwx3: torch.Tensor
    """The reference composited on white, [H, W, 3]."""


class OracleZero123(_OracleDenoiser):
    """Zero123: the object seen from `REFERENCE_POSE` composed with each sample's relative pose,
    decoded from Zero123's conditioning [Δpolar, sin Δazimuth, cos Δazimuth, Δradius]."""

    variant = "zero123"
    white_background = True

    def __init__(self, name: str, obj: OracleObject, resolution: int = ZERO123_RESOLUTION, vae: Any = None) -> None:
        super().__init__(name, obj, resolution, vae)

    def encode_reference(self, rgb_hxwx3: torch.Tensor, mask_hxwx1: torch.Tensor | None = None) -> OracleReference:
        rgb = rgb_hxwx3.to(self.device, torch.float32)
        if mask_hxwx1 is not None:
            mask = mask_hxwx1.to(self.device, torch.float32)
            rgb = rgb * mask + (1.0 - mask)
        return OracleReference(rgb)

    def cameras_for(self, cond: Conditioning) -> Cameras:
        if cond.pose_bx4 is None:
            raise ValueError("cond.pose_bx4: the oracle Zero123 needs each sample's pose relative to the reference")
        pose = cond.pose_bx4.float().to(self.device)
        elevation = REFERENCE_POSE.elevation_deg - torch.rad2deg(pose[:, 0])
        azimuth = REFERENCE_POSE.azimuth_deg + torch.rad2deg(torch.atan2(pose[:, 1], pose[:, 2]))
        distance = REFERENCE_POSE.distance + pose[:, 3]
        fov = torch.full_like(distance, REFERENCE_POSE.fov_deg)
        return Cameras.from_orbit(elevation, azimuth, distance, fov, self.resolution, self.resolution)


# 3. The depth estimator ---------------------------------------------------------------------------------


class OracleDepthModel(torch.nn.Module):
    """A transformers-style depth estimator: `model(pixel_values=...)` returns `predicted_depth`
    [1, H, W], the relative inverse depth (larger = nearer, 0 off the object) that the models it
    stands in for (Depth Anything, DPT) predict, here the true one of the reference view."""

    def __init__(self, obj: OracleObject) -> None:
        super().__init__()
        self.object = obj

    def forward(self, pixel_values: torch.Tensor):
        from transformers.modeling_outputs import DepthEstimatorOutput

        height, width = pixel_values.shape[-2:]
        views = self.object.render(view_cameras([REFERENCE_POSE], int(height), int(width), self.object.verts_vx3.device))
        depth = views.depth[..., 0]
        inverse = torch.where(views.mask[..., 0] > 0.5, 1.0 / depth.clamp_min(1e-6), torch.zeros_like(depth))
        return DepthEstimatorOutput(predicted_depth=inverse)


class OracleDepthProcessor:
    """The image processor half: uint8 [H, W, 3] pixels to `pixel_values` [1, 3, H, W] in [0, 1]."""

    def __call__(self, images: np.ndarray, return_tensors: str = "pt"):
        from transformers import BatchFeature

        pixels = torch.as_tensor(np.asarray(images)).permute(2, 0, 1)[None].float() / 255.0
        return BatchFeature({"pixel_values": pixels})


def oracle_depth(name: str, obj: OracleObject):
    """The depth role, in the shape `backend.guidance.models.Estimator` has."""
    from backend.guidance.models import Estimator

    return Estimator(name=name, model=OracleDepthModel(obj), processor=OracleDepthProcessor(), device=obj.verts_vx3.device)


# 4. Loading ------------------------------------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[Path, Path | None]:
    """"oracle:MESH[,TEXTURE]" -> (mesh path, texture path or None); ModelLoadError if malformed."""
    body = spec[len(SPEC_PREFIX):] if spec.startswith(SPEC_PREFIX) else ""
    parts = [part.strip() for part in body.split(",")]
    if not parts[0] or len(parts) > 2 or (len(parts) == 2 and not parts[1]):
        raise ModelLoadError("prior2d", spec, f"--models {spec!r}: expected oracle:MESH or oracle:MESH,TEXTURE "
                             f"(an .obj/.glb/.gltf mesh and an optional base-colour image)")
    texture = Path(parts[1]).expanduser() if len(parts) == 2 else None
    return Path(parts[0]).expanduser(), texture


def load_oracle_models(spec: str, device: torch.device, roles: Sequence[str], vae: Any = None):
    """`GuidanceModels` of oracles for the requested roles (no matting: the reference has alpha)."""
    from backend.guidance.models import GuidanceModels

    mesh_path, texture_path = parse_spec(spec)
    obj = OracleObject.load(mesh_path, texture_path, device)
    prior = OraclePrior2D(spec, obj, vae=vae) if "prior2d" in roles or "texture" in roles else None
    return GuidanceModels(
        prior2d=prior if "prior2d" in roles else None,
        zero123=OracleZero123(spec, obj, vae=vae) if "zero123" in roles else None,
        depth=oracle_depth(spec, obj) if "depth" in roles else None,
        matting=None,
        texture=prior if "texture" in roles else None,  # BSD runs on the oracle prior itself
        device=device,
        dtype=torch.float32,
    )
