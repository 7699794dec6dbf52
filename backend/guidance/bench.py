"""Time one hybrid SDS step and one BSD step with full-size random-weight UNets.

    python -m backend.guidance.bench --device cuda            full-size, float16 (the GPU numbers)
    python -m backend.guidance.bench --device cpu --tiny      the tiny models (proves the script runs)
    python -m backend.guidance.bench --device cpu --dtype bfloat16 --warmup 0 --repeats 1
                                                              full size on the CPU (checks the shapes)

Full size means the real architectures' configs with random weights (no download): the SD 2.1
base UNet (4→4 channels, widths 320/640/1280/1280, heads of 5/10/20/20 channels... as in its
config, cross-attention 1024, 64² latents) with the SD VAE for the 2D prior, and the Zero123-XL
UNet (the SD 1.x config with 8 input channels, cross-attention 768, 32² latents) with the same
VAE. Text and reference embeddings are random tensors of the real shapes (they are computed once
per job, not per step). A step is forward + backward down to the rendered image:

    hybrid   HybridGuidance.loss (λ_sd·2D SDS at 512² + λ_3d·Zero123 3D-SDS at 256²), then backward
    bsd      BSD.step outside a bootstrap phase (texture gradient + VSD LoRA update), backward
    round    one bootstrap step with a restore (restore_steps DDIM steps + one DreamBooth update)

Prints one JSON object: median milliseconds over --repeats after --warmup, and peak memory (MiB,
torch.cuda.max_memory_allocated per measured phase; null on the CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

SD21_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
)
"""stabilityai/stable-diffusion-2-1-base unet/config.json (the fields that differ from defaults)."""

ZERO123_XL_UNET = dict(
    sample_size=32,
    in_channels=8,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
"""Zero123-XL: the SD 1.x UNet config with 8 input channels, 256² images."""

SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)
"""The Stable Diffusion VAE (kl-f8)."""


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)


def full_size_models(device: torch.device, dtype: torch.dtype, seed: int = 0):
    """GuidanceModels with random full-size weights, plus random prompt and reference embeddings."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from backend.guidance.models import CCProjection, GuidanceModels, Prior2D, Zero123Model, Zero123Reference
    from backend.guidance.sds import VIEWS, PromptEmbeddings

    torch.manual_seed(seed)

    def frozen(module):  # plain nn.Module.to: diffusers' override warns on every dtype cast
        return torch.nn.Module.to(module, device=device, dtype=dtype).requires_grad_(False).eval()

    scheduler = _scheduler()
    alphas = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    with torch.device(device):  # initialise the random weights where they will live
        unet_2d, vae_2d = UNet2DConditionModel(**SD21_UNET), AutoencoderKL(**SD_VAE)
        unet_3d, vae_3d = UNet2DConditionModel(**ZERO123_XL_UNET), AutoencoderKL(**SD_VAE)
        projection = CCProjection(772, 768)
    prior = Prior2D(
        name="random SD 2.1 base", kind="latent", unet=frozen(unet_2d),
        vae=frozen(vae_2d), text_encoder=None, tokenizer=None, scheduler=scheduler,
        alphas_cumprod_t=alphas, resolution=512, latent_scale=0.18215, device=device, dtype=dtype,
    )
    zero123 = Zero123Model(
        name="random Zero123-XL", variant="zero123", unet=frozen(unet_3d),
        vae=frozen(vae_3d), image_encoder=None, cc_projection=frozen(projection),
        alphas_cumprod_t=alphas, resolution=256, latent_scale=0.18215, clip_size=224,
        clip_mean=(0.48145466, 0.4578275, 0.40821073), clip_std=(0.26862954, 0.26130258, 0.27577711),
        device=device, dtype=dtype,
    )
    models = GuidanceModels(prior2d=prior, zero123=zero123, depth=None, matting=None, texture=prior,
                            device=device, dtype=dtype)
    embeddings = PromptEmbeddings(
        prompt="random", negative="",
        cond_vxlxd=torch.randn(len(VIEWS), 77, 1024, device=device, dtype=dtype),
        uncond_1xlxd=torch.randn(1, 77, 1024, device=device, dtype=dtype),
    )
    reference = Zero123Reference(
        image_embeds_1x1xd=torch.randn(1, 1, 768, device=device, dtype=dtype),
        latents_1xcxhxw=torch.randn(1, 4, 32, 32, device=device, dtype=dtype),
    )
    return models, embeddings, reference


def tiny_setup(device: torch.device):
    """The tiny models through the loader, with real prompt and reference encodings."""
    from backend.guidance.models import load_models
    from backend.guidance.sds import encode_prompt

    models = load_models("tiny", device, roles=("prior2d", "zero123"))
    embeddings = encode_prompt(models.prior2d, "a cow")
    reference = models.zero123.encode_reference(torch.rand(64, 64, 3, device=device))
    return models, embeddings, reference


