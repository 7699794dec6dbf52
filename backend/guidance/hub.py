"""Which files a role needs, and getting them: from a folder, the Hugging Face cache or the hub.

    split_revision("owner/name@rev") -> ("owner/name", "rev")      (revision None when not given)
    select_files(listing, parts, half) -> [paths]     the files the loader reads, out of a listing
    pick_weights(names, half) -> WeightFiles | None   which weight files of one folder are read
    cached_snapshot(repo_id, revision, parts, half) -> CacheLookup       no network
    remote_files(repo_id, revision, parts, half) -> RemoteFiles          the needed files' sizes
    download(repo_id, revision, files, local_dir=None) -> Path           one progress bar per file

A role is a list of parts: subfolders of a diffusers pipeline ("unet", "vae", ...) or "" for a
transformers model at the top of the repository. Out of a repository's file list the loader needs
the top-level `*.json` (model_index.json, or the model's config and preprocessor config), each
part's `*.json`, `*.txt` and `*.model` (configs and tokenizer files), and one set of weights per
part. The download and the cache lookup both use exactly this list, so a cache that the loader,
`python -m backend models fetch` or `hf download` filled is found again without network.

Weights: the files `diffusion_pytorch_model`, `model` or `pytorch_model` with an optional variant
and an optional shard suffix (`model.fp16-00001-of-00002.safetensors`). Safetensors come before
`.bin`; within a format the precision asked for (the `fp16` variant when `half`, the plain files
otherwise) before the other. Other variants (`8bit`, `fp16_ema`, `non_ema`), other frameworks and
single-file checkpoints at the top of a pipeline repository are never read.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

_WEIGHT_NAME = re.compile(
    r"^(?:diffusion_pytorch_model|model|pytorch_model)(?:\.(?P<variant>[A-Za-z0-9_]+))?"
    r"(?:-\d+-of-\d+)?\.(?P<format>safetensors|bin)$"
)
_SIDE_FILES = (".json", ".txt", ".model")
"""Configs, vocabularies and merges, SentencePiece models."""
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class WeightFiles:
    """One set of weight files of a folder: a format, a variant and the file names (shards)."""

    format: str
    """"safetensors" or "bin"."""
    variant: str | None
    """None for the plain files, "fp16" for the half-precision variant."""
    names: tuple[str, ...]
    """The file names, sorted."""


def split_revision(source: str) -> tuple[str, str | None]:
    """'owner/name@revision' -> ('owner/name', 'revision'); no '@' -> (source, None)."""
    repo_id, at, revision = source.partition("@")
    return (repo_id, revision) if at and revision else (source, None)


def pick_weights(names: Sequence[str], half: bool) -> WeightFiles | None:
    """The weight files of one folder the loader reads (module docstring), or None."""
    groups: dict[tuple[str, str | None], list[str]] = {}
    for name in names:
        match = _WEIGHT_NAME.match(name)
        if match and match["variant"] in (None, "fp16"):
            groups.setdefault((match["format"], match["variant"]), []).append(name)
    variants = ("fp16", None) if half else (None, "fp16")
    for file_format in ("safetensors", "bin"):
        for variant in variants:
            if (file_format, variant) in groups:
                return WeightFiles(file_format, variant, tuple(sorted(groups[file_format, variant])))
    return None


def select_files(listing: Sequence[str], parts: Sequence[str], half: bool) -> list[str]:
    """The paths out of `listing` (a repository's or folder's files, '/'-separated) the loader reads."""
    by_folder: dict[str, list[str]] = {}
    for path in listing:
        folder, _, name = path.rpartition("/")
        by_folder.setdefault(folder, []).append(name)
    chosen = {name for name in by_folder.get("", []) if name.endswith(".json")}
    for part in parts:
        names = by_folder.get(part, [])
        prefix = f"{part}/" if part else ""
        chosen |= {prefix + name for name in names if name.endswith(_SIDE_FILES)}
        weights = pick_weights(names, half)
        if weights is not None:
            chosen |= {prefix + name for name in weights.names}
    return sorted(chosen)


def folder_listing(folder: Path) -> list[str]:
    """Every file under `folder` as a '/'-separated relative path (hidden folders left out)."""
    listing = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        base = Path(root).relative_to(folder).as_posix()
        listing += [name if base == "." else f"{base}/{name}" for name in files]
    return listing


def size_on_disk(folder: Path, files: Sequence[str]) -> int:
    """Bytes of `files` under `folder` (symlinks into the cache's blobs followed)."""
    return sum((folder / name).stat().st_size for name in files if (folder / name).exists())


# ----------------------------------------------------------------------------- the cache


@dataclass
class CacheLookup:
    """What the Hugging Face cache holds of one repository."""

    folder: Path | None
    """The snapshot folder when it holds every needed file, else None."""
    files: list[str]
    """The needed files (of the precision found, or of the one asked for when none is complete)."""
    missing: list[str]
    """Needed files the cache lacks (empty when `folder` is set)."""
    reason: str
    """Why `folder` is None: no snapshot of that revision, or which files are missing."""


def repo_cache_folder(repo_id: str) -> Path:
    """<HF_HUB_CACHE>/models--owner--name."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def cached_snapshot(repo_id: str, revision: str | None, parts: Sequence[str], half: bool) -> CacheLookup:
    """Look the repository up in the cache, without network.

    The file list comes from the cached tree listing (`trees/<commit>.json`, written by every
    download) or, without one, from the snapshot folder itself. The preferred precision is tried
    first, then the other (a cache filled for the CPU also serves a GPU, cast on load). The lookup
    is `snapshot_download(local_files_only=True)` with exactly the needed files as patterns.
    """
    from huggingface_hub import snapshot_download

    revision = revision or "main"
    storage = repo_cache_folder(repo_id)
    commit = revision if _COMMIT.match(revision) else _read_ref(storage, revision)
    snapshot = storage / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        return CacheLookup(None, [], [], f"the cache has no snapshot of revision {revision!r} in {storage}")
    listing = _cached_listing(repo_id, commit) or folder_listing(snapshot)
    first: CacheLookup | None = None
    for prefer_half in (half, not half):
        files = select_files(listing, parts, prefer_half)
        missing = [name for name in files if not (snapshot / name).exists()]
        if not missing:
            try:
                folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=files, local_files_only=True))
                return CacheLookup(folder, files, [], "")
            except (OSError, ValueError) as error:  # e.g. a broken link into blobs/
                missing = [str(error).splitlines()[0]]
        first = first or CacheLookup(None, files, missing, _missing_sentence(snapshot, missing))
    return first


def _read_ref(storage: Path, revision: str) -> str | None:
    ref = storage / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None


def _cached_listing(repo_id: str, commit: str) -> list[str] | None:
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return [entry.path for entry in get_cached_repo_tree(repo_id, revision=commit)]
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return None


def _missing_sentence(snapshot: Path, missing: list[str]) -> str:
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return f"the cached snapshot {snapshot} lacks {shown}"


# ----------------------------------------------------------------------------- the hub


@dataclass
class RemoteFiles:
    """The needed files of a repository on the hub."""

    commit: str
    """The commit the revision resolved to."""
    sizes: dict[str, int]
    """path -> bytes, for every needed file."""


def remote_files(repo_id: str, revision: str | None, parts: Sequence[str], half: bool) -> RemoteFiles:
    """Ask the hub for the repository's file list and pick the needed files (network)."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    sizes = {sibling.rfilename: int(sibling.size or 0) for sibling in info.siblings or []}
    return RemoteFiles(commit=str(info.sha), sizes={name: sizes[name] for name in select_files(list(sizes), parts, half)})


def download(repo_id: str, revision: str | None, files: Sequence[str], local_dir: Path | None = None) -> Path:
    """Download `files` (one progress bar each) into the cache, or into `local_dir`; the folder.

    The closing `snapshot_download` over the same files downloads nothing more: it records the
    revision and the repository's tree listing, which the offline lookup reads.
    """
    from huggingface_hub import hf_hub_download, snapshot_download
    from tqdm import tqdm  # plain tqdm: a bar per file on a terminal and in logs alike

    for name in files:
        hf_hub_download(repo_id, name, revision=revision, local_dir=local_dir, etag_timeout=10, tqdm_class=tqdm)
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(files), local_dir=local_dir,
                                  etag_timeout=10))
