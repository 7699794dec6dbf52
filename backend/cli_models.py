"""`python -m backend models fetch|check`: get the guidance weights onto a machine, and check them.

    python -m backend models fetch [--models default] [--dtype fp16|fp32] [--to DIR]
    python -m backend models check [--models default|DIR] [--dtype fp16|fp32] [--device cpu|cuda]

`fetch` downloads, for every role of `--models default` (the `ModelSources` defaults with the
DREAMLOOM_MODEL_* overrides; `id@revision` pins a revision), exactly the files the loader reads
(`backend.guidance.hub.select_files`), one progress bar per file: into the Hugging Face cache, or
with `--to DIR` into DIR/<role>, a folder for `--models DIR`. `--dtype fp16` (the default, for a
CUDA machine) takes the fp16 weight files where a repository has them. The texture role (the
latent prior BSD needs beside a DeepFloyd IF prior2d) is skipped when its source is the 2D
prior's; with another latent prior2d it is not needed either (`DREAMLOOM_MODEL_TEXTURE=none`).

`check` looks every role up without network and loads it, and prints one line per role: where
it came from, its size on disk, and what is missing or wrong; all roles, not the first failure
only. Exit status 0 when every role loads, 1 otherwise, 2 for bad flags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

EXIT_FAILED = 1


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register `models` with its `fetch` and `check` subcommands."""
    models = subparsers.add_parser("models", help="download (fetch) or verify (check) the guidance weights",
                                   description="Get the guidance models' weights, or check them offline.")
    verbs = models.add_subparsers(dest="verb", required=True, metavar="VERB")
    fetch = verbs.add_parser("fetch", help="download exactly the files the loader reads",
                             description="Download the guidance models' files into the Hugging Face cache or --to DIR.")
    fetch.add_argument("--models", default="default", help="default (the hub ids, DREAMLOOM_MODEL_* overrides)")
    fetch.add_argument("--to", type=Path, default=None, help="write DIR/<role> folders for --models DIR instead")
    fetch.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16",
                       help="weights for a CUDA machine (fp16, default) or a CPU (fp32)")
    fetch.set_defaults(handler=run_fetch)
    check = verbs.add_parser("check", help="load every role without network and report",
                             description="Look every role up without network, load it, and report each.")
    check.add_argument("--models", default="default", help="default, tiny or a folder of role subfolders")
    check.add_argument("--dtype", choices=("fp16", "fp32"), default=None,
                       help="weights to load (default: fp16 with --device cuda, else fp32)")
    check.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to load (default cpu)")
    check.set_defaults(handler=run_check)


def _human(size: int) -> str:
    """Bytes as GB (or MB below one GB), as the hub shows sizes."""
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def _each_role(sources, step: Callable[[str, str], tuple[str, Path]]) -> int:
    """Run `step(role, source) -> (line, folder)` for every role that is on and print
    `role: <its line>`; a ModelLoadError is printed as `role: FAILED: <sentence>` and the other
    roles go on. The texture role follows `load_models`: a latent 2D prior is it (its files,
    loaded once as both), beside a pixel one it must be on."""
    from backend.guidance.errors import ModelLoadError
    from backend.guidance.models import ROLES, prior_kind, texture_role_missing

    failed = False
    prior2d_folder: Path | None = None  # ROLES puts prior2d first
    for role in ROLES:
        source = getattr(sources, role)
        try:
            if role == "texture" and prior2d_folder is not None and prior_kind(prior2d_folder) == "latent":
                line = "the prior2d model"
            elif source is None:
                if role == "texture" and prior2d_folder is not None:
                    raise texture_role_missing(sources.prior2d)
                line = "off"
            else:
                line, folder = step(role, source)
                if role == "prior2d":
                    prior2d_folder = folder
        except ModelLoadError as error:
            line, failed = f"FAILED: {error}", True
        print(f"{role}: {line}", flush=True)
    return EXIT_FAILED if failed else 0


def run_fetch(args: argparse.Namespace) -> int:
    """`models fetch`: every hub role, one after the other."""
    from backend.guidance.hub import download, remote_files, split_revision
    from backend.guidance.models import PARTS, check_reachable, hub_errors, locate_sources, looks_like_path

    if args.models != "default":
        sys.stderr.write(f"python -m backend models fetch: error: --models: expected 'default' (set "
                         f"DREAMLOOM_MODEL_<ROLE> to fetch other ids), got {args.models!r}\n")
        return 2

    def fetch(role: str, source: str) -> str:
        if looks_like_path(source) or Path(source).expanduser().is_dir():
            return f"{source} is a folder, nothing to fetch", Path(source).expanduser()
        repo_id, revision = split_revision(source)
        check_reachable(role, source, f"{role} model {source!r} cannot be fetched")
        with hub_errors(role, source):
            remote = remote_files(repo_id, revision, PARTS[role], args.dtype == "fp16")
            print(f"{role}: {repo_id} at {remote.commit[:12]}: {len(remote.sizes)} files, "
                  f"{_human(sum(remote.sizes.values()))}", flush=True)
            folder = download(repo_id, revision, list(remote.sizes), args.to / role if args.to else None)
        return f"done, {folder}", Path(folder)

    return _each_role(locate_sources("default", None), fetch)


def run_check(args: argparse.Namespace) -> int:
    """`models check`: every role looked up offline and loaded; one line each."""
    import torch

    from backend.guidance.errors import ModelLoadError
    from backend.guidance.hub import folder_listing, select_files, size_on_disk
    from backend.guidance.models import PARTS, load_role, locate_sources, resolve_source

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("python -m backend models check: error: --device cuda: this machine has no CUDA GPU\n")
        return 2
    device = torch.device(args.device)
    half = (args.dtype or ("fp16" if device.type == "cuda" else "fp32")) == "fp16"
    dtype = torch.float16 if half else torch.float32
    try:
        sources = locate_sources(args.models, None)
    except ModelLoadError as error:
        print(f"{error.role}: FAILED: {error}")
        return EXIT_FAILED

    def check(role: str, source: str) -> str:
        folder = resolve_source(role, source, half, offline=True)
        size = size_on_disk(folder, select_files(folder_listing(folder), PARTS[role], half))
        load_role(role, sources, folder, device, dtype)
        return f"ok: {source} from {folder}, {_human(size)} on disk", folder

    return _each_role(sources, check)
