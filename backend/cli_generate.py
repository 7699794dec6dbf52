"""`python -m backend generate|refine`: run one job of the pipeline on this machine.

The command line and the server share one runner (`backend.pipeline.make_runner`). Here the job
context is `LocalContext`: events go to `OUT/events.jsonl` (one JSON line per event), streamed
meshes to `OUT/steps/<stage>_<step>.glb`, previews to `OUT/previews/`, checkpoints to
`OUT/checkpoint.pt`, the result to `OUT/model.glb`; Ctrl-C cancels within one step. Rerunning the
same command with the same `--out` after a crash resumes from the newest checkpoint.

Flags are checked by building the submit's params and calling `protocol.params.validate_submit`;
a bad value exits with code 2 and one line naming the flag.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

NEGATIVE_NUMBERS = re.compile(r"^-\d+(\.\d*)?(,-?\d+(\.\d*)?)*$|^-\.\d+")
"""Arguments that are (lists of) negative numbers rather than flags."""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 130

FIELD_TO_FLAG: dict[str, str] = {
    "params.prompt": "--prompt",
    "params.negative_prompt": "--negative",
    "params.camera.reference": "--reference",
    "params.camera.elevation_deg": "--elevation",
    "params.camera.azimuth_deg": "--azimuth",
    "params.camera.distance": "--distance",
    "params.camera.fov_deg": "--fov",
    "params.quality": "--quality",
    "params.distill": "--distill",
    "params.steps": "--steps",
    "params.seed": "--seed",
    "params.texture_size": "--texture-size",
    "params.target_faces": "--target-faces",
    "params.mesh_every": "--mesh-every",
    "params.preview_every": "--preview-every",
    "params": "--prompt",
    "buffers.image": "--image",
    "image": "--image",
    "buffers": "--mesh",
    "buffers.texture": "--texture",
}
"""Dotted params field (as `validate_submit` names it) -> the flag that sets it; the longest
matching prefix wins."""


class BadInput(Exception):
    """A command-line value that cannot be used; `flag` names it."""

    def __init__(self, flag: str, message: str) -> None:
        self.flag = flag
        super().__init__(f"{flag}: {message}")


# 1. Parsing ---------------------------------------------------------------------------------------


class _OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (`prog: error: ...`) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_BAD_INPUT)


def _add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help="what to make (1 to 1,000 characters)")
    parser.add_argument("--image", help="reference image, PNG or JPEG (alpha = object mask)")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--quality", default="standard", help="draft, standard or high")
    parser.add_argument("--distill", default="sds",
                        help="score distillation of the 2D prior: sds, nfsd, ism, sjc or vsd (docs/guidance.md)")
    parser.add_argument(
        "--models", default="default",
        help="guidance models: default, tiny, a directory, or oracle:MESH[,TEXTURE] (exact denoisers of a known mesh)"
    )
    parser.add_argument("--seed", default="0", help="random seed, 0 to 2^31-1")
    parser.add_argument("--elevation", help="MIN,MAX elevation range in degrees (-10,45)")
    parser.add_argument("--azimuth", help="MIN,MAX azimuth range in degrees (-180,180)")
    parser.add_argument("--distance", help="MIN,MAX camera distance (3.8,3.8)")
    parser.add_argument("--fov", help="MIN,MAX vertical field of view in degrees (20,20)")
    parser.add_argument(
        "--reference", help="ELEVATION,AZIMUTH[,DISTANCE,FOV] of the reference image's view"
    )
    parser.add_argument("--texture-size", default="1024", help="256, 512, 1024, 2048 or 4096")
    parser.add_argument("--mesh-every", default="250", help="stream a mesh every N steps (>= 10)")
    parser.add_argument("--preview-every", default="25", help="a preview every N steps (>= 1)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register `generate` and `refine` on the `python -m backend` parser's subparsers."""
    generate = subparsers.add_parser(
        "generate",
        help="prompt (+ image) -> textured mesh in OUT/model.glb",
        description="Run the whole pipeline (coarse, geometry, texture) and write OUT/model.glb.",
    )
    _add_common_flags(generate)
    generate.add_argument(
        "--steps", help="per-stage step overrides: coarse=N,geometry=N,texture=N"
    )
    generate.add_argument(
        "--target-faces",
        help="face budget of the result (default: 50000, 150000 at high quality; 0 keeps all)",
    )
    generate.set_defaults(handler=run_command, command="generate")
    refine = subparsers.add_parser(
        "refine",
        help="re-texture an existing mesh, keeping its geometry",
        description="Run the texture stage on --mesh and write OUT/model.glb.",
    )
    _add_common_flags(refine)
    refine.add_argument("--mesh", required=True, help="the mesh to re-texture (.obj or .glb)")
    refine.add_argument(
        "--texture", help="the mesh's current texture (PNG) to start from, when its file names none"
    )
    refine.add_argument("--steps", help="texture step override: texture=N")
    refine.set_defaults(handler=run_command, command="refine")
    for parser in (generate, refine):
        parser.error = _OneLineParser.error.__get__(parser)  # one-line errors, exit code 2
        # Values such as "-90,90" are numbers, not flags (argparse only knows "-90").
        parser._negative_number_matcher = NEGATIVE_NUMBERS


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with the two subcommands (used by `main`)."""
    parser = _OneLineParser(prog="python -m backend")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_subcommands(subparsers)
    return parser


def _int(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise BadInput(flag, f"expected an integer, got {text!r}") from None


def _floats(flag: str, text: str, counts: tuple[int, ...]) -> list[float]:
    parts = [part.strip() for part in text.split(",")]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise BadInput(flag, f"expected comma-separated numbers, got {text!r}") from None
    if len(values) not in counts:
        wanted = " or ".join(str(count) for count in counts)
        raise BadInput(flag, f"expected {wanted} comma-separated numbers, got {text!r}")
    return values


def parse_steps(text: str | None, allowed: Sequence[str]) -> dict[str, int]:
    """`coarse=N,geometry=N,texture=N` -> {"coarse": N, ...}; a bad entry names --steps."""
    if not text:
        return {}
    steps: dict[str, int] = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or name not in allowed:
            raise BadInput(
                "--steps", f"expected {','.join(f'{s}=N' for s in allowed)}, got {item!r}"
            )
        steps[name] = _int("--steps", value)
    return steps


def params_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The submit `params` map the flags describe (not yet validated)."""
    allowed = ("coarse", "geometry", "texture") if args.command == "generate" else ("texture",)
    camera: dict[str, Any] = {}
    for flag, key in (
        ("--elevation", "elevation_deg"),
        ("--azimuth", "azimuth_deg"),
        ("--distance", "distance"),
        ("--fov", "fov_deg"),
    ):
        text = getattr(args, flag[2:])
        if text is not None:
            camera[key] = _floats(flag, text, (2,))
    if args.reference is not None:
        values = _floats("--reference", args.reference, (2, 4))
        reference = {"elevation_deg": values[0], "azimuth_deg": values[1]}
        if len(values) == 4:
            reference.update(distance=values[2], fov_deg=values[3])
        camera["reference"] = reference
    params: dict[str, Any] = {
        "prompt": args.prompt,
        "negative_prompt": args.negative,
        "quality": args.quality,
        "distill": args.distill,
        "steps": parse_steps(args.steps, allowed),
        "seed": _int("--seed", args.seed),
        "texture_size": _int("--texture-size", args.texture_size),
        "mesh_every": _int("--mesh-every", args.mesh_every),
        "preview_every": _int("--preview-every", args.preview_every),
    }
    if camera:
        params["camera"] = camera
    if getattr(args, "target_faces", None) is not None:
        params["target_faces"] = _int("--target-faces", args.target_faces)
    return params


