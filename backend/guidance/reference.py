"""The reference image: validated, masked, recentred, with an estimated depth; and its losses.

    mask_image(image, models=None) -> MaskedImage
    prepare_reference(image | MaskedImage, size=256, border=0.15, models=None, device="cpu") -> ReferenceImage
    reference_losses(render: ReferenceRender, reference: ReferenceImage) -> dict[str, Tensor]

Preparing (all on the CPU side, before any GPU work; bad input raises GuidanceInputError("image")):
  1. decode PNG/JPEG bytes (at most 32 MiB, 4,096 px a side) or take an [H, W, 3|4] array;
  2. the mask, on the image as sent: the alpha channel where present; else the matting model;
     else the pixels that differ from the median colour of the image border (for objects
     photographed on a plain background); an empty mask is an error. Steps 1 and 2 are
     `mask_image`: a job does them once and prepares each size it needs from the result;
  3. recentre: the mask's bounding box is centred in a square whose side leaves `border` of the
     output free on each side around the longer side of the box, then resized to `size` with
     premultiplied alpha (the colour under transparent pixels never bleeds into the edge, so
     no dark halo);
  4. the RGB composited on white (Zero123's convention);
  5. depth (when a depth estimator is loaded): the estimator's output as it comes, disparity
     (relative inverse depth: Depth Anything, DPT) or metric depth (`Estimator.output`),
     standardised (zero mean, unit std) inside the mask; a flat estimate is dropped (depth
     None), which switches the depth and normal losses off.

Losses, each over the reference view's render (`ReferenceRender`, resized reference if needed):
    rgb     Σ m·(rgb − rgb_ref)² / (3·Σ m)            masked MSE, m = reference mask
    mask    mean (opacity − m)²
    depth   1 − Pearson(d, depth_ref) over pixels inside both masks, d the render's disparity
            1/depth for a disparity estimate, its depth for a metric one         (needs depth)
    normal  mean over the same pixels of 1 − cos(n_render, n_ref), n_ref from depth_ref after a
            least-squares scale and shift onto d (no gradient), back to depth, through the
            render's field of view                                             (needs depth)
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from backend.guidance.errors import GuidanceInputError

MAX_IMAGE_BYTES = 32 * 1024 * 1024
"""Largest encoded image accepted (PROTOCOL.md section 6)."""
MAX_IMAGE_SIDE = 4096
"""Largest width or height accepted."""
BORDER_COLOUR_TOLERANCE = 0.08
"""Fallback mask: a pixel is the object when its colour is this far (RMS, 0–1) from the border's."""


@dataclass
class ReferenceImage:
    """The prepared reference image, square, object centred."""

    rgb_hxwx3: torch.Tensor
    """[S, S, 3] float32 in [0, 1], composited on white, row 0 on top."""
    mask_hxwx1: torch.Tensor
    """[S, S, 1] float32 in [0, 1]: the object's mask (soft where alpha was soft)."""
    depth_hxwx1: torch.Tensor | None
    """[S, S, 1] float32 estimated disparity or depth (`depth_output`), standardised inside the
    mask, 0 outside; None without a depth estimator."""
    mask_source: str
    """Where the mask came from: "alpha", "matting" or "border_colour"."""
    depth_output: str = "disparity"
    """What `depth_hxwx1` measures: "disparity" (larger = nearer) or "depth" (larger = farther)."""


@dataclass
class MaskedImage:
    """The reference image decoded and masked at its own size (steps 1 and 2), before any resizing."""

    rgb_hxwx3: np.ndarray
    """[H, W, 3] float32 in [0, 1], as sent."""
    mask_hxw: np.ndarray
    """[H, W] float32 in [0, 1], not empty."""
    source: str
    """Where the mask came from: "alpha", "matting" or "border_colour"."""


@dataclass
class ReferenceRender:
    """A render from the reference camera, the inputs of `reference_losses`."""

    rgb_bxhxwx3: torch.Tensor
    """[B, H, W, 3] rendered colour in [0, 1]."""
    mask_bxhxwx1: torch.Tensor
    """[B, H, W, 1] rendered opacity in [0, 1]."""
    depth_bxhxwx1: torch.Tensor | None
    """[B, H, W, 1] depth along the view axis, or None (depth and normal losses then off)."""
    normal_cam_bxhxwx3: torch.Tensor | None
    """[B, H, W, 3] unit normals in camera space (OpenGL: x right, y up, z towards the viewer), or None."""
    fov_deg: float
    """Vertical field of view of the reference camera, for turning depth into normals."""


