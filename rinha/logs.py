"""Logging for every process of an instance: text (the default) or one JSON object per line.

Configured once in the supervisor (`configure`), before it forks; each child names its role
(`set_role`) right after the fork, so every line says which process wrote it. With
LOG_FORMAT=json a line is `{"time", "instance", "process", "pid", "level", "logger", "event",
...}` plus whatever fields the call passed with `extra=` (`correlationId`, `processor`, ...),
so a log pipeline can select one payment's story without parsing sentences.
"""

from __future__ import annotations

import logging
import sys
import time

import orjson

_role = "supervisor"
# The attributes every LogRecord has: anything else on a record came from `extra=`.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "role"}


def set_role(role: str) -> None:
    """Name this process in every line it logs from now on (a child, right after fork)."""
    global _role
    _role = role


class _RoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, instance: str) -> None:
        super().__init__()
        self._instance = instance

    def format(self, record: logging.LogRecord) -> str:
        created_ms = int(record.created * 1000)
        document = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created_ms // 1000))
            + f".{created_ms % 1000:03d}Z",
            "instance": self._instance,
            "process": getattr(record, "role", _role),
            "pid": record.process,
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in document:
                document[key] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(document, default=str).decode()


def configure(instance: str, level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RoleFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter(instance))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s {instance} %(process)d %(role)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level))
    # httpx logs every request at INFO: the health poll would write a line every 5 s.
    logging.getLogger("httpx").setLevel(logging.WARNING)
