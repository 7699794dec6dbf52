"""The panel's settings as a typed value, turned into `submit` params (PROTOCOL.md section 6).

The Blender layer copies its properties into `JobSettings`, applies operator overrides, and calls
`generate_params` / `refine_params`; the result is checked with the protocol's own validation
before anything is sent, so a bad value is reported at once with its field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STAGES = ("coarse", "geometry", "texture")
"""Stage names a `steps` override may name, in pipeline order."""

QUALITIES = ("draft", "standard", "high")
"""Allowed `quality` values."""

TEXTURE_SIZES = (256, 512, 1024, 2048, 4096)
"""Allowed `texture_size` values."""


class SettingsError(ValueError):
    """A setting is invalid; `field` names it (e.g. "steps" or "params.camera.fov_deg")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class CameraSettings:
    """Camera ranges sampled during optimisation and the view of the reference image."""

    elevation_deg: tuple[float, float] = (-10.0, 45.0)
    """[min, max] camera elevation in degrees."""
    azimuth_deg: tuple[float, float] = (-180.0, 180.0)
    """[min, max] camera azimuth in degrees (0: Blender's front view)."""
    distance: tuple[float, float] = (3.8, 3.8)
    """[min, max] camera distance from the origin in metres."""
    fov_deg: tuple[float, float] = (20.0, 20.0)
    """[min, max] vertical field of view in degrees."""
    reference_elevation_deg: float = 0.0
    """Elevation of the view the reference image was taken from."""
    reference_azimuth_deg: float = 0.0
    """Azimuth of the reference view."""
    reference_distance: float = 3.8
    """Distance of the reference view."""
    reference_fov_deg: float = 20.0
    """Field of view of the reference view."""

    def to_params(self) -> dict:
        """The `camera` map of the submit params."""
        return {
            "reference": {
                "elevation_deg": float(self.reference_elevation_deg),
                "azimuth_deg": float(self.reference_azimuth_deg),
                "distance": float(self.reference_distance),
                "fov_deg": float(self.reference_fov_deg),
            },
            "elevation_deg": [float(v) for v in self.elevation_deg],
            "azimuth_deg": [float(v) for v in self.azimuth_deg],
            "distance": [float(v) for v in self.distance],
            "fov_deg": [float(v) for v in self.fov_deg],
        }


@dataclass
class JobSettings:
    """Everything the panel sets for a job."""

    prompt: str = ""
    """What to make; 1 to 1,000 characters."""
    negative_prompt: str = ""
    """What to avoid."""
    camera: CameraSettings = field(default_factory=CameraSettings)
    """Camera ranges and the reference view."""
    quality: str = "standard"
    """draft, standard or high."""
    seed: int = 0
    """Random seed, 0 to 2**31 - 1."""
    texture_size: int = 1024
    """Texture edge in pixels."""
    target_faces: int | None = None
    """Face budget of a generated mesh (0 keeps every face); None for the quality's default."""
    steps: dict[str, int] = field(default_factory=dict)
    """Per-stage step overrides, e.g. {"coarse": 20}; empty for the quality's defaults."""
    mesh_every: int = 250
    """A mesh event every this many steps."""
    preview_every: int = 25
    """A preview image every this many steps."""


def parse_steps(text: str, allowed: tuple[str, ...] = STAGES) -> dict[str, int]:
    """Parse "coarse=N,geometry=N,texture=N" (any subset, any order) into a dict.

    >>> parse_steps("coarse=20, texture=5")
    {'coarse': 20, 'texture': 5}
    """
    steps: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep or name not in allowed:
            raise SettingsError(
                "steps", f"steps: {part!r} is not NAME=COUNT with NAME one of {', '.join(allowed)}"
            )
        if not value.isdigit() or not 0 <= int(value) <= 100_000:
            raise SettingsError("steps", f"steps: {name}={value!r} must be a whole number from 0 to 100000")
        if name in steps:
            raise SettingsError("steps", f"steps: {name} is given twice in {text!r}")
        steps[name] = int(value)
    return steps


def generate_params(settings: JobSettings, has_image: bool = False) -> dict:
    """The `params` map of a `generate` submit; the prompt may be empty when an image is sent."""
    prompt = settings.prompt.strip()
    if not prompt and not has_image:
        raise SettingsError("params.prompt", "params.prompt: type a prompt or choose a reference image first (both are empty)")
    if settings.quality not in QUALITIES:
        raise SettingsError("params.quality", f"params.quality: {settings.quality!r} is not one of {QUALITIES}")
    face_budget = {} if settings.target_faces is None else {"target_faces": int(settings.target_faces)}
    return {
        "prompt": prompt,
        "negative_prompt": settings.negative_prompt,
        "camera": settings.camera.to_params(),
        "quality": settings.quality,
        "steps": dict(settings.steps),
        "seed": int(settings.seed),
        "texture_size": int(settings.texture_size),
        "mesh_every": int(settings.mesh_every),
        "preview_every": int(settings.preview_every),
        **face_budget,
    }


def refine_params(settings: JobSettings, has_image: bool = False) -> dict:
    """The `params` map of a `refine_texture` submit (only a `texture` step override is kept)."""
    unknown = sorted(set(settings.steps) - {"texture"})
    if unknown:
        raise SettingsError("steps", f"steps: refine texture runs only the texture stage, not {', '.join(unknown)}")
    params = generate_params(settings, has_image)
    params.pop("target_faces", None)  # a refined mesh keeps its faces
    return params
