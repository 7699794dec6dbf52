"""The pipeline's typed config tree and its presets.

One tree of dataclasses configures a whole job: the three stages (coarse NeuS, DMTet geometry,
BSD texture), the cameras and the streaming cadence. Presets are plain Python objects
(`PRESETS["draft" | "standard" | "high" | "tiny"]`); a job's config is a preset with the job's
params applied (`config_for_job`). The `tiny` preset is what the server and the CLI use with the
tiny test models (`--models tiny`): small renders, a small DMTet grid, few steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

STAGES: tuple[str, ...] = ("coarse", "geometry", "texture")
"""The pipeline's stages, in the order they run."""


@dataclass(frozen=True)
class HybridBalance:
    """The weights and guidance scales of the hybrid SDS (2D prior + Zero123) for one kind of
    2D prior; the coarse and geometry stages share them (docs/pipeline.md, "Following
    DreamCraft3D")."""

    sds_weight: float
    """Weight of the 2D prior's SDS loss (lambda_sd)."""
    zero123_weight: float
    """Weight of Zero123's 3D-SDS loss (lambda_3d_sd); image jobs only."""
    guidance_scale: float
    """Classifier-free guidance scale of the 2D prior."""
    guidance_scale_3d: float = 5.0
    """Classifier-free guidance scale of Zero123."""
    perp_neg: bool = False
    """Perp-Neg for the 2D prior (four UNet passes per sample instead of two)."""


HYBRID_BALANCE: dict[str, HybridBalance] = {
    # DeepFloyd IF, as DreamCraft3D runs it: lambda_sd = lambda_3d_sd = 0.1, CFG 20, Perp-Neg.
    "pixel": HybridBalance(sds_weight=0.1, zero123_weight=0.1, guidance_scale=20.0, perp_neg=True),
    # Stable Diffusion 2.1, as Magic123 balances it against Zero123: 0.025 at CFG 100 vs 1.0.
    "latent": HybridBalance(sds_weight=0.025, zero123_weight=1.0, guidance_scale=100.0),
    # The oracles (backend.guidance.oracle): exact denoisers of one known object. Their scores are
    # not a real prior's, so their row is measured on the oracle generation bench
    # (docs/benchmarks.md, "Generation on oracles"); it says nothing about the rows above.
    "oracle": HybridBalance(sds_weight=1.0, zero123_weight=2.0, guidance_scale=50.0),
}
"""The hybrid balance by the 2D prior's `balance` key: its kind ("pixel" for IF, "latent" for
SD), or "oracle" for the oracles."""