def _read_file(flag: str, path: str) -> bytes:
    file = Path(path)
    if not file.is_file():
        raise BadInput(flag, f"no such file: {path}")
    return file.read_bytes()


def inputs_from_args(args: argparse.Namespace) -> dict[str, np.ndarray | bytes]:
    """The submit's buffers: `image` (file bytes) and, for refine, the mesh's arrays."""
    from backend.meshio import MeshError, load_mesh  # torch-free, but keep --help light

    inputs: dict[str, np.ndarray | bytes] = {}
    if args.image is not None:
        inputs["image"] = _read_file("--image", args.image)
    if args.command == "refine":
        try:
            mesh = load_mesh(args.mesh, triangulate=True)
        except MeshError as exc:
            raise BadInput("--mesh", str(exc)) from None
        inputs.update(mesh_buffers(mesh))
        if args.texture is not None:
            if "uvs" not in inputs:
                raise BadInput("--texture", f"{args.mesh} has no UVs to map a texture with")
            inputs["texture"] = _read_file("--texture", args.texture)
    return inputs


def mesh_buffers(mesh: Any) -> dict[str, np.ndarray | bytes]:
    """A loaded mesh as refine buffers: positions, faces, and per-vertex uvs + texture PNG when
    the mesh has them (vertices split where a vertex has several UVs)."""
    from backend.export import encode_png

    if mesh.uvs_fx3x2 is None:
        return {
            "positions": np.ascontiguousarray(mesh.verts_vx3, dtype="<f4"),
            "faces": np.ascontiguousarray(mesh.faces_fx3, dtype="<i4"),
        }
    # One UV per vertex: a corner key (vertex, u, v) -> a new vertex.
    corners_cx2 = mesh.uvs_fx3x2.reshape(-1, 2)
    corner_verts_c = mesh.faces_fx3.reshape(-1)
    keys_cx3 = np.concatenate([corner_verts_c[:, None].astype(np.float64), corners_cx2], axis=1)
    unique_kx3, inverse_c = np.unique(keys_cx3, axis=0, return_inverse=True)
    buffers: dict[str, np.ndarray | bytes] = {
        "positions": np.ascontiguousarray(
            mesh.verts_vx3[unique_kx3[:, 0].astype(np.int64)], dtype="<f4"
        ),
        "faces": np.ascontiguousarray(inverse_c.reshape(-1, 3), dtype="<i4"),
        "uvs": np.ascontiguousarray(unique_kx3[:, 1:], dtype="<f4"),
    }
    if mesh.texture_rgb is not None:
        buffers["texture"] = encode_png(mesh.texture_rgb)
    return buffers


