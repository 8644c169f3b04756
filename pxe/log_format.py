"""How `pxepeer serve` logs: text lines for people, or JSON lines for journald and log
shippers (`--log-format json`).

It lives in pxe/ because the TFTP worker processes (pxe/tftp_server.py) log to the
same stderr as the daemon: they read the format from PXEPEER_LOG_FORMAT, which
configure_logging() sets for every child process, so no line of a JSON log is text.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime

ENV_VAR = "PXEPEER_LOG_FORMAT"
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (RFC 3339, UTC, milliseconds),
    level (lower case, as --log-level spells it), logger, message, and exception / stack
    (the traceback text) when the record has one."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        doc = {
            "time": stamp.replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        # ensure_ascii: a file name that is not UTF-8 (a surrogate escape) still makes
        # a line any shipper can read; newlines in a message are escaped, never a line break.
        return json.dumps(doc, ensure_ascii=True)


def configure_logging(level: str, log_format: str) -> None:
    """Root logging for a process: `level` a logging level name (info, debug, ...),
    `log_format` text or json. Children started later inherit the format."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r}: want one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonLineFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
    os.environ[ENV_VAR] = log_format


def current_format() -> str:
    """The format this process logs in (a child process: its parent's), else text."""
    value = os.environ.get(ENV_VAR, "text")
    return value if value in FORMATS else "text"