@dataclass(frozen=True)
class CoarseConfig:
    """Stage 1: a NeuS field optimised with hybrid SDS and reference-view losses."""

    steps: int
    """Optimisation steps; 0 skips the stage (only allowed for refine jobs)."""
    render_res: int
    """Side in pixels of the square NeuS renders fed to the guidance."""
    num_samples: int
    """Samples per ray of the NeuS volume renderer."""
    batch: int = 1
    """Random views per step."""
    lr: float = 1e-2
    """Adam learning rate of the hash grid; the MLPs use a tenth of it."""
    ref_rgb_weight: float = 1000.0
    """Reference-view RGB loss weight (image jobs only)."""
    ref_mask_weight: float = 100.0
    """Reference-view mask loss weight (image jobs only)."""
    ref_depth_weight: float = 0.05
    """Reference-view depth-correlation loss weight (image jobs only)."""
    ref_normal_weight: float = 0.0
    """Reference-view normal loss weight (needs a normal estimate; 0 disables)."""
    eikonal_weight: float = 0.1
    """Eikonal regulariser weight on the SDF gradient norm."""
    sparsity_weight: float = 0.1
    """Opacity sparsity weight, keeps empty space empty."""
    opaque_weight: float = 0.1
    """Weight of the opaque loss (binary entropy of the opacity): a pixel is either empty or
    covered, never half."""
    widen_fraction: float = 0.04
    """Fraction of the stage over which the view range widens from the reference view to the full
    range (progressive view training); DreamCraft3D widens over its first 200 of 5000 steps."""
    anneal_fraction: float = 0.04
    """Fraction of the stage over which the timestep range moves from `t_start` to `t_end`, then
    stays there; DreamCraft3D anneals over its first 200 of 5000 steps."""
    t_start: tuple[float, float] = (0.7, 0.85)
    """Diffusion timestep range (fractions of T) at the stage start: large t shapes."""
    t_end: tuple[float, float] = (0.2, 0.5)
    """Timestep range from the end of the annealing on: small t details."""
    mesh_res: int = 64
    """DMTet grid resolution used to extract the streamed meshes from the SDF."""
    grid_levels: int = 16
    """Hash-grid levels of the NeuS field."""
    grid_log2_table_size: int = 19
    """log2 of the rows of each hash-grid level's table."""
    grid_start_levels: int = 8
    """Hash-grid levels active at step 0 (coarse-to-fine); 0 = all from the start."""
    grid_level_every: int = 100
    """One more hash-grid level every this many steps."""
    hidden_dim: int = 64
    """Width of the NeuS MLPs."""
    occupancy_res: int = 64
    """Resolution of the occupancy grid that skips empty space (0 disables it)."""
    occupancy_every: int = 16
    """Steps between occupancy-grid updates."""


@dataclass(frozen=True)
class GeometryConfig:
    """Stage 2: a DMTet mesh built from the NeuS SDF, refined on rasterised normal renders."""

    steps: int
    """Optimisation steps; 0 extracts the DMTet mesh once and goes on to the texture."""
    render_res: int
    """Side in pixels of the rasterised normal/shaded renders."""
    dmtet_res: int
    """Resolution of the tetrahedral grid (cells along one side)."""
    batch: int = 1
    """Random views per step."""
    lr: float = 5e-3
    """Adam learning rate of the SDF values and vertex offsets."""
    rgb_every: int = 4
    """The 2D prior sees the surface's colours (NeuS's colour field) every this many steps and
    its normals on the others; Zero123 sees the colours on every step."""
    ref_rgb_weight: float = 1000.0
    """Reference-view RGB loss weight (image jobs only)."""
    ref_mask_weight: float = 100.0
    """Reference-view mask loss weight (image jobs only)."""
    ref_depth_weight: float = 0.05
    """Reference-view depth-correlation loss weight (image jobs only)."""
    normal_consistency: tuple[float, float] = (100.0, 10.0)
    """Weight of the neighbouring-face normal consistency regulariser relative to the 2D prior's
    SDS weight, at the start of the ramp and from its end on (DreamCraft3D: 10 then 1 against
    lambda_sd = 0.1)."""
    normal_consistency_ramp: tuple[float, float] = (0.2, 0.4)
    """The fractions of the stage between which the normal-consistency weight moves linearly from
    its first value to its second (DreamCraft3D: steps 1000 to 2000 of 5000)."""
    t_range: tuple[float, float] = (0.02, 0.5)
    """The 2D prior's timestep range (fractions of T), fixed: geometry refines, it does not
    reinvent."""
    t_range_3d: tuple[float, float] = (0.2, 0.5)
    """Zero123's timestep range, fixed."""