# ----------------------------------------------------------------------------- preparing


def decode_image(image: bytes | np.ndarray) -> np.ndarray:
    """[H, W, 3|4] float32 in [0, 1] from PNG/JPEG bytes or an array; GuidanceInputError otherwise."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(image))
    if isinstance(image, np.ndarray):
        return _check_array(image)
    raise GuidanceInputError("image", f"expected PNG/JPEG bytes or an [H, W, 3|4] array, got {type(image).__name__}")


def _decode_bytes(data: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if len(data) > MAX_IMAGE_BYTES:
        raise GuidanceInputError("image", f"is {len(data)} bytes; at most {MAX_IMAGE_BYTES} (32 MiB) are accepted")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if max(width, height) > MAX_IMAGE_SIDE:
                raise GuidanceInputError(
                    "image", f"is {width}×{height} pixels; at most {MAX_IMAGE_SIDE} a side are accepted"
                )
            if opened.format not in ("PNG", "JPEG"):
                raise GuidanceInputError("image", f"is a {opened.format} image; send a PNG or JPEG")
            has_alpha = "A" in opened.getbands() or "transparency" in opened.info
            pixels = np.asarray(opened.convert("RGBA" if has_alpha else "RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, GuidanceInputError):
            raise
        raise GuidanceInputError(
            "image", f"is not a PNG or JPEG image ({len(data)} bytes starting {data[:8]!r})"
        ) from None
    return pixels.astype(np.float32) / 255.0


def _check_array(array: np.ndarray) -> np.ndarray:
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise GuidanceInputError("image", f"array must be [H, W, 3|4], got shape {array.shape}")
    if max(array.shape[:2]) > MAX_IMAGE_SIDE or min(array.shape[:2]) < 1:
        raise GuidanceInputError("image", f"is {array.shape[1]}×{array.shape[0]} pixels; 1 to {MAX_IMAGE_SIDE} a side")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise GuidanceInputError("image", f"array must be uint8 or finite floats in [0, 1], got {array.dtype}")
    if array.min() < 0.0 or array.max() > 1.0:
        raise GuidanceInputError("image", f"float array values must lie in [0, 1], got [{array.min()}, {array.max()}]")
    return array.astype(np.float32)


def border_colour_mask(rgb_hxwx3: np.ndarray) -> np.ndarray:
    """[H, W] mask of pixels unlike the median colour of the one-pixel image border."""
    border = np.concatenate([rgb_hxwx3[0], rgb_hxwx3[-1], rgb_hxwx3[:, 0], rgb_hxwx3[:, -1]])
    background = np.median(border, axis=0)
    distance = np.sqrt(((rgb_hxwx3 - background) ** 2).mean(axis=-1))
    return (distance > BORDER_COLOUR_TOLERANCE).astype(np.float32)


@torch.no_grad()
def _run_matting(matting, rgb_hxwx3: np.ndarray) -> np.ndarray:
    """[H, W] foreground probability from a segmentation model (label 0 of 1, or label 1 of 2+)."""
    pixels = (rgb_hxwx3 * 255.0 + 0.5).astype(np.uint8)
    inputs = matting.processor(images=pixels, return_tensors="pt").to(matting.device)
    logits = matting.model(pixel_values=inputs["pixel_values"]).logits.float()
    if logits.shape[1] == 1:
        probability = torch.sigmoid(logits[:, 0])
    else:
        probability = torch.softmax(logits, dim=1)[:, 1]
    probability = F.interpolate(probability[None], rgb_hxwx3.shape[:2], mode="bilinear", align_corners=False)
    return probability[0, 0].cpu().numpy()


def _recentre(rgba_hxwx4: np.ndarray, size: int, border: float) -> torch.Tensor:
    """[size, size, 4] premultiplied (rgb·a, a): the mask's bounding box centred, its longer
    side (1 − 2·border)·size."""
    mask = rgba_hxwx4[..., 3] > 0.5
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    object_side = max(bottom - top, right - left)
    side = int(math.ceil(object_side / (1.0 - 2.0 * border)))
    canvas = np.zeros((side, side, 4), dtype=np.float32)
    row0 = (side - (bottom - top)) // 2
    col0 = (side - (right - left)) // 2
    crop = rgba_hxwx4[top:bottom, left:right]
    premultiplied = np.concatenate([crop[..., :3] * crop[..., 3:], crop[..., 3:]], axis=-1)
    canvas[row0 : row0 + bottom - top, col0 : col0 + right - left] = premultiplied
    square = torch.from_numpy(canvas).permute(2, 0, 1)[None]
    resized = F.interpolate(square, (size, size), mode="bilinear", align_corners=False, antialias=True)
    return resized[0].permute(1, 2, 0).clamp(0.0, 1.0)


@torch.no_grad()
def _estimate_depth(depth, rgb_hxwx3: torch.Tensor, mask_hxwx1: torch.Tensor) -> torch.Tensor | None:
    """[S, S, 1] the estimator's disparity or depth, standardised inside the mask; None when the
    estimate is flat inside the mask (nothing to learn from)."""
    pixels = (rgb_hxwx3.numpy() * 255.0 + 0.5).astype(np.uint8)
    inputs = depth.processor(images=pixels, return_tensors="pt").to(depth.device)
    predicted = depth.model(pixel_values=inputs["pixel_values"]).predicted_depth.float()
    predicted = F.interpolate(predicted[:, None], rgb_hxwx3.shape[:2], mode="bilinear", align_corners=False)
    relative = predicted[0, 0].cpu().double()[..., None]
    inside = mask_hxwx1 > 0.5
    values = relative[inside]
    if values.numel() < 2 or float(values.std()) < 1e-4 * max(1.0, float(values.abs().max())):
        return None
    standardised = (relative - values.mean()) / values.std()
    return torch.where(inside, standardised, torch.zeros_like(standardised)).float()


def mask_image(image: bytes | np.ndarray, models=None) -> MaskedImage:
    """Decode, validate and mask the reference image (steps 1 and 2; the matting model, when
    `models` has one and the image has no alpha, runs here)."""
    # 1. Decode and validate.
    pixels = decode_image(image)
    rgb = pixels[..., :3]
    # 2. The mask.
    matting = getattr(models, "matting", None)
    if pixels.shape[2] == 4:
        mask, source = pixels[..., 3], "alpha"
    elif matting is not None:
        mask, source = _run_matting(matting, rgb), "matting"
    else:
        mask, source = border_colour_mask(rgb), "border_colour"
    if not (mask > 0.5).any():
        raise GuidanceInputError(
            "image", f"has nothing in its mask (mask from {source}); send a PNG whose alpha marks the object"
        )
    return MaskedImage(rgb, mask, source)


def prepare_reference(
    image: bytes | np.ndarray | MaskedImage,
    size: int = 256,
    border: float = 0.15,
    models=None,
    device: torch.device | str = "cpu",
) -> ReferenceImage:
    """Validate and prepare the reference image (module docstring); tensors on `device`. A
    `MaskedImage` is resized as it is (its mask is not made again)."""
    if not 0.0 <= border < 0.5:
        raise ValueError(f"border: expected a fraction in [0, 0.5), got {border}")
    # 1. Decode and validate; 2. the mask.
    masked = image if isinstance(image, MaskedImage) else mask_image(image, models)
    # 3. Recentre and resize (premultiplied); 4. composite on white.
    square = _recentre(np.concatenate([masked.rgb_hxwx3, masked.mask_hxw[..., None]], axis=-1), size, border)
    mask_t = square[..., 3:]
    rgb_t = (square[..., :3] + (1.0 - mask_t)).clamp(0.0, 1.0)
    # 5. Depth.
    depth_model = getattr(models, "depth", None)
    depth_t = _estimate_depth(depth_model, rgb_t, mask_t) if depth_model is not None else None
    device = torch.device(device)
    return ReferenceImage(
        rgb_hxwx3=rgb_t.to(device),
        mask_hxwx1=mask_t.to(device),
        depth_hxwx1=depth_t.to(device) if depth_t is not None else None,
        mask_source=masked.source,
        depth_output=depth_model.output if depth_model is not None else "disparity",
    )


# ----------------------------------------------------------------------------- losses


def pearson(x_n: torch.Tensor, y_n: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two 1-D tensors."""
    x = x_n - x_n.mean()
    y = y_n - y_n.mean()
    return (x * y).sum() / (x.norm() * y.norm()).clamp_min(1e-8)


