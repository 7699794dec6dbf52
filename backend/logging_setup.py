"""Logging for the server: one line per record to stderr and to a rotating file in the store."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FILE_BYTES = 5 * 2**20
"""Size at which `server.log` rolls over (three old files are kept)."""


def configure_logging(store_dir: Path | None, verbose: bool = False) -> None:
    """Send `dreamloom.*` records to stderr and, with a store, to `<store>/server.log`."""
    logger = logging.getLogger("dreamloom")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(LOG_FORMAT)
    stream = logging.StreamHandler()
    stream.setFormatter(formatter)
    logger.addHandler(stream)
    if store_dir is not None:
        store_dir.mkdir(parents=True, exist_ok=True)
        rotating = logging.handlers.RotatingFileHandler(
            store_dir / "server.log", maxBytes=LOG_FILE_BYTES, backupCount=3, encoding="utf-8"
        )
        rotating.setFormatter(formatter)
        logger.addHandler(rotating)
    logger.propagate = False
