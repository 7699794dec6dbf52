"""Logging for the server: one line per record to stderr and to a rotating file in the store."""

from __future__ import annotations

import logging
import logging.handlers
import os
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FILE_BYTES = 5 * 2**20
"""Size at which `server.log` rolls over (three old files are kept)."""


class EscapingFormatter(logging.Formatter):
    """`LOG_FORMAT` with control characters of the message escaped (`\\n`, `\\x1b`...), so text
    a client sent (a `client_name` with a newline) cannot forge log lines; tracebacks keep theirs."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_control(super().formatMessage(record))


def escape_control(text: str) -> str:
    """`text` with every control character (C0, DEL, C1, line and paragraph separators) escaped."""
    return "".join(
        char if char.isprintable() or char == " " else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


def configure_logging(store_dir: Path | None, verbose: bool = False) -> None:
    """Send `dreamloom.*` records to stderr and, with a store, to `<store>/server.log`."""
    logger = logging.getLogger("dreamloom")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = EscapingFormatter(LOG_FORMAT)
    stream = logging.StreamHandler()
    stream.setFormatter(formatter)
    logger.addHandler(stream)
    if store_dir is not None:
        store_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        log_file = store_dir / "server.log"
        os.close(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))  # 0600 from the first byte
        log_file.chmod(0o600)
        rotating = logging.handlers.RotatingFileHandler(
            store_dir / "server.log", maxBytes=LOG_FILE_BYTES, backupCount=3, encoding="utf-8"
        )
        rotating.setFormatter(formatter)
        logger.addHandler(rotating)
    logger.propagate = False