def flag_for_field(field_path: str | None) -> str:
    """The flag that sets a dotted params field (longest matching prefix), e.g.
    `params.camera.elevation_deg` -> `--elevation`."""
    if not field_path:
        return "--prompt"
    best = ""
    for prefix in FIELD_TO_FLAG:
        matches = field_path == prefix or field_path.startswith(prefix + ".")
        if matches and len(prefix) > len(best):
            best = prefix
    return FIELD_TO_FLAG.get(best, field_path)


def validate(kind: str, params: dict[str, Any], inputs: dict[str, Any]) -> Any:
    """`protocol.params.validate_submit`, with its error turned into `BadInput(flag, ...)`."""
    from protocol.codec import ProtocolError
    from protocol.params import validate_submit

    try:
        return validate_submit(kind, params, inputs)
    except ProtocolError as exc:
        flag = flag_for_field(getattr(exc, "field", None))
        raise BadInput(flag, str(getattr(exc, "message", exc))) from None


# 2. The local job context -------------------------------------------------------------------------


def job_key(kind: str, params: dict[str, Any], inputs: dict[str, Any]) -> str:
    """A digest of a job's kind, params and inputs: a rerun resumes only the same job."""
    digest = hashlib.sha256(kind.encode())
    digest.update(json.dumps(params, sort_keys=True).encode())
    for name in sorted(inputs):
        value = inputs[name]
        digest.update(name.encode())
        digest.update(value.tobytes() if isinstance(value, np.ndarray) else bytes(value))
    return digest.hexdigest()[:32]


