"""Benchmarks of the backend: `python -m backend.bench reconstruct|generate --mesh PATH [...] --out DIR`.

`reconstruct` rebuilds a known mesh from its renders with the 3D core (NeuS -> DMTet -> colour
field -> xatlas + baked texture); `generate` runs the whole generation pipeline on oracle models
of the mesh (`--models oracle:MESH[,TEXTURE]`) from its rendered reference image (or its prompt
alone, `--text-only`). Each prints progress, then, as its last line, one JSON object with the
metrics, the seconds per stage and the peak memory (see docs/benchmarks.md).
Bad input (missing/empty/non-triangular mesh, bad flags) prints one line naming the file or flag
and the problem, and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

USAGE_ERROR = 2


class BenchError(Exception):
    """Bad command-line input; the message names the flag or file and the problem."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        raise BenchError(message)


def build_parser() -> argparse.ArgumentParser:
    from backend.bench_reconstruct import PRESETS
    from backend.config import PRESETS as PIPELINE_PRESETS
    from protocol.params import DISTILL_METHODS

    parser = _Parser(prog="python -m backend.bench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    recon = commands.add_parser("reconstruct", help="rebuild a known mesh from its renders and score it")
    recon.add_argument("--mesh", required=True, type=Path, help="ground-truth mesh (.obj, .glb, .gltf)")
    recon.add_argument("--texture", type=Path, help="base-colour image for the mesh's UVs (overrides an MTL's)")
    recon.add_argument("--views", type=int, help="training views (default: the preset's)")
    recon.add_argument("--steps", help="neus=N,dmtet=N,color=N: cut the preset's step counts (to fit a time slot)")
    recon.add_argument("--target-faces", type=int,
                       help="face budget of the result (default: the preset's; 0 keeps every face)")
    recon.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    recon.add_argument("--quality", default="standard", choices=sorted(PRESETS), help="preset (default standard)")
    recon.add_argument("--triangulate", action="store_true", help="fan-triangulate OBJ polygons instead of refusing them")
    recon.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    recon.add_argument("--out", required=True, type=Path, help="output folder")
    gen = commands.add_parser("generate", help="run the pipeline on oracle models of a known mesh and score it")
    gen.add_argument("--mesh", required=True, type=Path, help="ground-truth mesh (.obj, .glb, .gltf)")
    gen.add_argument("--texture", type=Path, help="base-colour image for the mesh's UVs (overrides an MTL's)")
    gen.add_argument("--text-only", action="store_true", help="no reference image: the prompt's prior alone")
    gen.add_argument("--quality", default="draft", choices=sorted(PIPELINE_PRESETS), help="pipeline preset (default draft)")
    gen.add_argument("--steps", default="", help='per-stage step overrides, e.g. "coarse=300,geometry=100,texture=50"')
    gen.add_argument("--set", default="", metavar="STAGE.FIELD=V,...",
                     help='stage-config fields to replace in the preset, e.g. "coarse.render_res=32,coarse.mesh_res=32"')
    gen.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument("--distill", default="sds", choices=DISTILL_METHODS,
                     help="score distillation of the 2D prior (default sds)")
    gen.add_argument("--out", required=True, type=Path, help="output folder")
    return parser


def _device(text: str):
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise BenchError(f"--device {text}: not a device (expected cpu or cuda[:N])") from None
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device {text}: expected cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {text}: CUDA is not available on this machine")
    return device


def reconstruct_options(args: argparse.Namespace):
    """Validate the `reconstruct` flags and load the inputs into `BenchOptions`."""
    import dataclasses

    from backend.bench_reconstruct import PRESETS, BenchOptions
    from backend.meshio import MeshError, load_mesh, load_texture

    preset = PRESETS[args.quality]
    if args.views is not None:
        if args.views < 2:
            raise BenchError(f"--views {args.views}: need at least 2 training views")
        preset = dataclasses.replace(preset, train_views=args.views)
    preset = dataclasses.replace(preset, **step_overrides(args.steps))
    if args.target_faces is not None:
        if args.target_faces < 0:
            raise BenchError(f"--target-faces {args.target_faces}: must be 0 (keep every face) or more")
        preset = dataclasses.replace(preset, target_faces=args.target_faces)
    device = _device(args.device)
    if args.out.exists() and not args.out.is_dir():
        raise BenchError(f"--out {args.out}: exists and is not a folder")
    try:
        mesh = load_mesh(args.mesh, triangulate=args.triangulate)
        texture = load_texture(args.texture) if args.texture is not None else mesh.texture_rgb
    except MeshError as error:
        raise BenchError(str(error)) from None
    if texture is not None and mesh.uvs_fx3x2 is None:
        raise BenchError(f"--texture {args.texture}: {args.mesh.name} has no texture coordinates to map it with")
    started = time.perf_counter()
    return BenchOptions(mesh=mesh, texture_rgb=texture, preset=preset, out_dir=args.out, device=device, seed=args.seed,
                        log=lambda line: print(f"[{time.perf_counter() - started:7.1f} s] {line}", flush=True))


def step_overrides(text: str | None) -> dict[str, int]:
    """`--steps neus=N,dmtet=N,color=N` -> the `QualityPreset` fields they replace."""
    from backend.cli_generate import BadInput, parse_steps

    try:
        steps = parse_steps(text, ("neus", "dmtet", "color"))
    except BadInput as error:
        raise BenchError(str(error)) from None
    for name, count in steps.items():
        if count < 1:
            raise BenchError(f"--steps {name}={count}: expected at least 1 step")
    return {f"{name}_steps": count for name, count in steps.items()}


def _steps(text: str) -> dict[str, int]:
    """"coarse=300,texture=50" -> {"coarse": 300, "texture": 50}."""
    from backend.config import STAGES

    steps: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        stage, _, count = item.partition("=")
        if stage not in STAGES or not count.isdigit():
            raise BenchError(f"--steps {text}: expected STAGE=N items with STAGE one of {', '.join(STAGES)}, got {item!r}")
        steps[stage] = int(count)
    return steps


def _stage_fields(text: str) -> dict[str, dict[str, int | float]]:
    """"coarse.render_res=32,texture.lora_rank=4" -> {"coarse": {"render_res": 32}, "texture": {...}}.

    Only numeric fields of the stage configs can be set; each value keeps its field's type."""
    import dataclasses

    from backend.config import PRESETS, STAGES

    stage_configs = {stage: getattr(PRESETS["tiny"], stage) for stage in STAGES}
    fields: dict[str, dict[str, int | float]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        stage, _, field_name = name.partition(".")
        if stage not in STAGES:
            raise BenchError(f"--set {item}: expected STAGE.FIELD=V with STAGE one of {', '.join(STAGES)}")
        known = {f.name: type(getattr(stage_configs[stage], f.name)) for f in dataclasses.fields(stage_configs[stage])}
        kind = known.get(field_name)
        if field_name == "steps":
            raise BenchError(f"--set {item}: step counts are set with --steps")
        if kind not in (int, float):
            raise BenchError(f"--set {item}: {stage} has no numeric field {field_name!r}")
        try:
            fields.setdefault(stage, {})[field_name] = kind(value)
        except ValueError:
            raise BenchError(f"--set {item}: {field_name} takes {'an integer' if kind is int else 'a number'}, "
                             f"got {value!r}") from None
    return fields


def generate_options(args: argparse.Namespace):
    """Validate the `generate` flags into `GenerateBenchOptions` (the mesh is checked as it loads)."""
    from backend.bench_generate import GenerateBenchOptions

    if args.out.exists() and not args.out.is_dir():
        raise BenchError(f"--out {args.out}: exists and is not a folder")
    return GenerateBenchOptions(mesh=args.mesh, texture=args.texture, quality=args.quality, out_dir=args.out,
                                device=_device(args.device), text_only=args.text_only, steps=_steps(args.steps),
                                stage_overrides=_stage_fields(args.set), seed=args.seed, distill=args.distill,
                                log=lambda line: print(line, flush=True))


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        options = reconstruct_options(args) if args.command == "reconstruct" else generate_options(args)
    except BenchError as error:
        print(f"python -m backend.bench: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    if args.command == "reconstruct":
        from backend.bench_reconstruct import reconstruct

        result = reconstruct(options)
    else:
        from backend.bench_generate import generate
        from backend.guidance.errors import ModelLoadError

        try:
            result = generate(options)
        except ModelLoadError as error:  # the mesh or texture, refused as the oracles load
            print(f"python -m backend.bench: error: {error}", file=sys.stderr)
            return USAGE_ERROR
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
