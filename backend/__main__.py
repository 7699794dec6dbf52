"""`python -m backend serve|generate|refine|models|store check`.

Each subcommand lives in a module that has `add_subcommands(subparsers)`: it adds its parsers and
sets `handler=` (a function `args -> exit code`) on each with `set_defaults`. `serve` is
defined here; the modules in `SUBCOMMAND_MODULES` add the others. Nothing here imports torch:
`--help` works (and is quick) on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from backend.server import ServerConfig

SUBCOMMAND_MODULES: tuple[str, ...] = ("backend.cli_generate", "backend.cli_models", "backend.store_check")
"""Modules whose `add_subcommands(subparsers)` registers more subcommands (generate, refine, models, store)."""

EXIT_CONFIG = 2
"""Exit status for settings the server cannot start with."""


def default_store_dir() -> Path:
    """The job store when `--store` is not given: the user's data folder for dreamloom."""
    import platformdirs

    return Path(platformdirs.user_data_dir("dreamloom")) / "store"


def add_serve_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Register `serve`."""
    from backend.config import PRESETS
    from backend.server import (
        DEFAULT_BIND, DEFAULT_KEEP_DAYS, DEFAULT_MAX_BYTES_PER_KEY, DEFAULT_MAX_JOBS_PER_KEY, DEFAULT_MAX_QUEUE,
    )
    from protocol.transport import DEFAULT_MAX_CONNECTIONS

    serve = subparsers.add_parser(
        "serve",
        help="run the backend server (ZeroMQ ROUTER + job store)",
        description="Serve jobs to Dreamloom clients over ZeroMQ; jobs are kept in --store.",
    )
    serve.add_argument("--bind", default=DEFAULT_BIND, help=f"ZeroMQ address to bind (default {DEFAULT_BIND})")
    serve.add_argument("--store", type=Path, default=None,
                       help="job store folder (default: the user's data folder, dreamloom/store)")
    serve.add_argument("--keys", type=Path, default=None,
                       help="CurveZMQ key folder (python -m protocol.keys server DIR); required off loopback")
    serve.add_argument("--insecure", action="store_true",
                       help="allow a non-loopback --bind without --keys (unencrypted, unauthenticated)")
    serve.add_argument("--models", default="default",
                       help="model set the pipeline loads: default, tiny, a folder or oracle:MESH[,TEXTURE] (default: default)")
    serve.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="run every job at this preset whatever its quality (small: what a CPU finishes in minutes)")
    serve.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                       help=f"most waiting jobs; more get queue_full (default {DEFAULT_MAX_QUEUE})")
    serve.add_argument("--keep-days", type=float, default=DEFAULT_KEEP_DAYS,
                       help=f"remove finished jobs this many days after they ended; 0 keeps them (default {DEFAULT_KEEP_DAYS:g})")
    serve.add_argument("--max-jobs-per-key", type=int, default=DEFAULT_MAX_JOBS_PER_KEY,
                       help=f"most jobs one client key keeps (default {DEFAULT_MAX_JOBS_PER_KEY})")
    serve.add_argument("--max-bytes-per-key", type=int, default=DEFAULT_MAX_BYTES_PER_KEY,
                       help=f"most bytes of job files one client key keeps (default {DEFAULT_MAX_BYTES_PER_KEY})")
    serve.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                       help=f"open client connections kept (default {DEFAULT_MAX_CONNECTIONS})")
    serve.add_argument("--device", choices=("cpu", "cuda"), default=None,
                       help="device for the pipeline (default: cuda when available, else cpu)")
    serve.add_argument("--ray", metavar="auto|ADDRESS", default=None,
                       help="run jobs on Ray workers, one per GPU: auto starts a local Ray with this box's GPUs, "
                            "ADDRESS (host:port) joins the cluster `ray start --head` began (docs/server.md)")
    serve.add_argument("--workers", type=int, default=None,
                       help="with --ray and --device cpu: how many workers run on the CPUs (default 1)")
    serve.add_argument("--verbose", action="store_true", help="debug logging")
    serve.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """`serve`: check the settings, build the runner, serve until SIGINT/SIGTERM."""
    from backend.logging_setup import configure_logging
    from backend.server import ConfigError, ServerConfig, check_bind_security, load_runner, serve

    for flag, value, low in (("--max-queue", args.max_queue, 1), ("--keep-days", args.keep_days, 0),
                             ("--max-jobs-per-key", args.max_jobs_per_key, 1),
                             ("--max-bytes-per-key", args.max_bytes_per_key, 1),
                             ("--max-connections", args.max_connections, 1)):
        if not value >= low:
            return _refuse(f"{flag} must be >= {low}, got {value}")
    if args.workers is not None and (args.ray is None or args.workers < 1):
        return _refuse(f"--workers {args.workers}: it needs --ray and must be >= 1")
    if args.keys is not None and not args.keys.is_dir():
        return _refuse(f"--keys {args.keys} is not a folder (make one with `python -m protocol.keys server DIR`)")
    config = ServerConfig(
        store_dir=args.store if args.store is not None else default_store_dir(),
        bind=args.bind, keys_dir=args.keys, insecure=args.insecure,
        max_queue=args.max_queue, device=args.device or "cpu", models=args.models, preset=args.preset,
        keep_days=args.keep_days, max_jobs_per_key=args.max_jobs_per_key,
        max_bytes_per_key=args.max_bytes_per_key, max_connections=args.max_connections,
    )
    try:
        check_bind_security(config)
    except ConfigError as exc:
        return _refuse(str(exc))
    os.umask(0o077)  # the store, its logs and anything the pipeline writes: the owner's only
    configure_logging(config.store_dir, verbose=args.verbose)
    if args.ray is not None:
        config.device = args.device or "cuda"
        return _serve_on_ray(config, args.ray, args.workers)
    if args.device is None:
        config.device = _default_device()
    try:
        runner, missing = load_runner(config.models, config.device, config.preset)
    except Exception as exc:  # the pipeline exists but cannot run here: say why, do not serve
        return _refuse(f"cannot load the pipeline (--models {config.models} --device {config.device}): "
                       f"{type(exc).__name__}: {exc}")
    return serve(config, runner, missing)


def _serve_on_ray(config: "ServerConfig", address: str, workers: int | None) -> int:
    """`serve --ray`: join Ray, start the workers (refusing when there are none), serve, end them."""
    import ray

    from backend.cluster import connect, start_workers, stop_workers
    from backend.server import ConfigError, serve

    try:
        connect(address)
        pool = start_workers(config.models, config.device, workers, config.preset)
    except ConfigError as exc:
        return _refuse(str(exc))
    except Exception as exc:  # Ray itself refused (a version mismatch, a bad token): one line
        from backend.jobs import one_line

        return _refuse(f"--ray {address}: {type(exc).__name__}: {one_line(exc)}")
    try:
        return serve(config, None, None, pool)
    finally:
        stop_workers(pool)
        ray.shutdown()


def _default_device() -> str:
    import torch  # only once serving: --help and the refusals above stay torch-free

    return "cuda" if torch.cuda.is_available() else "cpu"


def _refuse(reason: str) -> int:
    sys.stderr.write(f"python -m backend serve: error: {reason}\n")
    return EXIT_CONFIG


def build_parser() -> argparse.ArgumentParser:
    """The `python -m backend` parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="python -m backend", description="Dreamloom backend")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_subcommand(subparsers)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_subcommands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