@dataclass(frozen=True)
class TextureConfig:
    """Stage 3: a colour field on the fixed surface, sharpened by BSD, then baked into UVs."""

    steps: int
    """Optimisation steps; 0 bakes the current colours without optimising."""
    render_res: int
    """Side in pixels of the rasterised colour renders."""
    batch: int = 1
    """Random views per step."""
    lr: float = 1e-2
    """Adam learning rate of the colour field."""
    bsd_weight: float = 0.01
    """Weight of the BSD (VSD with the bootstrapped prior) loss."""
    ref_rgb_weight: float = 1000.0
    """Reference-view RGB loss weight (image jobs only)."""
    bootstrap_period: int = 1000
    """Steps of one bootstrap cycle (at most the stage): its first fifth fine-tunes the
    DreamBooth LoRA (one update a step on a cached restored render, no texture gradient), the
    rest distils BSD into the texture while the VSD LoRA follows the renders."""
    restore_every: int = 25
    """During a bootstrap phase, one more render is restored into the cache every this many
    steps."""
    cache_size: int = 10
    """Restored renders kept for the DreamBooth LoRA (the oldest goes first)."""
    restore_steps: int = 10
    """DDIM steps restoring a noised render."""
    lora_rank: int = 16
    """Rank of both LoRAs."""
    init_fit_steps: int = 50
    """Steps fitting the colour field to an input texture before the stage (refine with a
    texture)."""
    t_min: float = 0.05
    """Smallest timestep (fraction of T) of the BSD gradient."""
    t_max: tuple[float, float] = (0.5, 0.2)
    """Largest timestep of the BSD gradient and the restoring noise level, annealed linearly
    from the first value to the second over the stage."""
    color_levels: int = 16
    """Hash-grid levels of the colour field."""
    color_log2_table_size: int = 19
    """log2 of the rows of each colour hash-grid level's table."""
    color_hidden_dim: int = 64
    """Width of the colour field's MLP."""
    guidance_scale: float = 2.0
    """Classifier-free guidance scale of the BSD gradient (VSD works at low scales)."""
    restore_guidance_scale: float = 7.5
    """Classifier-free guidance scale of the DreamBooth model restoring renders."""


NFSD_NEGATIVE = ("unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, "
                 "low-resolution, gloomy")
"""NFSD's negative prompt (Katzir et al. 2023), used where the job gives none."""


@dataclass(frozen=True)
class DistillConfig:
    """The 2D prior's score-distillation method in the coarse and geometry stages, with each
    method's settings at its paper's defaults (docs/guidance.md)."""

    method: str = "sds"
    """sds (DreamCraft3D's), nfsd, ism, sjc or vsd (`protocol.params.DISTILL_METHODS`)."""
    nfsd_threshold: int = 200
    """NFSD: below this timestep (of 1000) the domain term is ε(∅), from it on ε(∅) − ε(y_neg)."""
    nfsd_negative: str = NFSD_NEGATIVE
    """NFSD: y_neg where the job's negative prompt is empty."""
    nfsd_guidance_scale: float = 7.5
    """NFSD works at an ordinary guidance scale."""
    ism_delta_t: int = 50
    """ISM: the interval δ_T between x_s and x_t (s = t − δ_T)."""
    ism_delta_s: int = 200
    """ISM: the DDIM inversion step δ_S from x₀ to x_s."""
    ism_guidance_scale: float = 7.5
    """ISM's guidance scale (LucidDreamer)."""
    sjc_perturbations: int = 1
    """SJC: noised copies averaged per step (the SJC code's batch of 1)."""
    vsd_lora_rank: int = 4
    """VSD: rank of the LoRA that learns the renders' score."""
    vsd_lr: float = 1e-4
    """VSD: AdamW learning rate of that LoRA (ProlificDreamer's)."""
    vsd_guidance_scale: float = 7.5
    """VSD works at an ordinary guidance scale."""


@dataclass(frozen=True)
class CameraConfig:
    """The view ranges random training cameras are drawn from, and the reference camera."""

    elevation_deg: tuple[float, float] = (-10.0, 45.0)
    """[min, max] elevation in degrees."""
    azimuth_deg: tuple[float, float] = (-180.0, 180.0)
    """[min, max] azimuth in degrees (0 = front, looking along +Y)."""
    distance: tuple[float, float] = (3.8, 3.8)
    """[min, max] distance of the camera from the origin, scene units."""
    fov_deg: tuple[float, float] = (20.0, 20.0)
    """[min, max] vertical field of view in degrees."""
    reference: tuple[float, float, float, float] = (0.0, 0.0, 3.8, 20.0)
    """The reference view: (elevation_deg, azimuth_deg, distance, fov_deg)."""