def _timed(fn, device: torch.device, warmup: int, repeats: int) -> tuple[float, float | None]:
    """Median milliseconds of fn() and the peak memory (MiB) while it ran."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000.0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return statistics.median(times), peak


def _log_phase(name: str, ms: float, peak_mib: float | None) -> None:
    """A phase's numbers as soon as it is timed (a run stopped early still shows them)."""
    peak = f", peak {peak_mib:.0f} MiB" if peak_mib is not None else ""
    print(f"{name}: {ms:.1f} ms{peak}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict:
    from backend.cameras import Cameras
    from backend.guidance.bsd import BSD, BSDConfig
    from backend.guidance.schedule import HybridConfig, HybridGuidance

    device = torch.device(args.device)
    if args.tiny:
        models, embeddings, reference = tiny_setup(device)
    else:
        dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
        models, embeddings, reference = full_size_models(device, dtype)
    generator = torch.Generator(device).manual_seed(0)
    batch, res = args.batch, args.render_res
    cameras = Cameras.from_orbit(torch.full((batch,), 15.0), torch.linspace(-120.0, 120.0, batch),
                                 torch.full((batch,), 3.8), torch.full((batch,), 20.0), res, res).to(device)
    render = torch.rand(batch, res, res, 3, device=device)

    # 1. Hybrid SDS: λ_sd·2D SDS + λ_3d·Zero123 3D-SDS, backward to the render.
    hybrid = HybridGuidance(models, embeddings, reference, (0.0, 0.0, 3.8), HybridConfig(anneal_steps=1000))

    def hybrid_step():
        rgb = render.clone().requires_grad_(True)
        loss, _ = hybrid.loss(rgb, cameras, step=0, generator=generator)
        loss.backward()

    hybrid_ms, hybrid_peak = _timed(hybrid_step, device, args.warmup, args.repeats)
    _log_phase("hybrid step", hybrid_ms, hybrid_peak)

    # 2. BSD: a texture step (texture gradient + VSD LoRA update) and a bootstrap step with a
    #    restore (a period of 1 has no bootstrap phase, so BSD.step always distils).
    config = BSDConfig(lora_rank=args.lora_rank, bootstrap_period=1, restore_every=1,
                       restore_steps=args.restore_steps)
    bsd = BSD(models.prior2d, embeddings, config, generator)
    step_counter = iter(range(1, 10**9))

    def bsd_step():
        rgb = render.clone().requires_grad_(True)
        loss, _ = bsd.step(rgb, cameras, step=next(step_counter), total=1000)
        loss.backward()

    def bsd_round():
        with torch.no_grad():
            x0 = models.prior2d.encode(render)
        bsd.bootstrap_step(x0, cameras, step=0, total=1000)

    try:
        bsd_ms, bsd_peak = _timed(bsd_step, device, args.warmup, args.repeats)
        _log_phase("BSD step", bsd_ms, bsd_peak)
        round_ms, round_peak = _timed(bsd_round, device, min(args.warmup, 1), max(1, args.repeats // 3))
        _log_phase("BSD round", round_ms, round_peak)
    finally:
        bsd.close()
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "models": "tiny" if args.tiny else "full-size random (SD 2.1 base + Zero123-XL configs)",
        "dtype": str(models.dtype).replace("torch.", ""),
        "batch": batch,
        "render_res": res,
        "hybrid_step_ms": round(hybrid_ms, 2),
        "hybrid_peak_mib": round(hybrid_peak, 1) if hybrid_peak is not None else None,
        "bsd_step_ms": round(bsd_ms, 2),
        "bsd_step_peak_mib": round(bsd_peak, 1) if bsd_peak is not None else None,
        "bsd_round_ms": round(round_ms, 2),
        "bsd_round_peak_mib": round(round_peak, 1) if round_peak is not None else None,
        "bsd_round": {"restore_steps": args.restore_steps, "dreambooth_updates": 1},
        "lora_rank": args.lora_rank,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m backend.guidance.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--tiny", action="store_true", help="use the tiny models instead of full-size ones")
    parser.add_argument("--batch", type=int, default=1, help="renders per step (default 1)")
    parser.add_argument("--render-res", type=int, default=128, help="render side in pixels (default 128)")
    parser.add_argument("--lora-rank", type=int, default=16, help="BSD LoRA rank (default 16)")
    parser.add_argument("--restore-steps", type=int, default=10, help="DDIM steps of a restoration (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (default 5)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                        help="full-size weights' dtype (default float16 on CUDA, float32 on the CPU)")
    parser.add_argument("--json", help="also write the JSON object here")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu --tiny")
    if args.tiny and args.dtype:
        parser.error("--dtype applies to the full-size models only; the tiny ones load in the loader's dtype")
    if not args.tiny and not args.device.startswith("cuda"):
        print("python -m backend.guidance.bench: full-size models on the CPU take minutes per step and "
              "about 8 GB in bfloat16; the times say nothing about a GPU", file=sys.stderr)
    results = run(args)
    print(json.dumps(results, indent=2))
    if args.json is not None:
        with open(args.json, "w") as file:
            json.dump(results, file)


if __name__ == "__main__":
    main()
