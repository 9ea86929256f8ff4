"""JSON-lines logging for services: one object per line, extra fields included, never a prompt or a secret."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from logging.handlers import RotatingFileHandler
from typing import IO

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(time.time(), 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_json_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO: the supervisor's health and registry polls alone would add a line a second
    # to a service's log, forever. Its failures still reach us as exceptions.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


# A child's output written by its parent, rotated: on one machine nothing else would (Kubernetes rotates pod logs).
LOG_MAX_BYTES = 64 << 20
LOG_BACKUPS = 4
_PIECE = 8192


def rotating_log(path: str, max_bytes: int = LOG_MAX_BYTES) -> RotatingFileHandler:
    """FILE rotated at `max_bytes`, `LOG_BACKUPS` older files kept (FILE.1 the newest); feed it with `copy_lines`."""
    return RotatingFileHandler(path, maxBytes=max_bytes, backupCount=LOG_BACKUPS)


def log_line(text: str) -> logging.LogRecord:  # for handle(), which takes the lock that writers of one file share
    return logging.makeLogRecord({"msg": text})


def copy_lines(pipe: IO[bytes], log: logging.Handler, seen: Callable[[str], object] | None = None) -> None:
    """A child's output into `log`, whole lines at a time (a rotated file never starts mid-line), until the pipe
    closes; `seen` also gets every line."""
    rest = b""
    try:
        while chunk := pipe.read1(1 << 16):
            rest += chunk
            cut = rest.rfind(b"\n") + 1
            if cut:
                _emit(rest[:cut - 1], log, seen)
                rest = rest[cut:]
        if rest:
            _emit(rest, log, seen)
    finally:  # whatever failed here, the child must not block on a full pipe: its output is dropped instead
        while pipe.read1(1 << 16):
            pass


def _emit(block: bytes, log: logging.Handler, seen: Callable[[str], object] | None) -> None:
    # Lines go out in pieces of ~8 KB, not a record per line (a busy gateway writes thousands a second) nor per read
    # (up to 64 KB): the handler rotates before a record that would not fit, so only a longer line outgrows a file.
    while len(block) > _PIECE and (nl := block.rfind(b"\n", 0, _PIECE)) > 0:
        _emit_piece(block[:nl], log, seen)
        block = block[nl + 1:]
    _emit_piece(block, log, seen)


def _emit_piece(piece: bytes, log: logging.Handler, seen: Callable[[str], object] | None) -> None:
    text = piece.decode("utf-8", "replace")
    log.handle(log_line(text))
    if seen is not None:
        for line in text.split("\n"):
            seen(line)