SCENE_RADIUS = math.sqrt(3.0)
"""Radius of the sphere around the scene cube [-1, 1]³ that the coarse NeuS fills."""


def text_only_fov_deg(camera: CameraConfig) -> tuple[float, float] | None:
    """The training cameras' field-of-view range for a job without a reference image, or None
    where `camera.fov_deg` already keeps the whole scene in the frame. Without a reference mask
    nothing else bounds the object: at Zero123's 20° from 3.8 units the frame shows less than
    the scene cube, and a cube filled edge to edge looks like a plain backdrop to any 2D prior.
    The nearest camera must see the scene's bounding sphere whole: fov ≥ 2·asin(r / d)."""
    nearest = min(camera.distance)
    if nearest <= SCENE_RADIUS:
        return None  # a camera inside the scene's sphere: no field of view frames it
    framing = math.degrees(2.0 * math.asin(SCENE_RADIUS / nearest))
    low, high = camera.fov_deg
    if low >= framing:
        return None
    return (framing, max(high, framing))


@dataclass(frozen=True)
class StreamConfig:
    """How often the pipeline streams meshes and previews and writes checkpoints."""

    mesh_every: int = 250
    """A `mesh` event every this many steps (and one at the end of each stage)."""
    first_mesh_at: int = 50
    """One early `mesh` event after this many steps of each stage, so the artist sees a shape
    within the first minute whatever `mesh_every` is (0 disables it)."""
    preview_every: int = 25
    """A PNG preview with `progress` every this many steps."""
    checkpoint_every: int = 200
    """A checkpoint every this many steps (and one at each stage start)."""
    preview_res: int = 128
    """Side in pixels of the preview PNGs."""


@dataclass(frozen=True)
class PipelineConfig:
    """Everything one job needs to run."""

    quality: str
    """The preset this config started from: draft, standard, high or tiny."""
    coarse: CoarseConfig
    """Stage 1 settings."""
    geometry: GeometryConfig
    """Stage 2 settings."""
    texture: TextureConfig
    """Stage 3 settings."""
    camera: CameraConfig = field(default_factory=CameraConfig)
    """Camera ranges and the reference view."""
    stream: StreamConfig = field(default_factory=StreamConfig)
    """Streaming and checkpoint cadence."""
    texture_size: int = 1024
    """Side in pixels of the baked texture."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """The 2D prior's score-distillation method of the coarse and geometry stages."""
    target_faces: int = 50_000
    """Face budget of a generated surface: it is decimated to this many faces before UV
    unwrapping (backend.decimate); 0 keeps every face."""
    seed: int = 0
    """Seed of every random draw (cameras, noise, timesteps)."""

    def stage_steps(self, stage: str) -> int:
        """The step count of `stage` ("coarse" | "geometry" | "texture")."""
        return getattr(self, stage).steps

    def balance(self, prior_kind: str) -> HybridBalance:
        """The hybrid SDS balance for a 2D prior of `prior_kind` ("pixel", "latent" or "oracle")."""
        if prior_kind not in HYBRID_BALANCE:
            raise ValueError(f"prior kind {prior_kind!r} has no hybrid balance; expected one of "
                             f"{sorted(HYBRID_BALANCE)}")
        return HYBRID_BALANCE[prior_kind]