@dataclass
class LocalContext:
    """A `backend.jobs.JobContext`-compatible context that writes a job to a directory."""

    out_dir: Path
    """Where events.jsonl, steps/, previews/, checkpoint.pt and model.glb go."""
    kind: str
    """"generate" | "refine_texture"."""
    params: Any
    """Validated params (protocol.params)."""
    inputs: dict[str, np.ndarray | bytes]
    """The submit's buffers."""
    job_id: str = "local"
    """The job id written into events."""
    show_progress: bool = True
    """Draw a progress bar on stderr."""
    resumed: bool = False
    """True when this run continues from a checkpoint."""
    result_glb: bytes | None = None
    """The final GLB, once the runner hands it over."""
    _seq: int = 0
    _cancel_requested: bool = False
    _bar: Any = None
    _bar_stage: str = ""
    _started: float = field(default_factory=time.monotonic)

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    @property
    def events_path(self) -> Path:
        return self.out_dir / "events.jsonl"

    def open(self, key: str) -> None:
        """Prepare the directory: resume if it holds a checkpoint of the same job, else start
        afresh (clearing the previous run's events, steps and previews)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        key_path = self.out_dir / "job.json"
        previous = json.loads(key_path.read_text())["key"] if key_path.is_file() else None
        self.resumed = self.checkpoint_path.is_file() and previous == key
        if not self.resumed:
            for name in ("events.jsonl", "checkpoint.pt", "model.glb"):
                (self.out_dir / name).unlink(missing_ok=True)
            for name in ("steps", "previews"):
                shutil.rmtree(self.out_dir / name, ignore_errors=True)
        (self.out_dir / "steps").mkdir(exist_ok=True)
        (self.out_dir / "previews").mkdir(exist_ok=True)
        key_path.write_text(json.dumps({"key": key, "kind": self.kind}))
        self._seq = self._last_seq()

    def _last_seq(self) -> int:
        """The newest seq in events.jsonl; a last line cut short by a kill is dropped."""
        if not self.events_path.is_file():
            return 0
        kept: list[str] = []
        for line in self.events_path.read_text().splitlines():
            try:
                json.loads(line)["seq"]
            except (ValueError, KeyError):
                break
            kept.append(line)
        self.events_path.write_text("".join(line + "\n" for line in kept))
        return json.loads(kept[-1])["seq"] if kept else 0

    # The JobContext interface -------------------------------------------------------------------

    def emit(self, event: str, body: dict, buffers: dict | None = None) -> int:
        """Append one event to events.jsonl (mesh events also written as GLB under steps/)."""
        self._seq += 1
        record: dict[str, Any] = {"seq": self._seq, "time": time.time(), "event": event, **body}
        buffers = buffers or {}
        if buffers:
            record["buffers"] = {name: _describe(value) for name, value in buffers.items()}
        if event == "mesh":
            record["file"] = self._write_mesh(body, buffers)
        with self.events_path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        if event == "stage":
            self._new_bar(body["stage"], int(body["steps"]))
        elif event == "note":
            print(f"note: {body['text']}", file=sys.stderr, flush=True)
        return self._seq

    def progress(
        self,
        stage: str,
        step: int,
        steps: int,
        eta_s: float | None = None,
        losses: dict[str, float] | None = None,
        preview_png: bytes | None = None,
    ) -> None:
        """Move the progress bar; write the preview (if any) to previews/."""
        if preview_png is not None:
            (self.out_dir / "previews" / f"{stage}_{step:06d}.png").write_bytes(preview_png)
        if self._bar is not None and self._bar_stage == stage:
            self._bar.n = step
            if losses:
                self._bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items()}, refresh=False)
            self._bar.refresh()

    def check_cancelled(self) -> None:
        """Raise JobCancelled once Ctrl-C was pressed."""
        if self._cancel_requested:
            from backend.jobs import JobCancelled

            raise JobCancelled("cancelled from the keyboard")

    def save_checkpoint(self, state: bytes) -> None:
        """Write checkpoint.pt atomically (a kill mid-write keeps the previous one)."""
        partial = self.checkpoint_path.with_suffix(".pt.partial")
        with partial.open("wb") as stream:
            stream.write(state)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(partial, self.checkpoint_path)

    def load_checkpoint(self) -> bytes | None:
        """The newest checkpoint, when this run resumes."""
        if self.resumed and self.checkpoint_path.is_file():
            return self.checkpoint_path.read_bytes()
        return None

    def set_result(self, glb: bytes) -> None:
        """The final textured mesh: written to model.glb."""
        self.result_glb = glb
        (self.out_dir / "model.glb").write_bytes(glb)

    # Helpers -----------------------------------------------------------------------------------

    def request_cancel(self) -> None:
        """Ask the running job to stop at its next step (the SIGINT handler calls this)."""
        self._cancel_requested = True

    def _write_mesh(self, body: dict, buffers: dict) -> str:
        from backend.export import write_glb

        name = f"{body['stage']}_{int(body['step']):06d}{'_final' if body.get('final') else ''}"
        path = self.out_dir / "steps" / f"{name}.glb"
        texture = buffers.get("texture")
        texture_rgb = None
        if texture is not None:
            from PIL import Image
            import io

            texture_rgb = np.asarray(Image.open(io.BytesIO(bytes(texture))).convert("RGB"))
        write_glb(
            path,
            buffers["positions"],
            buffers["faces"],
            uvs=buffers.get("uvs"),
            texture_rgb=texture_rgb,
            vertex_colors=buffers.get("colors"),
        )
        return str(path.relative_to(self.out_dir))

    def _new_bar(self, stage: str, steps: int) -> None:
        self.close_bar()
        if self.show_progress:
            from tqdm import tqdm

            self._bar = tqdm(total=steps, desc=stage, unit="step", file=sys.stderr, leave=True)
            self._bar_stage = stage

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def state(self, state: str, **extra: Any) -> int:
        """A `state` event, as the server would emit it."""
        return self.emit("state", {"state": state, **extra})


def _describe(value: Any) -> dict[str, Any]:
    if isinstance(value, np.ndarray):
        return {"dtype": value.dtype.str.lstrip("<|"), "shape": list(value.shape)}
    return {"dtype": "bytes", "shape": [len(value)]}


# 3. Running a command ----------------------------------------------------------------------------


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def default_device() -> str:
    return "cuda" if cuda_available() else "cpu"


@dataclass
class CheckedJob:
    """A command line's job, validated like a `submit`."""

    kind: str
    """"generate" | "refine_texture"."""
    params_map: dict[str, Any]
    """The params as sent (for the job key)."""
    params: Any
    """Validated params (protocol.params)."""
    inputs: dict[str, np.ndarray | bytes]
    """The buffers."""
    device: str
    """The torch device to run on."""