def depth_to_normals(depth_bxhxw: torch.Tensor, fov_deg: float) -> torch.Tensor:
    """[B, H, W, 3] camera-space unit normals (towards the viewer) of a view-axis depth map."""
    batch, height, width = depth_bxhxw.shape
    tan_half = math.tan(math.radians(fov_deg) / 2.0)
    aspect = width / height
    ys = 1.0 - (torch.arange(height, device=depth_bxhxw.device) + 0.5) / height * 2.0
    xs = (torch.arange(width, device=depth_bxhxw.device) + 0.5) / width * 2.0 - 1.0
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack(
        [grid_x * tan_half * aspect * depth_bxhxw, grid_y * tan_half * depth_bxhxw, -depth_bxhxw], dim=-1
    )
    # Central differences (one-sided at the edges): right along columns, down along rows.
    padded = F.pad(points.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate").permute(0, 2, 3, 1)
    right = padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2]
    down = padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1]
    return F.normalize(torch.linalg.cross(down, right, dim=-1), dim=-1, eps=1e-12)


def _resized(tensor_hxwxc: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize; antialiased, so a reference shrunk to a small render keeps smooth edges."""
    if tensor_hxwxc.shape[:2] == (height, width):
        return tensor_hxwxc
    image = tensor_hxwxc.permute(2, 0, 1)[None]
    resized = F.interpolate(image, (height, width), mode="bilinear", align_corners=False, antialias=True)
    return resized[0].permute(1, 2, 0)


def reference_losses(render: ReferenceRender, reference: ReferenceImage) -> dict[str, torch.Tensor]:
    """The reference-view losses; "depth" and "normal" only when both sides have what they need."""
    height, width = render.rgb_bxhxwx3.shape[1:3]
    device = render.rgb_bxhxwx3.device
    mask_ref = _resized(reference.mask_hxwx1.to(device), height, width)[None]
    rgb_ref = _resized(reference.rgb_hxwx3.to(device), height, width)[None]
    # 1. Masked RGB and the mask.
    batch = render.rgb_bxhxwx3.shape[0]
    squared = (mask_ref * (render.rgb_bxhxwx3 - rgb_ref) ** 2).sum()
    losses = {
        "rgb": squared / (3.0 * batch * mask_ref.sum()).clamp_min(1.0),
        "mask": F.mse_loss(render.mask_bxhxwx1, mask_ref.expand_as(render.mask_bxhxwx1)),
    }
    if reference.depth_hxwx1 is None or render.depth_bxhxwx1 is None:
        return losses
    # 2. Depth: 1 − Pearson inside both masks, per image, in the estimate's convention.
    disparity = reference.depth_output == "disparity"
    depth_ref = _resized(reference.depth_hxwx1.to(device), height, width)[..., 0]
    depth_losses, normal_losses = [], []
    for b in range(batch):
        valid = (mask_ref[0, ..., 0] > 0.5) & (render.mask_bxhxwx1[b, ..., 0].detach() > 0.5)
        if int(valid.sum()) < 3:
            continue
        depth = render.depth_bxhxwx1[b, ..., 0]
        seen = 1.0 / depth.clamp_min(1e-6) if disparity else depth
        depth_losses.append(1.0 - pearson(seen[valid], depth_ref[valid]))
        # 3. Normal: the estimate aligned to the render's depth scale, then differentiated.
        if render.normal_cam_bxhxwx3 is None:
            continue
        with torch.no_grad():
            design = torch.stack([depth_ref[valid], torch.ones_like(depth_ref[valid])], dim=-1)
            scale_shift = torch.linalg.lstsq(design, seen[valid].detach()[:, None]).solution[:, 0]
            aligned = depth_ref * scale_shift[0] + scale_shift[1]
            aligned_depth = 1.0 / aligned.clamp_min(1e-6) if disparity else aligned
            normal_ref = depth_to_normals(aligned_depth[None], render.fov_deg)[0]
        cosine = (render.normal_cam_bxhxwx3[b][valid] * normal_ref[valid]).sum(-1)
        normal_losses.append((1.0 - cosine).mean())
    zero = render.depth_bxhxwx1.sum() * 0.0
    losses["depth"] = torch.stack(depth_losses).mean() if depth_losses else zero
    if render.normal_cam_bxhxwx3 is not None:
        losses["normal"] = torch.stack(normal_losses).mean() if normal_losses else zero
    return losses