def check_schedules(config: PipelineConfig) -> None:
    """Refuse a config whose schedules cannot run, naming the setting, before any model or GPU
    work. Schedules inside a stage are fractions of it or capped by it, so a `steps` override
    never makes one impossible."""
    coarse, geometry, texture = config.coarse, config.geometry, config.texture
    for name, value in (("coarse.widen_fraction", coarse.widen_fraction),
                        ("coarse.anneal_fraction", coarse.anneal_fraction)):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{name}: expected a fraction of the stage in (0, 1], got {value}")
    low, high = geometry.normal_consistency_ramp
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError("geometry.normal_consistency_ramp: expected fractions 0 <= start <= end "
                         f"<= 1, got {geometry.normal_consistency_ramp}")
    if geometry.rgb_every < 1:
        raise ValueError(f"geometry.rgb_every: expected an integer >= 1, got {geometry.rgb_every}")
    phase = texture.bootstrap_period // 5
    if phase < 1 or not 1 <= texture.restore_every <= phase or texture.cache_size < 1:
        raise ValueError(
            f"texture.bootstrap_period = {texture.bootstrap_period}, restore_every = "
            f"{texture.restore_every}, cache_size = {texture.cache_size}: the bootstrap phase (a "
            "fifth of the period) needs at least one step and a restore at most every phase")


PRESETS: dict[str, PipelineConfig] = {
    "draft": PipelineConfig(
        quality="draft",
        coarse=CoarseConfig(steps=600, render_res=64, num_samples=64, mesh_res=64),
        geometry=GeometryConfig(steps=300, render_res=256, dmtet_res=64),
        texture=TextureConfig(steps=300, render_res=256, bootstrap_period=150, restore_every=10),
        texture_size=1024,
    ),
    "standard": PipelineConfig(
        quality="standard",
        coarse=CoarseConfig(steps=2000, render_res=128, num_samples=96, mesh_res=96),
        geometry=GeometryConfig(steps=1000, render_res=512, dmtet_res=128),
        texture=TextureConfig(steps=1000, render_res=512, bootstrap_period=250, restore_every=10),
        texture_size=1024,
    ),
    "high": PipelineConfig(
        quality="high",
        coarse=CoarseConfig(steps=5000, render_res=256, num_samples=128, mesh_res=128),
        geometry=GeometryConfig(steps=3000, render_res=512, dmtet_res=192),
        texture=TextureConfig(steps=3000, render_res=512, bootstrap_period=600, restore_every=25),
        texture_size=2048,
        target_faces=150_000,
    ),
    # The test preset: what runs with the tiny models on a CPU in seconds.
    "tiny": PipelineConfig(
        quality="tiny",
        coarse=CoarseConfig(
            steps=12, render_res=16, num_samples=12, mesh_res=16, lr=2e-2, grid_levels=4,
            grid_log2_table_size=12, grid_start_levels=0, hidden_dim=16, occupancy_res=16,
            occupancy_every=4, widen_fraction=0.25, anneal_fraction=0.25,
        ),
        geometry=GeometryConfig(steps=6, render_res=32, dmtet_res=16),
        texture=TextureConfig(
            steps=6, render_res=32, bootstrap_period=5, restore_every=1, cache_size=2, restore_steps=2,
            lora_rank=4, init_fit_steps=4, color_levels=4, color_log2_table_size=12,
            color_hidden_dim=16,
        ),
        stream=StreamConfig(preview_res=32),
        texture_size=256,
        target_faces=1000,
    ),
    # What a CPU finishes in minutes and still makes a recognisable object: the tiny preset with
    # 32² coarse renders, 32³ streamed meshes and grid, 600 coarse steps, 100 geometry steps of
    # four 128² views (`serve --preset small`: the oracle demo on a CPU; the CPU generation bench).
    "small": PipelineConfig(
        quality="small",
        coarse=CoarseConfig(
            steps=600, render_res=32, num_samples=12, mesh_res=32, lr=2e-2, grid_levels=4,
            grid_log2_table_size=12, grid_start_levels=0, hidden_dim=16, occupancy_res=16,
            occupancy_every=4,
        ),
        geometry=GeometryConfig(steps=100, render_res=128, dmtet_res=32, batch=4),
        texture=TextureConfig(
            steps=30, render_res=64, bootstrap_period=10, restore_every=2, cache_size=4, restore_steps=2,
            lora_rank=4, init_fit_steps=10, color_levels=8, color_log2_table_size=14,
            color_hidden_dim=32,
        ),
        stream=StreamConfig(mesh_every=100, first_mesh_at=20, preview_every=10, preview_res=64),
        texture_size=512,
        target_faces=5000,
    ),
}
"""The presets by name; `quality` in the params picks one of draft, standard, high (`tiny` and
`small` are forced on every job by `serve --preset` or `--models tiny`)."""