def check_job(args: argparse.Namespace) -> CheckedJob:
    """Every flag checked the way `submit` is checked; raises BadInput naming the flag."""
    kind = "generate" if args.command == "generate" else "refine_texture"
    params_map = params_from_args(args)
    inputs = inputs_from_args(args)
    params = validate(kind, params_map, inputs)
    device = args.device or default_device()
    if device.startswith("cuda") and not cuda_available():
        raise BadInput("--device", f"{device} asked for, but this machine has no CUDA GPU")
    if kind == "generate" and params.steps.coarse == 0:
        raise BadInput("--steps", "coarse=0 leaves nothing to shape the object; "
                       "only refine skips the coarse stage")
    return CheckedJob(kind, params_map, params, inputs, device)


def run_command(args: argparse.Namespace) -> int:
    """Validate the flags, then run the job in `args.out`; returns the exit code."""
    prog = f"python -m backend {args.command}"
    try:
        job = check_job(args)
    except BadInput as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return EXIT_BAD_INPUT
    from backend.guidance.errors import ModelLoadError
    from backend.pipeline import make_runner

    try:
        runner = make_runner(args.models, job.device)
    except ModelLoadError as exc:
        sys.stderr.write(f"{prog}: error: --models: {exc}\n")
        return EXIT_BAD_INPUT
    sys.stderr.write("models: " + ", ".join(f"{role} {name}" for role, name in runner.models.items()) + "\n")
    context = LocalContext(out_dir=Path(args.out), kind=job.kind, params=job.params,
                           inputs=job.inputs, show_progress=not args.no_progress)
    context.open(job_key(job.kind, job.params_map, job.inputs))
    context.state("running", resumed=context.resumed)
    previous_handler = signal.signal(signal.SIGINT, lambda *_: context.request_cancel())
    try:
        code = run_in_context(runner, context, prog)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        context.close_bar()
    if code == EXIT_OK:
        sys.stderr.write(f"wrote {context.out_dir / 'model.glb'}\n")
    return code


def run_in_context(runner: Any, context: LocalContext, prog: str) -> int:
    """Run the job; record how it ended as a `state` event; the exit code."""
    from backend.guidance.errors import GuidanceInputError
    from backend.jobs import JobCancelled

    try:
        runner.run(context)
    except GuidanceInputError as exc:  # the image or prompt, refused by the guidance
        context.state("failed", error=str(exc))
        field = f"buffers.{exc.field}" if exc.field == "image" else f"params.{exc.field}"
        sys.stderr.write(f"{prog}: error: {flag_for_field(field)}: {exc.message}\n")
        return EXIT_BAD_INPUT
    except JobCancelled:
        context.state("cancelled")
        sys.stderr.write(f"cancelled; rerun the same command to resume from {context.out_dir}\n")
        return EXIT_CANCELLED
    except Exception as exc:  # the job failed: say why, keep what was streamed
        context.state("failed", error=str(exc))
        sys.stderr.write(f"{prog}: failed: {exc}\n")
        return EXIT_FAILED
    if context.result_glb is None:
        context.state("failed", error="the pipeline ended without a final mesh")
        return EXIT_FAILED
    context.state("done")
    context.checkpoint_path.unlink(missing_ok=True)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m backend.cli_generate generate|refine ...`."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