def _get(params: Any, name: str, default: Any = None) -> Any:
    """A field of a typed params object or of a plain dict."""
    if isinstance(params, Mapping):
        return params.get(name, default)
    return getattr(params, name, default)


def _pair(value: Any) -> tuple[float, float]:
    low, high = value
    return (float(low), float(high))


def camera_from_params(camera: Any) -> CameraConfig:
    """A `CameraConfig` from the `camera` map (or typed object) of validated params."""
    if camera is None:
        return CameraConfig()
    defaults = CameraConfig()
    reference = _get(camera, "reference")
    ref = defaults.reference
    if reference is not None:
        ref = (
            float(_get(reference, "elevation_deg", ref[0])),
            float(_get(reference, "azimuth_deg", ref[1])),
            float(_get(reference, "distance", ref[2])),
            float(_get(reference, "fov_deg", ref[3])),
        )
    return CameraConfig(
        elevation_deg=_pair(_get(camera, "elevation_deg", defaults.elevation_deg)),
        azimuth_deg=_pair(_get(camera, "azimuth_deg", defaults.azimuth_deg)),
        distance=_pair(_get(camera, "distance", defaults.distance)),
        fov_deg=_pair(_get(camera, "fov_deg", defaults.fov_deg)),
        reference=ref,
    )


def config_for_job(params: Any, preset: str | None = None) -> PipelineConfig:
    """The config of one job: the preset (`preset`, else the params' `quality`) with the params'
    step overrides, seed, texture size, face budget, camera ranges and streaming cadence applied.

    `params` is validated `GenerateParams` / `RefineParams` (or a dict with the same fields).
    """
    name = preset or _get(params, "quality", "standard")
    if name not in PRESETS:
        raise ValueError(f"quality: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    base = PRESETS[name]
    overrides = _get(params, "steps", None)
    steps: dict[str, int] = {}
    for stage in STAGES:
        count = _get(overrides, stage, None) if overrides is not None else None
        if count is None:
            continue
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"steps.{stage}: expected an integer >= 0, got {count!r}")
        steps[stage] = count
    target_faces = _get(params, "target_faces", None)
    if target_faces is not None and (isinstance(target_faces, bool) or not isinstance(target_faces, int)
                                     or target_faces < 0):
        raise ValueError(f"target_faces: expected an integer >= 0, got {target_faces!r}")
    stream = dataclasses.replace(
        base.stream,
        mesh_every=int(_get(params, "mesh_every", base.stream.mesh_every)),
        preview_every=int(_get(params, "preview_every", base.stream.preview_every)),
    )
    config = dataclasses.replace(
        base,
        coarse=dataclasses.replace(base.coarse, steps=steps.get("coarse", base.coarse.steps)),
        geometry=dataclasses.replace(
            base.geometry, steps=steps.get("geometry", base.geometry.steps)
        ),
        texture=dataclasses.replace(base.texture, steps=steps.get("texture", base.texture.steps)),
        camera=camera_from_params(_get(params, "camera", None)),
        stream=stream,
        texture_size=int(_get(params, "texture_size", base.texture_size)),
        distill=dataclasses.replace(base.distill, method=_get(params, "distill", base.distill.method)),
        target_faces=base.target_faces if target_faces is None else target_faces,
        seed=int(_get(params, "seed", base.seed)),
    )
    check_schedules(config)
    return config
